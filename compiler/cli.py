"""The ``lowbit`` command: compile, run, eval, analyze, inspect, sign, keygen, targets.

Errors lowbit can explain print one ``lowbit: error:`` line to stderr and exit with code 2; ``--debug``
(anywhere on the command line) shows the traceback instead. Ctrl-C and SIGTERM stop the command
with nothing half-written (exit 130 / 143). Warnings print one ``lowbit: warning:`` line each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import warnings

from lowbit.codegen.cache_layout import RING_CALL_TOKENS, capacity_for, layer_capacity, layer_windows
from lowbit.codegen.errors import LowbitError, LowbitWarning

from .runtime.loading import runtime_only

_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
_received: list[int] = []  # signals that interrupted this command


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one ``lowbit: error:`` line (exit 2)."""

    def error(self, message):
        self.exit(2, f"lowbit: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _whole(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"{value} is out of range; use a whole number {bound}")
        return value

    return parse


def _number(minimum: float, maximum: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < minimum or value > maximum or (low_open and value == minimum):
            low = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"{text} is out of range; use a number in {low}{minimum:g}, {maximum:g}]")
        return value

    return parse


def _token_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers like 1,2,3") from None


def _parser() -> argparse.ArgumentParser:
    from .runtime.loading import MAX_CONTEXT_LIMIT

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser = _Parser(prog="lowbit", description=__doc__.splitlines()[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str, **kwargs):
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common], **kwargs)

    c = command("compile", "compile a model into an artifact directory")
    c.add_argument("model", help="registered name (smollm2-135m), HF folder, .gguf or .onnx file")
    c.add_argument("-r", "--recipe", default="w4a16-rtn-g128", help="recipe name or .toml file")
    c.add_argument("-t", "--target", default="host", help="target name (see `lowbit targets`)")
    c.add_argument("-o", "--output", help="artifact directory (default out/<model>-<recipe>); an existing one "
                   "is replaced only if it is a lowbit artifact")
    c.add_argument("--max-context", type=_whole(2, MAX_CONTEXT_LIMIT), help="longest sequence the artifact accepts")
    _calibration_arguments(c)
    c.add_argument("--explain", action="store_true", help="print the pipeline steps the recipe runs (what each "
                   "requires and guarantees) and stop; nothing is loaded")
    c.add_argument("--json", action="store_true", help="print one JSON object")

    r = command("run", "generate text from an artifact")
    r.add_argument("artifact")
    prompt = r.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", help="a UTF-8 file holding the prompt")
    prompt.add_argument("--prompt-ids", type=_token_ids, help="the prompt as token ids, e.g. 1,2,3 (for an "
                        "artifact without a tokenizer)")
    r.add_argument("--max-new-tokens", type=_whole(1), default=32)
    _context_argument(r)
    r.add_argument("--temperature", type=_number(0.0, 100.0), default=0.0, help="0 is greedy")
    r.add_argument("--top-p", type=_number(0.0, 1.0, low_open=True), default=1.0)
    r.add_argument("--seed", type=_whole(0, 2**63 - 1))
    _trust_arguments(r)
    r.add_argument("--json", action="store_true")

    b = command("bench", "prefill and decode tokens/s of an artifact (medians of repeats, like llama-bench)")
    b.add_argument("artifact", nargs="+", help="one or more artifact directories (measured in turn, side by side)")
    b.add_argument("--prompt-tokens", type=_whole(1), default=64, help="tokens per prefill (default 64)")
    b.add_argument("--new-tokens", type=_whole(1), default=128, help="decode steps per repeat (default 128)")
    b.add_argument("--repeats", type=_whole(1, 1000), default=5, help="measured repeats (default 5)")
    b.add_argument("--warmup", type=_whole(0, 100), default=1, help="uncounted repeats first (default 1)")
    _context_argument(b)
    _trust_arguments(b)
    b.add_argument("--json", action="store_true")

    e = command("eval", "perplexity of an artifact, or of a model under a recipe, on real text")
    e.add_argument("model", help="artifact directory, or a model as for `compile` (built in memory)")
    e.add_argument("-r", "--recipe", help="recipe for a model (default fp32); compared with the fp32 build")
    e.add_argument("-t", "--target", default="host", help="target name (see `lowbit targets`)")
    e.add_argument("--text", "--eval", dest="text", default="alice29",
                   help="bundled text name or a UTF-8 file (default alice29)")
    e.add_argument("--tokens", type=_whole(2), default=4096, help="evaluation tokens")
    e.add_argument("--window", type=_whole(1), default=512, help="tokens per non-overlapping window")
    e.add_argument("--reference", help="float reference for an artifact: fp32 artifact directory or model")
    e.add_argument("--chunk", type=_whole(1), help="feed each window in chunks of this many tokens, so that later "
                   "tokens attend through the KV cache as stored (default: 64 when the model's KV cache is quantized, "
                   "else the whole window); the reference and a +kv recipe's float-cache baseline run the same "
                   "protocol")
    _calibration_arguments(e)
    _trust_arguments(e)
    e.add_argument("--json", action="store_true")

    a = command("analyze", "per-layer sensitivity to a recipe's quantization, worst first")
    a.add_argument("model", help="a model as for `compile`")
    a.add_argument("-r", "--recipe", default="w8a8-naive", help="recipe whose quantization is measured")
    a.add_argument("-t", "--target", default="host", help="target name (see `lowbit targets`)")
    a.add_argument("--top", type=_whole(1), default=20, help="layers to print (all with --json)")
    _calibration_arguments(a, samples=8)
    a.add_argument("--json", action="store_true")

    i = command("inspect", "print an artifact's verified manifest (loads no code)")
    i.add_argument("artifact")
    i.add_argument("--context", type=_whole(1, MAX_CONTEXT_LIMIT), help="tokens at which the KV cache's bytes per "
                   "token are stated (fixed-size buffers amortized; default: the model's context)")
    i.add_argument("--json", action="store_true")

    s = command("sign", "sign an artifact's manifest with an ed25519 key")
    s.add_argument("artifact")
    s.add_argument("--key", required=True, help="PEM private key (see `lowbit keygen`)")
    s.add_argument("--json", action="store_true")

    k = command("keygen", "write a new ed25519 key pair: PATH (private, mode 0600) and PATH.pub")
    k.add_argument("path")
    k.add_argument("--json", action="store_true")

    t = command("targets", "list the registered targets")
    t.add_argument("--json", action="store_true")
    return parser


