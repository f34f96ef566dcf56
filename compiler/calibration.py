"""Calibration: run the model's own compiled graph over real text and keep per-layer input statistics.

The prefill function is instrumented (:mod:`lowbit.passes.instrument`) to return the activations
that feed linear layers; it is built **for the host**, whatever chip the artifact is for (once:
:class:`Calibrator`), and run one sample at a time, with the model's weights or with partly
quantized ones. Each sample's activations are reduced at once to running statistics
(:class:`~lowbit.passes.statistics.LinearStatistics`: ``X^T X`` with BLAS, per channel ``max |x|``
and ``sum |x|``), so memory holds one sample's activations plus one ``[K, K]`` matrix per distinct
layer input. Works the same for a torch-exported and an ONNX model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax

from lowbit.codegen.errors import LowbitError
from lowbit.passes.instrument import instrument_linear_inputs
from lowbit.passes.model_ir import ModelIR, sync_params
from lowbit.passes.quantize_linears import QuantizeLinears
from lowbit.passes.recipe import Recipe
from lowbit.passes.statistics import LinearStatistics
from lowbit.targets import build, get_target

from .runtime.threads import use_available_cores


@dataclasses.dataclass(frozen=True)
class CalibrationText:
    """Calibration input, read and checked before the model loads: ``samples`` windows of
    ``seq_len`` tokens from the start of ``text`` (named ``name``); the end-to-end probe of
    ``keep=autoN`` scores the first ``probe_tokens`` of them."""

    name: str
    text: str
    samples: int = 64
    seq_len: int = 512
    probe_tokens: int = 256


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

    def __init__(self, ir: ModelIR, samples: list[list[int]]):
        use_available_cores()
        self.ir, self.samples = ir, samples
        self.host = get_target("host")
        mod, weights, self.sites = self._instrumented(ir.params)
        self.weight_names = list(weights)
        self._weights = self._on_device(weights)
        self.vm = relax.VirtualMachine(build(mod, self.host), tvm.cpu())

    def _instrumented(self, params: dict[str, np.ndarray]):
        calibrate, sites = instrument_linear_inputs(self.ir.mod["prefill"])
        quantize = QuantizeLinears(Recipe("fp32"), params, self.host)
        kernels = {gv: f for gv, f in self.ir.mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
        mod = quantize(tvm.IRModule({**kernels, "calibrate": calibrate}))  # kernels: some importers' PrimFuncs
        mod = relax.transform.DeadCodeElimination(["calibrate"])(mod)
        mod, params = sync_params(mod, quantize.params)
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
