"""End to end, side by side in one run: lowbit artifacts against llama.cpp, ONNX Runtime GenAI and torch.

SmolLM2-135M, a 64-token prompt (the start of the evaluation text), 128 greedy new tokens (each
runner feeds back the argmax of its own logits and ignores end-of-sequence), 2 threads everywhere.
Every runner lives in its own process (:mod:`e2e_runner`) with its model loaded; rounds take the
runners in turn, so background load hits them alike, and a run counts only when other processes
used under ``--quiet-cores`` meanwhile (after ``--max-wait`` seconds the least disturbed runs are
kept, and the report says so). Reported: median (min-max) prefill and decode tokens/s; perplexity on
alice29 (4,096 tokens, non-overlapping windows of 512, each from an empty cache) and its gap against
torch fp32 on the same protocol; weight bytes on disk.

Peers come from :mod:`peers` (their own cached install, never lowbit's dependencies); lowbit's
artifacts are compiled once into ``bench/.cache`` per recipe and source hash (compile seconds are
reported when compiled in this run).

    python bench/e2e.py [--json] [--recipes fp32,w4a16-rtn-g128,w4a8-rtn-g128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import peers
from bench_spine import CpuLoad, ensure_artifact, l3_bytes, lowbit_revision, machine_description, write_results

BENCH = Path(__file__).resolve().parent
SECTION = "## End to end with the peers (issue 11)"
RECIPES = ("fp32", "w8a16-rtn", "w4a16-rtn-g128", "w4a8-rtn-g128", "w4a8-rtn-g32", "w4a8-awq-gptq-g128")
PROMPT_TOKENS, NEW_TOKENS, EVAL_TOKENS, WINDOW = 64, 128, 4096, 512


class Worker:
    """A runner process (:mod:`e2e_runner`)."""

    def __init__(self, name: str, kind: str, path: Path, env: dict | None = None, weights: Path | None = None,
                 options: dict | None = None):
        self.name, self.path = name, path
        self.weights_mb = _size(weights or path) / 1e6
        command = [sys.executable, str(BENCH / "e2e_runner.py"), kind, str(path)] + (
            [json.dumps(options)] if options else [])
        self.process = subprocess.Popen(command,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"runner {self.name} died (exit {self.process.wait()})")
        return json.loads(line)

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        try:
            self.ask(cmd="quit")
        except (BrokenPipeError, SystemExit):
            pass
        self.process.wait(timeout=30)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".onnx", ".data", ".gguf", ".bin"))


def workers(recipes, with_peers: bool) -> tuple[list[Worker], dict]:
    compile_s = {}
    made = []
    for recipe in recipes:
        path, seconds = ensure_artifact(recipe, BENCH / ".cache", rebuild=False)
        if seconds is not None:
            compile_s[recipe] = seconds
        made.append(Worker(f"lowbit-{recipe}", "lowbit", path, weights=path / "weights.safetensors"))
    if with_peers:
        ggufs, ort_models = peers.ensure()
        made.append(Worker("torch-fp32", "torch", peers.hf_folder(), env=peers.env()))
        for kind, path in ggufs.items():
            made.append(Worker(f"llama.cpp-{kind}", "llama.cpp", path, env=peers.env()))
        for kind, path in ort_models.items():
            name = {"int4-b128": "ort-genai-int4", "int4-b32": "ort-genai-int4-b32", "fp32": "ort-genai-fp32"}[kind]
            made.append(Worker(name, "ort-genai", path, env=peers.env()))
    return made, compile_s


def eval_ids() -> list[int]:
    from tokenizers import Tokenizer

    from lowbit.compiler.sources.texts import read_text

    tokenizer = Tokenizer.from_file(str(peers.hf_folder() / "tokenizer.json"))
    return tokenizer.encode(read_text("alice29")).ids


def measure_speed(runners: list[Worker], prompt: list[int], rounds: int, quiet_cores: float, max_wait: float,
                  new: int = NEW_TOKENS):
    """Interleaved rounds of a prefill of ``prompt`` then ``new`` decode steps; returns per runner the
    kept (load, prefill tok/s, decode tok/s) and a load note."""
    records = {w.name: [] for w in runners}
    started = time.monotonic()
    for w in runners:  # warm-up
        w.ask(cmd="speed", prompt=prompt, new=16)
    while True:
        for w in runners:
            time.sleep(0.2)  # let the previous runner's threads go idle
            w.ask(cmd="speed", prompt=prompt[:8], new=4)  # untimed: its weights back in cache, its threads awake
            probe, before = CpuLoad(), w.cpu_seconds()
            reply = w.ask(cmd="speed", prompt=prompt, new=new)
            wall = reply["prefill_s"] + reply["decode_s"]
            others = max((probe.others_cores() or 0.0) - (w.cpu_seconds() - before) / max(wall, 1e-9), 0.0)
            records[w.name].append((others, len(prompt) / reply["prefill_s"], new / reply["decode_s"]))
        done = len(records[runners[0].name])
        quiet = min(sum(r[0] < quiet_cores for r in recs) for recs in records.values())
        if done >= rounds and (quiet >= rounds or time.monotonic() - started > max_wait):
            break
    kept, all_quiet = {}, quiet >= rounds
    for name, recs in records.items():
        calm = [r for r in recs if r[0] < quiet_cores]
        kept[name] = calm if len(calm) >= rounds else sorted(recs)[:rounds]
    loads = [r[0] for recs in kept.values() for r in recs]
    note = (f"{done} rounds; other processes used {np.mean(loads):.2f} cores on average (at most {max(loads):.2f}) "
            f"during the kept runs; " + ("all kept runs were quiet" if all_quiet else
                                           "**the machine never got quiet: the least disturbed runs were kept**"))
    return kept, note


def perplexities(runners: list[Worker], ids: list[int]) -> dict[str, float]:
    windows = [ids[i:i + WINDOW] for i in range(0, EVAL_TOKENS, WINDOW)]
    result = {}
    for w in runners:
        try:
            replies = [w.ask(cmd="nll", window=window) for window in windows]
            result[w.name] = float(np.exp(sum(r["nll"] for r in replies) / sum(r["count"] for r in replies)))
        except SystemExit as exc:
            print(f"  {w.name}: no perplexity ({exc})", file=sys.stderr)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--quiet-cores", type=float, default=0.25)
    parser.add_argument("--max-wait", type=float, default=600)
    parser.add_argument("--json", action="store_true", help="print {\"rows\": [...]} only")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    runners, compile_s = workers(args.recipes.split(","), not args.no_peers)
    try:
        ids = eval_ids()
        speeds, note = measure_speed(runners, ids[:PROMPT_TOKENS], args.rounds, args.quiet_cores, args.max_wait)
        ppl = perplexities(runners, ids)
    finally:
        for w in runners:
            w.close()
    reference = ppl.get("torch-fp32", ppl.get("lowbit-fp32"))
    rows = []
    for w in runners:
        prefill = [r[1] for r in speeds[w.name]]
        decode = [r[2] for r in speeds[w.name]]
        rows.append({
            "name": w.name, "weights_mb": round(w.weights_mb, 1),
            "decode_tokens_per_s": round(statistics.median(decode), 1),
            "decode_range": [round(min(decode), 1), round(max(decode), 1)],
            "prefill_tokens_per_s": round(statistics.median(prefill), 1),
            "prefill_range": [round(min(prefill), 1), round(max(prefill), 1)],
            "perplexity": round(ppl[w.name], 3) if w.name in ppl else None,
            "perplexity_gap": round(ppl[w.name] / reference - 1, 4) if w.name in ppl and reference else None,
        })
    report = {"rows": rows, "compile_seconds": compile_s, "machine": machine_description(), "load": note}
    publish(report, "e2e.json", _markdown(report, argv, time.perf_counter() - started), args)
    return 0


def publish(report: dict, cache_name: str, text: str, args) -> None:
    """Keep ``report`` in ``bench/.cache/cache_name``; print it as JSON (``--json``) or ``text``, and
    write ``text`` into RESULTS.md unless ``--no-write``."""
    (BENCH / ".cache").mkdir(exist_ok=True)
    (BENCH / ".cache" / cache_name).write_text(json.dumps(report, indent=2))
    print(json.dumps(report) if args.json else text)
    if not args.no_write:
        write_results(text)


def _markdown(report: dict, argv, seconds: float) -> str:
    command = "python bench/e2e.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    lines = [SECTION, "", "![tokens/s per runner and kernel times](results.png) "
             "(`PYTHONPATH=bench/.cache/plot python bench/plot_results.py`)", "",
             f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}. Machine: "
             f"{report['machine']}. {lowbit_revision()}. Peers: {peers.LLAMA_CPP} (built from its sdist, native, "
             f"AMX off), {peers.ORT_GENAI[0]}.", "", f"Command: `{command}`", "",
             f"SmolLM2-135M, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy new tokens, 2 threads; medians "
             f"(min-max) of the kept interleaved rounds. Perplexity: alice29, {EVAL_TOKENS} tokens, windows of "
             f"{WINDOW}; gap against torch fp32.", "",
             "| runner | decode tok/s | prefill tok/s | perplexity | gap | weights MB |", "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(report["rows"], key=lambda r: -r["decode_tokens_per_s"]):
        gap = "" if r["perplexity_gap"] is None else f"{100 * r['perplexity_gap']:+.1f} %"
        ppl = "" if r["perplexity"] is None else f"{r['perplexity']:.3f}"
        lines.append(f"| {r['name']} | {r['decode_tokens_per_s']:.1f} ({r['decode_range'][0]:.0f}-"
                     f"{r['decode_range'][1]:.0f}) | {r['prefill_tokens_per_s']:.0f} ({r['prefill_range'][0]:.0f}-"
                     f"{r['prefill_range'][1]:.0f}) | {ppl} | {gap} | {r['weights_mb']:.0f} |")
    lines += ["", f"Background load: {report['load']}."]
    if report["compile_seconds"]:
        lines.append("Compiled in this run: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["compile_seconds"].items())
                     + " (2 cores, while nothing else ran).")
    lines.append(f"Whole run: {seconds:.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