def _context_argument(parser) -> None:
    parser.add_argument("--max-context", type=_whole(1), help="allocate the KV cache once for this many tokens "
                        "(its size is printed; default: grown as the conversation needs, up to the model's context)")


def _calibration_arguments(parser, samples: int = 64) -> None:
    parser.add_argument("--calib", default="lcet10", help="calibration text: bundled name or UTF-8 file")
    parser.add_argument("--calib-samples", type=_whole(1, 100_000), default=samples, help="calibration windows")
    parser.add_argument("--calib-seq-len", type=_whole(2, 1 << 20), default=512,
                        help="tokens per calibration window")


def _trust_arguments(parser) -> None:
    parser.add_argument("--trusted-key", action="append", default=[], metavar="KEY.pub",
                        help="an ed25519 public key whose signature is accepted (repeatable)")
    parser.add_argument("--require-signature", action="store_true",
                        help="refuse an artifact that no --trusted-key signed (the default when a key is given)")


def _trusted_keys(args):
    if args.require_signature and not args.trusted_key:
        raise LowbitError("--require-signature needs at least one --trusted-key KEY.pub")
    return args.trusted_key or None


def _compile(args):
    from .api import compile as compile_model
    from .api import explain

    if args.explain:
        return explain(args.recipe)
    return compile_model(args.model, args.recipe, args.target, args.output, args.max_context,
                         calib=args.calib, calib_samples=args.calib_samples,
                         calib_seq_len=args.calib_seq_len).as_dict()


def _prompt(args):
    if args.prompt_ids is not None:
        return args.prompt_ids
    if args.prompt_file is not None:
        from .sources.texts import read_text_file

        return read_text_file(args.prompt_file)
    return args.prompt


