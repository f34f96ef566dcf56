"""Long contexts, side by side in one run: lowbit's float, int8 and int4 KV caches against llama.cpp's.

SmolLM2-135M, the same weights per side (lowbit ``--weights`` recipe, default w4a16-rtn-g128, with
its float cache, ``+kv16``, ``+kv8`` and ``+kv4``; llama.cpp Q4_0 with its f16, q8_0 and q4_0 caches, flash
attention on for all three, as its quantized value cache requires), 2 threads everywhere. For each
context (default 128, 1,024 and 4,096 tokens): a prompt of that many tokens of the evaluation text
(prefilled in the chunks generate() feeds: 128 tokens, fewer as the position grows), then 64 greedy new tokens; decode tokens/s is the median of
``--rounds`` interleaved rounds (the quiet-machine check of :mod:`e2e`).

Perplexity (alice29, 4,096 tokens, windows of 512 fed in chunks of 64, so every token after a
window's first chunk attends through the cache as stored: lowbit feeds the chunks, llama.cpp is
given a batch of 64) and its gap against the same side's unquantized cache. Peak resident memory of
``lowbit run`` (a 4,032-token prompt from a file, 64 new tokens) per lowbit cache.

    python bench/contexts.py [--json] [--contexts 128,1024,4096] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import peers
from bench_spine import ensure_artifact, lowbit_revision, machine_description
from e2e import Worker, eval_ids, measure_speed, publish

BENCH = Path(__file__).resolve().parent
SECTION = "## Long contexts and the quantized KV cache (issue 13)"
NEW_TOKENS, EVAL_TOKENS, WINDOW, CHUNK = 64, 4096, 512, 64
CACHES = {"float": "", "kv16": "+kv16", "kv8": "+kv8", "kv4": "+kv4"}
LLAMA_CACHES = {"f16": {}, "q8_0": {"type_k": "q8_0", "type_v": "q8_0"}, "q4_0": {"type_k": "q4_0", "type_v": "q4_0"}}


def _workers(weights: str, context: int) -> list[Worker]:
    made = []
    for cache, suffix in CACHES.items():
        path, _ = ensure_artifact(weights + suffix, BENCH / ".cache", rebuild=False)
        made.append(Worker(f"lowbit-{weights}-{cache}", "lowbit", path, weights=path / "weights.safetensors"))
    ggufs, _ = peers.ensure()
    for cache, options in LLAMA_CACHES.items():
        options = dict(options, n_ctx=context + NEW_TOKENS + 16, flash_attn=True, score_batch=CHUNK)
        made.append(Worker(f"llama.cpp-q4_0-cache-{cache}", "llama.cpp", ggufs["q4_0"], env=peers.env(),
                           options=options))
    return made


def _perplexities(runners: list[Worker], ids: list[int]) -> dict[str, float]:
    windows = [ids[i:i + WINDOW] for i in range(0, EVAL_TOKENS, WINDOW)]
    result = {}
    for w in runners:
        replies = [w.ask(cmd="nll", window=window, chunk=CHUNK) for window in windows]
        result[w.name] = float(np.exp(sum(r["nll"] for r in replies) / sum(r["count"] for r in replies)))
    return result


PEAK_SCRIPT = """import sys
from lowbit.compiler.cli import main
code = main(sys.argv[1:])
peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))
print(int(peak.split()[1]) / 1024, file=sys.stderr)
sys.exit(code)
"""


def _peak_rss_mb(artifact: Path, prompt: str) -> float:
    """Peak resident memory of ``lowbit run`` on ``prompt`` (a file), 64 new tokens: the command's
    own ``VmHWM`` (``wait4``'s ``ru_maxrss`` would count the pages of this process it was forked from)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as handle:
        handle.write(prompt)
    try:
        done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, "run", str(artifact), "--prompt-file", handle.name,
                               "--max-new-tokens", str(NEW_TOKENS), "--json"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"lowbit run {artifact} failed: {done.stderr}")
        return float(done.stderr.split()[-1])
    finally:
        os.unlink(handle.name)


