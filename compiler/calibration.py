"""Calibration: run the model's own compiled graph over real text and keep per-layer input statistics.

The prefill function is instrumented (:mod:`lowbit.passes.calibration`) to return the activations
that feed linear layers; it is built for the host like any artifact and run one sample at a time.
Each sample's activations are reduced at once to running statistics (``X^T X`` with BLAS, per
channel ``max |x|`` and ``sum |x|``), so memory holds one sample's activations plus one ``[K, K]``
matrix per distinct layer input. Works the same for a torch-exported and an ONNX model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from lowbit.passes.calibration import instrument_linear_inputs
from lowbit.passes.quantize_weights import QuantizeWeights

from .errors import LowbitError
from .model_ir import ModelIR, sync_params
from .recipes import Recipe


@dataclasses.dataclass
class LinearStatistics:
    """Running statistics of one linear layer's input (shared by layers reading the same input).

    GPTQ reads ``hessian()``; the per-channel magnitudes are kept for activation-aware methods.
    """

    xtx: np.ndarray  # [K, K] float64
    absmax: np.ndarray  # [K]
    abssum: np.ndarray  # [K]
    tokens: int = 0

    @classmethod
    def empty(cls, width: int) -> "LinearStatistics":
        return cls(np.zeros((width, width)), np.zeros(width, np.float32), np.zeros(width))

    def add(self, rows: np.ndarray) -> None:
        self.xtx += (rows.T @ rows).astype(np.float64)
        magnitude = np.abs(rows)
        self.absmax = np.maximum(self.absmax, magnitude.max(axis=0))
        self.abssum += magnitude.sum(axis=0, dtype=np.float64)
        self.tokens += rows.shape[0]

    def hessian(self) -> np.ndarray:
        return self.xtx / max(self.tokens, 1)


def calibration_samples(token_ids: list[int], samples: int, length: int) -> list[list[int]]:
    """``samples`` non-overlapping windows of ``length`` tokens from the start of the text."""
    if length < 2:
        raise LowbitError(f"calibration sample length must be at least 2 tokens, got {length}")
    available = len(token_ids) // length
    if available == 0:
        raise LowbitError(
            f"calibration text has {len(token_ids)} tokens, shorter than one sample of {length}; "
            "give more text or a shorter --calib-seq-len"
        )
    return [token_ids[i * length:(i + 1) * length] for i in range(min(samples, available))]


def collect_statistics(ir: ModelIR, chip, samples: list[list[int]], progress=None) -> dict[str, LinearStatistics]:
    """Statistics of every linear layer's input over ``samples``, keyed by weight name."""
    from lowbit.codegen.build import build

    calibrate, sites = instrument_linear_inputs(ir.mod["prefill"])
    params = dict(ir.params)
    mod = QuantizeWeights(Recipe("fp32"), params, chip.linear_tile)(tvm.IRModule({"calibrate": calibrate}))
    mod = relax.transform.DeadCodeElimination(["calibrate"])(mod)
    mod, params = sync_params(mod, params)
    vm = relax.VirtualMachine(build(mod, chip), tvm.cpu())
    device = tvm.cpu()
    weights = [tvm.runtime.tensor(v, device) for v in params.values()]
    empty = np.zeros((1, ir.kv.num_kv_heads, 0, ir.kv.head_dim), np.float32)
    cache = [tvm.runtime.tensor(empty, device) for _ in range(2 * ir.kv.num_layers)]
    stats = [LinearStatistics.empty(site.width) for site in sites]
    for sample in samples:
        ids = tvm.runtime.tensor(np.asarray([sample], np.int64), device)
        outputs = vm["calibrate"](ids, *cache, *weights)
        for site, stat, output in zip(sites, stats, outputs):
            rows = output.numpy()
            if not np.isfinite(rows).all():
                raise LowbitError(f"calibration: the input of layer {site.weights[0]} has NaN or Inf values; "
                                  "check the model's weights")
            stat.add(rows)
        if progress is not None:
            progress.update(1)
    return {name: stat for site, stat in zip(sites, stats) for name in site.weights}
