"""Where a prefill's time goes: seconds per kernel of one lowbit prefill on SmolLM2-135M.

Builds the model in memory with a recipe, runs one warm-up prefill of ``--tokens`` tokens, then one
more with a VM instrument that times every kernel call, and prints the total and the slowest
kernels (summed over the 30 layers).

    python bench/profile_prefill.py --recipe fp32 --tokens 256
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np

from lowbit.compiler import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="fp32")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()

    session = build(args.model, args.recipe, progress=False).session()
    ids = np.arange(100, 100 + args.tokens)
    session.prefill(ids)  # warm-up

    seconds: collections.Counter = collections.Counter()
    started: dict[str, float] = {}

    def instrument(_func, name, before_run, _ret, *_args):
        if before_run:
            started[name] = time.perf_counter()
        else:
            seconds[name] += time.perf_counter() - started[name]
        return 0

    session._vm.set_instrument(instrument)
    start = time.perf_counter()
    session.prefill(ids)
    total = time.perf_counter() - start
    print(f"{args.recipe}: prefill of {args.tokens} tokens {total:.3f} s ({args.tokens / total:.0f} tokens/s)")
    print("| kernel | s | share |\n|---|---:|---:|")
    for name, value in seconds.most_common(args.top):
        print(f"| {name} | {value:.3f} | {100 * value / total:.0f} % |")


if __name__ == "__main__":
    main()
