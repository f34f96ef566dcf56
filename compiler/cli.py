"""The ``lowbit`` command: compile, run, eval, analyze, inspect, targets.

Errors lowbit can explain print one message to stderr and exit with code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import LowbitError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into an artifact directory")
    c.add_argument("model", help="registered name (smollm2-135m), HF folder, .gguf or .onnx file")
    c.add_argument("-r", "--recipe", default="w4a16-rtn-g128", help="recipe name or .toml file")
    c.add_argument("-t", "--target", default="host", help="target name (see `lowbit targets`)")
    c.add_argument("-o", "--output", help="artifact directory (default out/<model>-<recipe>)")
    c.add_argument("--max-context", type=int, help="longest sequence the artifact accepts")
    _calibration_arguments(c)
    c.add_argument("--json", action="store_true", help="print one JSON object")

    r = sub.add_parser("run", help="generate text from an artifact")
    r.add_argument("artifact")
    r.add_argument("--prompt", required=True)
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int)
    r.add_argument("--json", action="store_true")

    e = sub.add_parser("eval", help="perplexity of an artifact, or of a model under a recipe, on real text")
    e.add_argument("model", help="artifact directory, or a model as for `compile` (built in memory)")
    e.add_argument("-r", "--recipe", help="recipe for a model (default fp32); compared with the fp32 build")
    e.add_argument("-t", "--target", default="host", help="target name (see `lowbit targets`)")
    e.add_argument("--text", "--eval", dest="text", default="alice29",
                   help="bundled text name or a UTF-8 file (default alice29)")
    e.add_argument("--tokens", type=int, default=4096, help="evaluation tokens")
    e.add_argument("--window", type=int, default=512, help="tokens per non-overlapping window")
    e.add_argument("--reference", help="float reference for an artifact: fp32 artifact directory or model")
    _calibration_arguments(e)
    e.add_argument("--json", action="store_true")

    a = sub.add_parser("analyze", help="per-layer sensitivity to a recipe's quantization, worst first")
    a.add_argument("model", help="a model as for `compile`")
    a.add_argument("-r", "--recipe", default="w8a8-naive", help="recipe whose quantization is measured")
    a.add_argument("-t", "--target", default="host", help="target name (see `lowbit targets`)")
    a.add_argument("--top", type=int, default=20, help="layers to print (all with --json)")
    _calibration_arguments(a, samples=8)
    a.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="print an artifact's manifest")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")

    t = sub.add_parser("targets", help="list the registered targets")
    t.add_argument("--json", action="store_true")
    return parser


def _calibration_arguments(parser, samples: int = 64) -> None:
    parser.add_argument("--calib", default="lcet10", help="calibration text: bundled name or UTF-8 file")
    parser.add_argument("--calib-samples", type=int, default=samples, help="calibration windows")
    parser.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window")


def _compile(args) -> dict:
    from .api import compile as compile_model

    return compile_model(args.model, args.recipe, args.target, args.output, args.max_context,
                         calib=args.calib, calib_samples=args.calib_samples,
                         calib_seq_len=args.calib_seq_len).as_dict()


def _run(args) -> dict:
    from .api import load

    gen = load(args.artifact).generate(args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    return {"text": gen.text, "prompt_tokens": gen.prompt_tokens, "new_tokens": gen.new_tokens,
            "prefill_tokens_per_s": round(gen.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(gen.decode_tokens_per_s, 2)}


def _eval(args) -> dict:
    from .api import evaluate

    return evaluate(args.model, args.recipe, args.target, args.text, args.tokens, args.window, args.reference,
                    calib=args.calib, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)


def _analyze(args) -> dict:
    from .api import analyze

    return analyze(args.model, args.recipe, args.target, calib=args.calib, calib_samples=args.calib_samples,
                   calib_seq_len=args.calib_seq_len)


def _inspect(args) -> dict:
    from .artifact import read_manifest

    return read_manifest(args.artifact)


def _targets(_args) -> list:
    from lowbit.targets import get_target, list_targets

    host = get_target("host").name
    return [dict(t.as_dict(), host=t.name == host) for t in list_targets()]


def _print_human(command: str, result, args) -> None:
    if command == "compile":
        print(f"wrote {result['output']} ({result['recipe']}, {result['target']}, "
              f"{result['weight_bytes'] / 1e6:.1f} MB weights, {result['seconds']:.1f} s)")
    elif command == "run":
        print(args.prompt + result["text"])
        print(f"[{result['prompt_tokens']} prompt tokens at {result['prefill_tokens_per_s']} tok/s, "
              f"{result['new_tokens']} new at {result['decode_tokens_per_s']} tok/s]", file=sys.stderr)
    elif command == "eval":
        print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens of {result['text']} "
              f"(windows of {result['window']}, recipe {result['recipe']})")
        if "kl_vs_float" in result:
            print(f"vs float: mean KL {result['kl_vs_float']:.5f} nats, top-1 agreement "
                  f"{100 * result['top1_agreement']:.2f} %")
    elif command == "analyze":
        end_to_end = "output_kl" in result["layers"][0]
        print(f"{result['recipe']}: per layer, the layer's relative output error on {result['calibration_tokens']} "
              "calibration tokens" + (" and the model's mean KL vs float with only that layer quantized"
                                      if end_to_end else "") + ", worst first")
        for entry in result["layers"][: args.top]:
            kl = f"  KL {entry['output_kl']:10.3e}" if end_to_end else ""
            print(f"  {entry['relative_error']:10.3e}{kl}  {entry['layer']}")
    elif command == "inspect":
        m = result
        print(f"model    {m['model']['name']} ({m['model']['kind']})")
        print(f"recipe   {m['recipe']['name']}")
        print(f"target   {m['target']['name']}: {m['target']['description']}")
        print(f"context  {m['max_context']} tokens, KV cache {m['kv_cache']}")
        print(f"weights  {m['weight_bytes'] / 1e6:.1f} MB")
        formats: dict[str, int] = {}
        for fmt in m["layers"].values():
            formats[fmt.split(":")[0]] = formats.get(fmt.split(":")[0], 0) + 1
        print("layers   " + ", ".join(f"{n} x {f}" for f, n in sorted(formats.items())))
        for name, entry in m["files"].items():
            print(f"file     {name:<24} {entry['bytes']:>12} bytes  sha256 {entry['sha256'][:16]}")
    else:
        for t in result:
            mark = "*" if t["host"] else " "
            runs = "runs here" if t["runs_here"] else "cross-compile"
            print(f"{mark} {t['name']:<12} {t['family']:<5} {runs:<14} {t['description']}")
        print("* = what `-t host` picks on this machine")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"compile": _compile, "run": _run, "eval": _eval, "analyze": _analyze, "inspect": _inspect, "targets": _targets}
    try:
        result = handlers[args.command](args)
    except LowbitError as exc:
        if args.debug:
            raise
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lowbit: interrupted; nothing was written", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(args.command, result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
