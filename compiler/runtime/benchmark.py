"""Prefill and decode speed of a loaded artifact, as llama-bench reports it: tokens/s, medians of repeats.

Each repeat starts a new conversation: one prefill of ``prompt_tokens`` tokens, then ``new_tokens``
decode steps, each fed the greedy token of the step before (end-of-sequence tokens are fed like any
other, so every repeat decodes the same number of steps). The prompt is the start of the bundled
evaluation text when the artifact has a tokenizer, else fixed token ids. Warm-up repeats run first
and are not counted. The same two rates are what ``lowbit run --json`` reports for one generation.
"""

from __future__ import annotations

import platform
import statistics
import time

import numpy as np

from lowbit.codegen.errors import LowbitError
from .threads import kernel_threads


def benchmark(session, prompt_tokens: int = 64, new_tokens: int = 128, repeats: int = 5, warmup: int = 1) -> dict:
    """Median (min, max) prefill and decode tokens/s of ``session`` over ``repeats`` repeats."""
    if prompt_tokens + new_tokens > session.max_context:
        raise LowbitError(f"{prompt_tokens} prompt tokens plus {new_tokens} new tokens exceed the context of "
                          f"{session.max_context} tokens of {session.where}; lower --prompt-tokens or --new-tokens")
    prompt = _prompt(session, prompt_tokens)
    prefill, decode = [], []
    for repeat in range(warmup + repeats):
        start = time.perf_counter()
        logits = session.prefill(prompt)[-1]
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = session.decode(int(np.argmax(logits)))
        decode_s = time.perf_counter() - start
        if repeat >= warmup:
            prefill.append(prompt_tokens / prefill_s)
            decode.append(new_tokens / decode_s)
    return {
        "artifact": session.where,  # the command line puts the path it was given here
        "recipe": session.manifest["recipe"]["name"],
        "target": session.manifest["target"]["name"],
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": kernel_threads(),
        "cpu": _cpu_model(),
        "prefill_tokens_per_s": _summary(prefill),
        "decode_tokens_per_s": _summary(decode),
    }


def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "all": [round(v, 2) for v in values]}


def _prompt(session, count: int) -> list[int]:
    if session.tokenizer is not None:
        from ..sources.texts import DEFAULT_EVAL_TEXT, read_text

        ids = session.encode(read_text(DEFAULT_EVAL_TEXT))
        if len(ids) >= count:
            return ids[:count]
    return [(7 * i + 11) % session.vocab_size for i in range(count)]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
