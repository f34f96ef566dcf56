"""Accuracy of lowbit's recipes on SmolLM2-135M: perplexity, gap, KL and top-1 vs float, bytes, time.

The model is imported and calibrated once; each recipe is quantized and built in memory and scored
on held-out text (``alice29``) with the ``lowbit eval`` protocol (non-overlapping windows scored
from an empty cache) against the fp32 build of the same import. Prints a markdown table and writes
``bench/.cache/accuracy.json``.

    python bench/bench_accuracy.py --calib-samples 64 --calib-seq-len 512 --tokens 4096 --window 512
"""

from __future__ import annotations

import no_shadowing  # noqa: F401  (first: bench/kernels.py must not pass for the kernels package)

import argparse
import json
import time
from pathlib import Path

from accuracy_table import print_table
from lowbit.compiler import CalibrationText, get_recipe, prepare
from lowbit.compiler.runtime.evaluation import evaluate_session
from lowbit.compiler.sources.texts import read_text

RECIPES = ("w8a16-rtn", "w8a8-naive", "w8a8-smoothquant", "w8a8-smoothquant:alpha=auto", "w8a8-naive-static",
           "w8a8-smoothquant-static", "w4a16-rtn-g128", "w4a16-awq-g128", "w4a16-gptq-g128",
           "w4a16-gptq-g128:stages=2", "w4a16-awq-gptq-g128", "w4a16-rtn", "w4a16-awq", "w4a16-gptq",
           "w3a16-rtn-g128", "w3a16-gptq-g128", "w4a16-rtn-g128:keep=auto10", "w4a16-rtn-g128:keep=lm_head*",
           "w4a16-rtn-g32", "w4a8-rtn-g32", "w4a8-rtn-g128", "w4a8-awq-g128", "w4a8-gptq-g128", "w4a8-awq-gptq-g128")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    args = parser.parse_args()

    prepared = prepare(args.model, max_context=max(args.window, args.calib_seq_len) + 1)
    started = time.perf_counter()
    calibration = CalibrationText("lcet10", read_text("lcet10"), args.calib_samples, args.calib_seq_len)
    prepared = prepared.calibrated(calibration, progress=True)
    calibration_seconds = time.perf_counter() - started
    ids = prepared.tokenize(read_text("alice29"))[: args.tokens + 1]

    def built(recipe: str):
        start = time.perf_counter()
        model = prepared.build(get_recipe(recipe))
        seconds = time.perf_counter() - start
        return model.session(), model.result.ir.param_bytes(), seconds

    reference, float_bytes, _ = built("fp32")
    float_ppl = evaluate_session(reference, ids, args.window).perplexity
    rows = [{"recipe": "fp32", "perplexity": float_ppl, "gap": 0.0, "weight_bytes": float_bytes}]
    print(f"fp32 {float_ppl:.3f}", flush=True)
    for recipe in args.recipes.split(","):
        session, weight_bytes, seconds = built(recipe)
        result = evaluate_session(session, ids, args.window, reference)
        rows.append(dict(result.as_dict(), recipe=recipe, gap=result.perplexity / float_ppl - 1,
                         weight_bytes=weight_bytes, quantize_seconds=round(seconds, 1)))
        print(json.dumps(rows[-1]), flush=True)
    out = {"args": vars(args), "calibration_seconds": round(calibration_seconds, 1), "rows": rows}
    Path("bench/.cache").mkdir(parents=True, exist_ok=True)
    Path("bench/.cache/accuracy.json").write_text(json.dumps(out, indent=2))
    print(f"\ncalibration {calibration_seconds:.0f} s ({args.calib_samples} x {args.calib_seq_len} tokens), "
          f"eval {len(ids) - 1} tokens of alice29, windows of {args.window}\n")
    print_table(rows, "recipe", "weight_bytes", "weight")


if __name__ == "__main__":
    main()
