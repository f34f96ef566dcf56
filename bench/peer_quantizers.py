"""Peer quantizer on the same evaluation protocol: ONNX Runtime's MatMulNBits weight-only quantizer.

SmolLM2-135M (lowbit's fp32 conversion) is exported to ONNX without a KV cache (input_ids ->
logits), quantized by ``onnxruntime.quantization.matmul_nbits_quantizer`` (4-bit, RTN with
``block_size`` 128, symmetric and asymmetric; HQQ), and scored by onnxruntime on the ``lowbit eval``
protocol (alice29, non-overlapping windows scored from scratch) against the float export: perplexity,
gap, mean KL vs float, top-1 agreement. Prints a markdown table; writes ``bench/.cache/peer.json``.

    python bench/peer_quantizers.py --tokens 4096 --window 512
"""

from __future__ import annotations

import no_shadowing  # noqa: F401  (first: bench/kernels.py must not pass for the kernels package)

import argparse
import json
import time
from pathlib import Path
from unittest import mock

import numpy as np

from accuracy_table import print_table
from lowbit.compiler.sources.texts import read_text
from lowbit.compiler.runtime.evaluation import evaluate_session
from lowbit.compiler.sources.models import resolve_model

CACHE = Path("bench/.cache/peer")


class OrtSession:
    """``prefill(ids)`` for :func:`lowbit.compiler.runtime.evaluation.evaluate_session`, from an ONNX file."""

    def __init__(self, path: Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def prefill(self, ids) -> np.ndarray:
        return self.session.run(["logits"], {"input_ids": np.asarray([ids], np.int64)})[0][0]


def export(model, path: Path) -> Path:
    import torch

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)

    class LogitsOnly(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            # an explicit mask and positions keep transformers off its packed-sequence detection
            # (aten::diff, which the TorchScript exporter lacks)
            positions = torch.arange(input_ids.shape[1])[None]
            return self.lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=positions,
                           use_cache=False).logits

    # the TorchScript exporter traces shapes as tensors, which torch._check rejects; skip the checks
    with mock.patch.object(torch, "_check", lambda *args, **kwargs: None), torch.no_grad():
        torch.onnx.export(LogitsOnly(model.eval()), (torch.arange(8).reshape(1, 8),), str(path),
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {1: "seq"}, "logits": {1: "seq"}}, opset_version=17,
                          dynamo=False)
    return path


def quantize(source: Path, method: str) -> tuple[Path, float]:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    out = CACHE / f"smollm2-{method}.onnx"
    started = time.perf_counter()
    if method == "hqq":
        config = mnb.HQQWeightOnlyQuantConfig(block_size=128, bits=4)
    else:
        config = mnb.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=method == "rtn-sym",
                                                  accuracy_level=4)
    quantizer = mnb.MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return out, time.perf_counter() - started


def main() -> None:
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--methods", default="rtn-sym,rtn-asym,hqq")
    args = parser.parse_args()
    source = resolve_model("smollm2-135m")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(source.folder / "tokenizer.json")).encode(read_text("alice29")).ids
    ids = ids[: args.tokens + 1]
    float_path = export(source.model, CACHE / "smollm2-fp32.onnx")
    reference = OrtSession(float_path)
    float_ppl = evaluate_session(reference, ids, args.window).perplexity
    rows = [{"recipe": "ORT fp32", "perplexity": float_ppl, "gap": 0.0, "bytes": float_path.stat().st_size}]
    for method in args.methods.split(","):
        path, seconds = quantize(float_path, method)
        result = evaluate_session(OrtSession(path), ids, args.window, reference)
        rows.append(dict(result.as_dict(), recipe=f"ORT MatMulNBits {method} b128", gap=result.perplexity / float_ppl - 1,
                         bytes=path.stat().st_size, quantize_seconds=round(seconds, 1)))
        print(json.dumps(rows[-1]), flush=True)
    (CACHE / "peer.json").write_text(json.dumps({"onnxruntime": onnxruntime.__version__, "args": vars(args),
                                                 "rows": rows}, indent=2))
    print(f"\nonnxruntime {onnxruntime.__version__}; eval {len(ids) - 1} tokens of alice29, windows of {args.window}\n")
    print_table(rows, "quantizer", "bytes", "model")


if __name__ == "__main__":
    main()
