"""The README's architecture coverage table, generated from test results (never written by hand).

    python bench/coverage_table.py                      # runs the tests (-n 2), then writes README.md
    python bench/coverage_table.py --junit results.xml  # from a junit xml of an earlier run
    python bench/coverage_table.py --junit results.xml --print   # the table on stdout only

Runs ``pytest tests/test_architectures.py tests/test_onnx_frontend.py --junitxml`` (or reads the
given junit xml), maps each test of tests/test_architectures.py to an architecture (its ``arch``
parameter) and a column, and writes the markdown table between ``<!-- coverage:start -->`` and
``<!-- coverage:end -->`` in README.md. A cell is ✔ when every test behind it passed, ✘ when one
failed or errored, — when they were all skipped, "✔ in part" when some passed and the others were
skipped (a footnote gives pytest's skip reason).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"
TEST_FILES = ["tests/test_architectures.py", "tests/test_onnx_frontend.py"]

# column -> the tests of tests/test_architectures.py behind it (name, and the recipe parameter if any)
COLUMNS = {
    "import": [("test_prefill_matches_transformers", None)],  # the arch fixture: export, import, fp32 build
    "fp32 parity": [("test_prefill_matches_transformers", None), ("test_greedy_decode_matches_transformers", None),
                    ("test_sliding_layers_keep_a_ring_that_matches_transformers_past_its_capacity", None)],
    "w8a16": [("test_recipe_quantizes_every_linear_and_stays_close", "w8a16-rtn")],
    "w4a16 g32": [("test_recipe_quantizes_every_linear_and_stays_close", "w4a16-rtn-g32")],
    "w8a8-sq": [("test_recipe_quantizes_every_linear_and_stays_close", "w8a8-smoothquant"),
                ("test_smoothquant_fold_leaves_the_float_model_unchanged", None)],
    "AWQ g32": [("test_recipe_quantizes_every_linear_and_stays_close", "w4a16-awq-g32"),
                ("test_awq_scaling_leaves_the_float_model_unchanged", None)],
    "GPTQ g32": [("test_recipe_quantizes_every_linear_and_stays_close", "w4a16-gptq-g32")],
    "folds exact": [("test_every_fold_target_the_graph_offers_is_exact", None)],
    "ONNX": [("test_onnx_export_compiles_and_matches_onnxruntime", None)],
}
ARCHITECTURES = {
    "llama": "Llama (GQA)", "mistral": "Mistral (sliding window)", "qwen2": "Qwen2 (q/k/v bias)",
    "qwen3": "Qwen3 (QK-norm)", "gemma2": "Gemma 2 (1 + weight norms, soft-capping, MQA)",
    "gemma3": "Gemma 3 (local/global, QK-norm)", "phi3": "Phi-3 (fused qkv / gate_up)",
    "gpt_neox": "GPT-NeoX (LayerNorm, parallel residual)", "olmo": "OLMo (LayerNorm without weights)",
    "mixtral": "Mixtral (mixture of experts)",
}
LEGEND = ("import: torch.export, Relax import and fp32 build; fp32 parity: prefill over a prompt longer than any "
          "sliding window and 8 greedy decode steps match transformers (rtol 1e-4), and so do a 300-token prompt and 8 "
          "steps past it where sliding-window layers keep their cache as a ring of the window plus one call's tokens "
          "(its slots reused); w8a16 / w4a16 g32 / w8a8-sq / "
          "AWQ g32: every linear layer quantized, mean KL against float within the test's bound (the calibrated "
          "recipes calibrated on random ids), and for w8a8-sq and AWQ their scales folded into the float model "
          "leave its logits unchanged (1e-4); GPTQ g32: every linear layer quantized by GPTQ (act-order, calibrated on "
          "random ids) within the test's KL bound; folds exact: random scales folded into every fold target the graph "
          "analysis finds leave the float logits unchanged; ONNX: the model exported by torch.onnx (dynamo) "
          "compiles and matches onnxruntime (1e-4). ✔ passed, ✘ failed, — skipped (see the note), ✔ in part: the "
          "tests that ran passed, the others were skipped (see the note), ? not run")


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """``test id -> (outcome, message)`` for every test case in ``junit``: passed, failed, error, skipped."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = child.get("message", "") or ""
                break
        result[test_id] = (outcome, message)
    return result


