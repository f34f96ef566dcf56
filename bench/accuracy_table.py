"""The markdown table both accuracy benches print (lowbit's recipes, and peer quantizers)."""

from __future__ import annotations


def print_table(rows: list[dict], label: str, size_key: str, size_label: str) -> None:
    """One line per row: ``recipe``, ``perplexity``, ``gap``, optional ``kl_vs_float`` /
    ``top1_agreement`` / ``quantize_seconds``, and the size in bytes under ``size_key``."""
    print(f"| {label} | PPL | gap | KL vs float | top-1 agreement | {size_label} MB | quantize s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        kl = f"{row['kl_vs_float']:.4f}" if "kl_vs_float" in row else "-"
        top1 = f"{100 * row['top1_agreement']:.1f} %" if "top1_agreement" in row else "-"
        print(f"| {row['recipe']} | {row['perplexity']:.3f} | {100 * row['gap']:+.2f} % | {kl} | {top1} | "
              f"{row[size_key] / 1e6:.1f} | {row.get('quantize_seconds', '-')} |")