def _run(args) -> dict:
    from .runtime.loading import load

    session = load(args.artifact, _trusted_keys(args), args.max_context)
    gen = session.generate(_prompt(args), args.max_new_tokens, args.temperature, args.top_p, args.seed)
    return {"text": gen.text, "token_ids": gen.token_ids, "prompt_tokens": gen.prompt_tokens,
            "new_tokens": gen.new_tokens, "prefill_tokens_per_s": round(gen.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(gen.decode_tokens_per_s, 2),
            **session.kv_report(args.max_context or gen.prompt_tokens + gen.new_tokens),
            "kv_cache_bytes": session.cache_bytes}


def _bench(args) -> dict:
    from .runtime.loading import load
    from .runtime.benchmark import benchmark

    runs = [dict(benchmark(load(path, _trusted_keys(args), args.max_context), args.prompt_tokens, args.new_tokens,
                           args.repeats, args.warmup), artifact=path) for path in args.artifact]
    return runs[0] if len(runs) == 1 else {"runs": runs}


def _eval(args) -> dict:
    from .api import evaluate

    return evaluate(args.model, args.recipe, args.target, args.text, args.tokens, args.window, args.reference,
                    calib=args.calib, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                    trusted_keys=_trusted_keys(args), chunk=args.chunk)


def _analyze(args) -> dict:
    from .api import analyze

    return analyze(args.model, args.recipe, args.target, calib=args.calib, calib_samples=args.calib_samples,
                   calib_seq_len=args.calib_seq_len)


def _inspect(args) -> dict:
    from .runtime.artifact import read_manifest
    from .runtime.signing import signatures

    from lowbit.codegen.cache_layout import kv_report

    manifest = read_manifest(args.artifact)
    return dict(manifest, signatures=signatures(args.artifact),
                **kv_report(manifest["kv_cache"], args.context or manifest["max_context"]))


def _sign(args) -> dict:
    from .runtime.signing import sign_artifact

    return {"artifact": args.artifact, "key": sign_artifact(args.artifact, args.key)}


def _keygen(args) -> dict:
    from .runtime.signing import generate_key

    private, public = generate_key(args.path)
    return {"private_key": str(private), "public_key": str(public)}


def _targets(_args) -> list:
    from lowbit.targets import get_target, list_targets

    host = get_target("host").name
    return [dict(t.as_dict(), host=t.name == host) for t in list_targets()]


def _print_human(command: str, result, args) -> None:
    if command == "compile" and args.explain:
        for index, step in enumerate(result, 1):
            calibration = " (needs calibration)" if step["needs_calibration"] else ""
            print(f"{index}. {step['step']}{calibration}\n   requires:   {step['requires']}\n"
                  f"   guarantees: {step['guarantees']}")
    elif command == "compile":
        print(f"wrote {result['output']} ({result['recipe']}, {result['target']}, "
              f"{result['weight_bytes'] / 1e6:.1f} MB weights, {result['seconds']:.1f} s)")
    elif command == "run":
        if args.prompt is not None:
            print(args.prompt + result["text"])
        else:
            print(result["text"] or " ".join(map(str, result["token_ids"])))
        print(f"[{result['prompt_tokens']} prompt tokens at {result['prefill_tokens_per_s']} tok/s, "
              f"{result['new_tokens']} new at {result['decode_tokens_per_s']} tok/s; {_kv_line(result)}, "
              f"{result['kv_cache_bytes'] / 1e6:.1f} MB allocated]", file=sys.stderr)
    elif command == "bench":
        runs = result.get("runs", [result])
        first = runs[0]
        print(f"{first['threads']} threads, {first['cpu']}; {first['prompt_tokens']}-token prompt, "
              f"{first['new_tokens']} new tokens; median (min-max) of {first['repeats']} repeats")
        width = max(len("artifact"), *(len(run["artifact"]) for run in runs))
        print(f"  {'artifact':<{width}} {'recipe':<24} {'prefill tok/s':>22} {'decode tok/s':>22}")
        for run in runs:
            rates = [run[f"{phase}_tokens_per_s"] for phase in ("prefill", "decode")]
            cells = [f"{r['median']:.1f} ({r['min']:.0f}-{r['max']:.0f})" for r in rates]
            print(f"  {run['artifact']:<{width}} {run['recipe']:<24} {cells[0]:>22} {cells[1]:>22}")
    elif command == "eval":
        chunks = f" fed in chunks of {result['chunk']}" if result["chunk"] else ""
        print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens of {result['text']} "
              f"(windows of {result['window']}{chunks}, recipe {result['recipe']}; {_kv_line(result)})")
        if "kv_perplexity_gap" in result:
            print(f"vs the same recipe on a float KV cache: perplexity {result['kv_baseline_perplexity']:.3f} "
                  f"({100 * result['kv_perplexity_gap']:+.2f} %)")
        if "kl_vs_float" in result:
            print(f"vs float: perplexity {result['float_perplexity']:.3f} ({100 * result['perplexity_gap']:+.1f} %), "
                  f"mean KL {result['kl_vs_float']:.5f} nats, top-1 agreement {100 * result['top1_agreement']:.2f} %")
    elif command == "analyze":
        end_to_end = "output_kl" in result["layers"][0]
        print(f"{result['recipe']}: per layer, the layer's relative output error on {result['calibration_tokens']} "
              "calibration tokens" + (" and the model's mean KL vs float with only that layer quantized"
                                      if end_to_end else "") + ", worst first")
        for entry in result["layers"][: args.top]:
            kl = f"  KL {entry['output_kl']:10.3e}" if end_to_end else ""
            print(f"  {entry['relative_error']:10.3e}{kl}  {entry['layer']}")
    elif command == "inspect":
        _print_manifest(result)
    elif command == "sign":
        print(f"signed {result['artifact']} with key {result['key']}")
    elif command == "keygen":
        print(f"wrote {result['private_key']} (keep it private) and {result['public_key']}")
    else:
        for t in result:
            mark = "*" if t["host"] else " "
            status = "runs here" if t["runs_here"] else "cross-compile" if t["can_build"] else "no rules yet"
            print(f"{mark} {t['name']:<12} {t['family']:<5} {status:<14} {t['description']}")
        print("* = what `-t host` picks on this machine; `no rules yet`: registered, cannot build")


