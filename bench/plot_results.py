"""Draw bench/e2e.py's and bench/kernels.py's last results as one PNG: tokens/s per runner, kernel
time against the peer's.

Reads ``bench/.cache/e2e.json`` and ``bench/.cache/kernels.json``; writes ``bench/results.png``.
matplotlib is a bench-only tool, installed by ``bench/peers.py`` into ``bench/.cache/plot``; run
this script on that path::

    PYTHONPATH=bench/.cache/plot python bench/plot_results.py
"""

from __future__ import annotations

import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = json.loads((BENCH / ".cache" / "e2e.json").read_text())
    kernels = json.loads((BENCH / ".cache" / "kernels.json").read_text())
    rows = sorted(e2e["rows"], key=lambda r: r["decode_tokens_per_s"])
    figure, (speed, kernel) = plt.subplots(1, 2, figsize=(15, 6.5))
    names = [r["name"] for r in rows]
    colors = ["tab:blue" if n.startswith("lowbit") else "tab:gray" for n in names]
    positions = range(len(rows))
    speed.barh([p + 0.2 for p in positions], [r["decode_tokens_per_s"] for r in rows], 0.4, color=colors,
               label="decode")
    speed.barh([p - 0.2 for p in positions], [r["prefill_tokens_per_s"] / 10 for r in rows], 0.4, color=colors,
               alpha=0.45, label="prefill / 10")
    speed.set_yticks(list(positions), [f"{n} ({100 * r['perplexity_gap']:+.0f} %)" if r["perplexity_gap"] is not None
                                       else n for n, r in zip(names, rows)], fontsize=8)
    speed.set_xlabel("tokens/s (prefill divided by 10); perplexity gap in brackets")
    speed.set_title("SmolLM2-135M end to end, 2 threads")
    speed.legend(loc="lower right")
    krows = kernels["rows"]
    knames = [r["name"] for r in krows]
    kpos = range(len(krows))
    kernel.barh([p + 0.2 for p in kpos], [r["lowbit_ms"] for r in krows], 0.4, color="tab:blue", label="lowbit")
    kernel.barh([p - 0.2 for p in kpos], [r["peer_ms"] for r in krows], 0.4, color="tab:gray", label="ONNX Runtime")
    kernel.set_xscale("log")
    kernel.set_yticks(list(kpos), knames, fontsize=8)
    kernel.set_xlabel("ms per call (log scale); GEMVs cold")
    kernel.set_title(f"kernels (DRAM read {kernels['dram_GBps']} GB/s)")
    kernel.legend(loc="lower right")
    figure.suptitle(e2e["machine"], fontsize=9)
    figure.tight_layout()
    figure.savefig(BENCH / "results.png", dpi=110)
    print(f"wrote {BENCH / 'results.png'}")


if __name__ == "__main__":
    main()