def _parameters(test_id: str) -> tuple[str, list[str]] | None:
    match = re.match(r"^tests\.test_architectures::(\w+)\[([^\]]+)\]$", test_id)
    return None if match is None else (match[1], match[2].split("-", 1))


def table(results: dict[str, tuple[str, str]]) -> str:
    """The markdown table, its footnotes and a line on the ONNX frontend's own tests."""
    by_arch: dict[str, dict[tuple[str, str | None], tuple[str, str]]] = {}
    for test_id, result in results.items():
        parsed = _parameters(test_id)
        if parsed is None:
            continue
        name, params = parsed
        by_arch.setdefault(params[0], {})[(name, params[1] if len(params) > 1 else None)] = result
    footnotes: list[str] = []
    rows = ["| architecture | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for arch in [a for a in ARCHITECTURES if a in by_arch] + sorted(set(by_arch) - set(ARCHITECTURES)):
        cells = []
        for column, tests in COLUMNS.items():
            found = [by_arch[arch][t] for t in tests if t in by_arch[arch]]
            if column == "import" and found and found[0][0] == "passed":
                cells.append("✔")
            elif column == "import" and found and found[0][0] == "failed":
                cells.append("✔")  # the fixture (the import) worked; the comparison failed
            elif not found:
                cells.append("?")
            elif any(outcome in ("failed", "error") for outcome, _ in found):
                cells.append("✘")
            elif any(outcome == "skipped" for outcome, _ in found):  # all skipped, or passed in part
                reason = next(re.sub(r"^Skipped:\s*", "", message).strip() or "skipped"
                              for outcome, message in found if outcome == "skipped")
                if reason not in footnotes:
                    footnotes.append(reason)
                mark = "—" if all(outcome == "skipped" for outcome, _ in found) else "✔ in part"
                cells.append(f"{mark}[^{footnotes.index(reason) + 1}]")
            else:
                cells.append("✔")
        rows.append(f"| {ARCHITECTURES.get(arch, arch)} | " + " | ".join(cells) + " |")
    onnx = [outcome for test_id, (outcome, _) in results.items() if test_id.startswith("tests.test_onnx_frontend::")]
    lines = rows + ["", LEGEND + "."]
    if onnx:
        lines += ["", "ONNX frontend (tests/test_onnx_frontend.py: a TorchScript Llama export, optimum-style exports "
                  "of Llama, Qwen2, Qwen3, Phi-3 and GPT-NeoX, ONNX Runtime contrib ops named in the error): "
                  f"{onnx.count('passed')} of {len(onnx)} passed."]
    lines += [""] + [f"[^{i}]: {reason}" for i, reason in enumerate(footnotes, 1)] if footnotes else []
    return "\n".join(lines).rstrip() + "\n"


def write_readme(readme: Path, content: str) -> None:
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        sys.exit(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{content}{END}{tail}", encoding="utf-8")


def run_tests(junit: Path) -> None:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "2", "--dist", "loadgroup",
               f"--junitxml={junit}", *TEST_FILES]
    print("running", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=False)  # failures are what the table reports


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, help="a junit xml of an earlier run (default: run the tests now)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--print", action="store_true", help="print the table instead of writing the README")
    args = parser.parse_args(argv)
    junit = args.junit
    if junit is None:
        junit = Path(tempfile.mkdtemp()) / "results.xml"
        run_tests(junit)
    content = table(outcomes(junit))
    if args.print:
        print(content)
    else:
        write_readme(args.readme, content)
        print(f"wrote the coverage table into {args.readme}")


if __name__ == "__main__":
    main()