def _print_manifest(m: dict) -> None:
    print(f"model    {m['model']['name']} ({m['model']['kind']})")
    print(f"recipe   {m['recipe']['name']}")
    print(f"target   {m['target']['name']}: {m['target'].get('description', '')}")
    kv = m["kv_cache"]
    print(f"context  {m['max_context']} tokens")
    print(f"kv cache {kv['num_layers']} layers x {kv['num_kv_heads']} heads x {kv['head_dim']}, {_kv_line(m)}; "
          f"attention fused in {kv['attention_fused']} (decode) and {kv.get('prompt_attention_fused', 0)} (prompt) "
          f"of {kv['attention_layers']} layers")
    print("         per layer: " + ", ".join(f"{b['name']} {b['dtype']}{b['shape']}" for b in kv["buffers"]))
    rings: dict[int, list[int]] = {}
    for layer, window in enumerate(layer_windows(kv)):
        if window is not None:
            rings.setdefault(window, []).append(layer)
    multiple = kv["capacity_multiple"]
    for window, layers in rings.items():
        ring = layer_capacity(capacity_for(m["max_context"], multiple), window, multiple)
        print(f"         sliding window {window}: layers {', '.join(map(str, layers))} keep a ring of {ring} positions "
              f"(the window and {RING_CALL_TOKENS} tokens per call, in multiples of {multiple})")
    print(f"weights  {m['weight_bytes'] / 1e6:.1f} MB")
    formats: dict[str, int] = {}
    for fmt in m["layers"].values():
        formats[fmt.split(":")[0]] = formats.get(fmt.split(":")[0], 0) + 1
    print("layers   " + ", ".join(f"{n} x {f}" for f, n in sorted(formats.items())))
    for name, entry in m["files"].items():
        print(f"file     {name:<24} {entry['bytes']:>12} bytes  sha256 {entry['sha256'][:16]}")
    for signature in m["signatures"]:
        print(f"signed   by key {signature['key']} ({'valid' if signature['valid'] else 'INVALID'})")


def _kv_line(result: dict) -> str:
    ratio = result["kv_bytes_per_token"] / result["kv_fp32_bytes_per_token"]
    return (f"KV cache {result['kv_scheme']} {result['kv_bytes_per_token']:.0f} bytes/token at "
            f"{result['kv_context']} tokens ({ratio:.3f} x fp32)")


def _interrupt(signum, _frame):
    _received.append(signum)
    raise KeyboardInterrupt


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, LowbitWarning):
        print(f"lowbit: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


RUNTIME_COMMANDS = ("run", "bench")  # they only load artifacts: TVM's runtime library suffices


def main(argv=None) -> int:
    for signum in _SIGNAL_EXIT:
        signal.signal(signum, _interrupt)
    warnings.showwarning = _show_warning
    sys.stdout.reconfigure(errors="backslashreplace")  # a path with undecodable bytes still prints
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    if args.command in RUNTIME_COMMANDS:
        runtime_only()
    handlers = {"compile": _compile, "run": _run, "bench": _bench, "eval": _eval, "analyze": _analyze, "inspect": _inspect,
                "sign": _sign, "keygen": _keygen, "targets": _targets}
    try:
        result = handlers[args.command](args)
        if args.json:
            print(json.dumps(result))
        else:
            _print_human(args.command, result, args)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`lowbit inspect --json | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except LowbitError as exc:
        if debug:
            raise
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseException as exc:  # interrupted (TVM may wrap the KeyboardInterrupt), or a bug
        if _received or isinstance(exc, KeyboardInterrupt):
            print("lowbit: interrupted; nothing was written", file=sys.stderr)
            return _SIGNAL_EXIT.get(_received[0] if _received else signal.SIGINT, 130)
        if debug or not isinstance(exc, Exception):
            raise
        first = next(iter(str(exc).splitlines()), "")
        print(f"lowbit: internal error: {type(exc).__name__}: {first} (a bug in lowbit: please report it with the "
              "output of --debug)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
