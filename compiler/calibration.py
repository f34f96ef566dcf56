"""Calibration: run the model's own compiled graph over real text and keep per-layer input statistics.

The prefill function is instrumented (:mod:`lowbit.passes.calibration`) to return the activations
that feed linear layers; it is built for the host like any artifact (once: :class:`Calibrator`)
and run one sample at a time, with the model's weights or with partly quantized ones.
Each sample's activations are reduced at once to running statistics (``X^T X`` with BLAS, per
channel ``max |x|`` and ``sum |x|``), so memory holds one sample's activations plus one ``[K, K]``
matrix per distinct layer input. Works the same for a torch-exported and an ONNX model.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax

from lowbit.passes.calibration import instrument_linear_inputs
from lowbit.passes.quantize_weights import QuantizeWeights

from .errors import LowbitError
from .model_ir import ModelIR, sync_params
from .recipes import Recipe

SAMPLE_ROWS = 512  # activation rows kept per layer input for error simulation


@dataclasses.dataclass
class LinearStatistics:
    """Running statistics of one linear layer's input (shared by layers reading the same input).

    GPTQ and AWQ read ``hessian()`` (GPTQ also ``split_hessians()`` to validate on held-out
    samples); SmoothQuant the per-channel magnitudes; sensitivity analysis and activation-error
    estimates the ``sample``: up to :data:`SAMPLE_ROWS` token rows drawn evenly from all
    calibration samples (a fixed seed, so results repeat).
    """

    xtx: np.ndarray  # [K, K] float64
    absmax: np.ndarray  # [K]
    abssum: np.ndarray  # [K]
    sample: np.ndarray  # [rows, K] float32
    heldout_xtx: np.ndarray  # [K, K] float64: X^T X of every second calibration sample only
    rows_per_add: int = 1
    tokens: int = 0
    heldout_tokens: int = 0
    samples: int = 0

    @classmethod
    def empty(cls, width: int, samples: int = 1) -> "LinearStatistics":
        """Statistics to be fed ``samples`` calls of :meth:`add`."""
        return cls(np.zeros((width, width)), np.zeros(width, np.float32), np.zeros(width),
                   np.zeros((0, width), np.float32), np.zeros((width, width)), max(1, SAMPLE_ROWS // max(samples, 1)))

    def add(self, rows: np.ndarray) -> None:
        """Accumulate one calibration sample's ``[tokens, K]`` rows."""
        xtx = (rows.T @ rows).astype(np.float64)
        self.xtx += xtx
        if self.samples % 2:
            self.heldout_xtx += xtx
            self.heldout_tokens += rows.shape[0]
        self.samples += 1
        magnitude = np.abs(rows)
        self.absmax = np.maximum(self.absmax, magnitude.max(axis=0))
        self.abssum += magnitude.sum(axis=0, dtype=np.float64)
        picked = np.random.default_rng(self.tokens).choice(len(rows), min(self.rows_per_add, len(rows)), replace=False)
        self.sample = np.concatenate([self.sample, rows[np.sort(picked)].astype(np.float32)])
        self.tokens += rows.shape[0]

    def hessian(self) -> np.ndarray:
        return self.xtx / max(self.tokens, 1)

    def split_hessians(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(H_fit, H_heldout)`` from disjoint halves of the samples, or ``None`` below two samples."""
        if self.heldout_tokens == 0 or self.heldout_tokens == self.tokens:
            return None
        fit = (self.xtx - self.heldout_xtx) / (self.tokens - self.heldout_tokens)
        return fit, self.heldout_xtx / self.heldout_tokens


@dataclasses.dataclass
class Calibration:
    """What calibration hands the pipeline: the statistics, and ways to measure again.

    ``recalibrate(params, layers)`` collects the statistics of ``layers`` again with other weights
    (GPTQ's stages); ``output_kl(name, weight_nk)`` measures the model's output with one weight
    replaced (the ranking of ``keep=autoN``, :mod:`lowbit.compiler.output_probe`).
    """

    statistics: dict[str, LinearStatistics]
    recalibrate: Callable[[dict, list[str]], dict[str, LinearStatistics]] | None = None
    output_kl: Callable[[str, np.ndarray], float] | None = None

    def copy(self) -> "Calibration":
        """The same, with statistics of its own (the pipeline changes them in place)."""
        return dataclasses.replace(self, statistics=copy.deepcopy(self.statistics))


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


class Calibrator:
    """The instrumented prefill, built once for the host and run over fixed calibration ``samples``.

    :meth:`collect` may run it with other weights than the model's: GPTQ's later stages collect
    their inputs with the earlier layers already quantized (see :mod:`lowbit.compiler.pipeline`).
    """

    def __init__(self, ir: ModelIR, chip, samples: list[list[int]]):
        from lowbit.codegen.build import build

        self.ir, self.chip, self.samples = ir, chip, samples
        mod, weights, self.sites = self._instrumented(ir.params)
        self.weight_names = list(weights)
        self._weights = self._on_device(weights)
        self.vm = relax.VirtualMachine(build(mod, chip), tvm.cpu())

    def _instrumented(self, params: dict[str, np.ndarray]):
        calibrate, sites = instrument_linear_inputs(self.ir.mod["prefill"])
        params = dict(params)
        mod = QuantizeWeights(Recipe("fp32"), params, self.chip.linear_tile)(tvm.IRModule({"calibrate": calibrate}))
        mod = relax.transform.DeadCodeElimination(["calibrate"])(mod)
        mod, params = sync_params(mod, params)
        return mod, params, sites

    @staticmethod
    def _on_device(weights: dict[str, np.ndarray]) -> list:
        return [tvm.runtime.tensor(v, tvm.cpu()) for v in weights.values()]

    def collect(self, params: dict[str, np.ndarray] | None = None, layers=None,
                progress=None) -> dict[str, LinearStatistics]:
        """Statistics of the inputs of ``layers`` (weight names; default every linear layer) over the
        samples, keyed by weight name, with ``params`` (default the model's) as the weights."""
        weights = self._weights
        if params is not None:
            _, variant, _ = self._instrumented(params)
            if list(variant) != self.weight_names:
                raise LowbitError("calibration: the replacement weights do not match the model's parameters")
            weights = self._on_device(variant)
        wanted = [i for i, site in enumerate(self.sites) if layers is None or set(site.weights) & set(layers)]
        stats = {i: LinearStatistics.empty(self.sites[i].width, len(self.samples)) for i in wanted}
        device = tvm.cpu()
        empty = np.zeros((1, self.ir.kv.num_kv_heads, 0, self.ir.kv.head_dim), np.float32)
        cache = [tvm.runtime.tensor(empty, device) for _ in range(2 * self.ir.kv.num_layers)]
        for sample in self.samples:
            ids = tvm.runtime.tensor(np.asarray([sample], np.int64), device)
            outputs = self.vm["calibrate"](ids, *cache, *weights)
            for i in wanted:
                rows = outputs[i].numpy()
                if not np.isfinite(rows).all():
                    raise LowbitError(f"calibration: the input of layer {self.sites[i].weights[0]} has NaN or Inf "
                                      "values; check the model's weights")
                stats[i].add(rows)
            if progress is not None:
                progress.update(1)
        return {name: stat for i, stat in stats.items() for name in self.sites[i].weights}


def collect_statistics(ir: ModelIR, chip, samples: list[list[int]], progress=None) -> dict[str, LinearStatistics]:
    """Statistics of every linear layer's input over ``samples``, keyed by weight name."""
    return Calibrator(ir, chip, samples).collect(progress=progress)