def _peak_memory(weights: str, ids: list[int]) -> dict:
    prompt_text = _prompt_text(ids[:4032])
    return {cache: round(_peak_rss_mb(ensure_artifact(weights + suffix, BENCH / ".cache", rebuild=False)[0],
                                      prompt_text), 1) for cache, suffix in CACHES.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="w4a16-rtn-g128", help="lowbit's weight recipe (default w4a16-rtn-g128)")
    parser.add_argument("--contexts", default="128,1024,4096")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quiet-cores", type=float, default=0.25)
    parser.add_argument("--max-wait", type=float, default=300)
    parser.add_argument("--json", action="store_true", help="print the report as JSON only")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--memory-only", action="store_true", help="print the peak memory of lowbit run per cache, "
                        "as JSON, and nothing else")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    contexts = [int(c) for c in args.contexts.split(",")]
    ids = eval_ids()
    if args.memory_only:
        print(json.dumps({"machine": machine_description(), "peak_rss_mb_4032_prompt": _peak_memory(args.weights, ids)}))
        return 0
    rows, notes, perplexity = {}, {}, {}
    runners = _workers(args.weights, max(contexts))
    try:
        for context in contexts:
            kept, notes[context] = measure_speed(runners, ids[:context], args.rounds, args.quiet_cores,
                                                 args.max_wait, NEW_TOKENS)
            for name, records in kept.items():
                rows.setdefault(name, {})[context] = round(statistics.median(r[2] for r in records), 1)
        perplexity = _perplexities(runners, ids)
    finally:
        for w in runners:
            w.close()
    baselines = {name: f"lowbit-{args.weights}-float" if name.startswith("lowbit") else "llama.cpp-q4_0-cache-f16"
                 for name in rows}
    memory = _peak_memory(args.weights, ids)
    report = {"machine": machine_description(), "contexts": contexts, "new_tokens": NEW_TOKENS, "load": notes,
              "rows": [{"name": name, "decode_tokens_per_s": speeds,
                        "perplexity": round(perplexity[name], 3),
                        "perplexity_gap": round(perplexity[name] / perplexity[baselines[name]] - 1, 4),
                        "baseline": baselines[name]} for name, speeds in rows.items()],
              "peak_rss_mb_4032_prompt": memory}
    publish(report, "contexts.json", _markdown(report, argv, time.perf_counter() - started), args)
    return 0


def _prompt_text(ids: list[int]) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(peers.hf_folder() / "tokenizer.json")).decode(ids)


def _markdown(report: dict, argv, seconds: float) -> str:
    command = "python bench/contexts.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    contexts = report["contexts"]
    lines = [SECTION, "", f"`{command}` ({seconds / 60:.0f} min), {time.strftime('%Y-%m-%d')}, {lowbit_revision()}; "
             f"{report['machine']}, 2 threads.", "",
             "Decode tokens/s after a prompt of each length (median of the kept rounds), and perplexity on alice29 "
             f"({EVAL_TOKENS} tokens, windows of {WINDOW} fed in chunks of {CHUNK}) with its gap against the same "
             "side's unquantized cache:", "",
             "| runner | " + " | ".join(f"decode @ {c}" for c in contexts) + " | perplexity | gap vs own float cache |",
             "|---|" + "---:|" * (len(contexts) + 2)]
    for row in report["rows"]:
        speeds = " | ".join(f"{row['decode_tokens_per_s'][c]:.1f}" for c in contexts)
        lines.append(f"| {row['name']} | {speeds} | {row['perplexity']:.3f} | {100 * row['perplexity_gap']:+.2f} % |")
    memory = report["peak_rss_mb_4032_prompt"]
    lines += ["", "Peak resident memory of `lowbit run` (4,032-token prompt from a file, 64 new tokens): " +
              ", ".join(f"{cache} cache {mb:.0f} MB" for cache, mb in memory.items()) +
              f" (kv4 / float = {memory['kv4'] / memory['float']:.2f}).", ""]
    lines += [f"Load: {c} tokens: {note}" for c, note in report["load"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
