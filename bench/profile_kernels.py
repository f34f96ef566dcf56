"""Where a prefill's or a decode step's time goes: seconds per kernel of lowbit on SmolLM2-135M.

Builds the model in memory with a recipe, then times, for ``--phase prefill``, one prefill of
``--tokens`` tokens as generation runs it (``Session.feed``: prompt chunks, the output head on the
last position only; after a warm-up), or for ``--phase decode``, ``--steps`` decode steps after a
prefill of ``--tokens``. Prints the wall time without instrumentation, then with a VM instrument
that times every kernel call: the kernels' sum and the slowest kernels (summed over the layers).
Wall time minus the kernels' sum is the per-call overhead outside the kernels (VM dispatch,
allocation, Python), which is what a fused decode graph removes.

    python bench/profile_kernels.py --recipe fp32 --tokens 256
    python bench/profile_kernels.py --recipe w4a16-rtn-g128 --phase decode --tokens 64 --steps 64
"""

from __future__ import annotations

import no_shadowing  # noqa: F401  (first: bench/kernels.py must not pass for the kernels package)

import argparse
import collections
import time

import numpy as np

from lowbit.compiler import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="fp32")
    parser.add_argument("--phase", choices=("prefill", "decode"), default="prefill")
    parser.add_argument("--tokens", type=int, default=256, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=64, help="decode steps (--phase decode)")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    session = build(args.model, args.recipe, progress=False).session()
    ids = np.arange(100, 100 + args.tokens)

    tokens = args.tokens if args.phase == "prefill" else args.steps

    def measure(before=lambda: None) -> float:
        """Seconds of the measured part: the prefill, or the decode steps after a new prefill;
        ``before`` runs just ahead of the timed part (clearing the instrument's counters)."""
        if args.phase == "decode":
            session.prefill(ids)
        before()
        start = time.perf_counter()
        if args.phase == "prefill":
            session.reset()
            session.feed(ids)  # as generation prefills: the head on the last position only
        else:
            for step in range(args.steps):
                session.decode(200 + step)
        return time.perf_counter() - start

    measure()  # warm-up
    wall = min(measure() for _ in range(3))

    seconds: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    started: dict[str, float] = {}

    def instrument(_func, name, before_run, _ret, *_args):
        if before_run:
            started[name] = time.perf_counter()
        else:
            seconds[name] += time.perf_counter() - started[name]
            calls[name] += 1
        return 0

    # prefill runs on its own VM (naive allocator: a prompt's shapes vary), decode on the pooled one
    (session._prefill_vm if args.phase == "prefill" else session._vm).set_instrument(instrument)
    instrumented = measure(before=lambda: (seconds.clear(), calls.clear()))
    kernels = sum(seconds.values())
    unit = "token" if args.phase == "decode" else "prefill"
    per = tokens if args.phase == "decode" else 1
    print(f"{args.recipe} {args.phase}: {tokens} tokens in {wall:.3f} s ({tokens / wall:.1f} tokens/s), "
          f"{1e3 * wall / per:.2f} ms per {unit} (best of 3, no instrument)")
    print(f"instrumented: {1e3 * instrumented / per:.2f} ms per {unit}; kernels {1e3 * kernels / per:.2f} ms "
          f"in {sum(calls.values()) // per} calls per {unit}; outside kernels {1e3 * (wall - kernels) / per:.2f} ms")
    print(f"| kernel | calls per {unit} | ms per {unit} | share of wall |\n|---|---:|---:|---:|")
    for name, value in seconds.most_common(args.top):
        print(f"| {name} | {calls[name] // per} | {1e3 * value / per:.3f} | {100 * value / wall:.0f} % |")


if __name__ == "__main__":
    main()
