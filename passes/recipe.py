"""A quantization recipe as data: what to do to a model's weights and activations, validated.

The dataclasses here are what the passes read; ``lowbit.compiler.recipes`` parses recipe names and
TOML files into them, and :mod:`lowbit.passes.schemes` turns their weight and activation parts into
the scheme that stores and computes each linear layer. Constructing one validates it: a bad field
raises a :class:`LowbitError` naming it.
"""

from __future__ import annotations

import dataclasses
import fnmatch

from lowbit.codegen.attention import TILE as KV_TILE
from lowbit.codegen.errors import LowbitError

SUPPORTED_BITS = (3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
SUPPORTED_METHODS = ("rtn", "gptq", "awq", "awq-gptq")
ACT_GRANULARITIES = ("token", "tensor", "group")
MAX_STAGES = 64


def _check_field(owner: str, field: str, value, kinds: tuple, what: str) -> None:
    """Raise naming ``owner.field`` unless ``value`` is one of ``kinds`` (a bool is not a number)."""
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise LowbitError(f"recipe: {owner} {field} must be {what}, got {type(value).__name__} {value!r}")


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """How linear-layer weights are quantized.

    Attributes:
        bits: 3, 4 or 8.
        group_size: input channels sharing one scale; ``None`` means one scale per output channel.
        symmetric: symmetric (scale only) or asymmetric (scale and zero point).
        method: ``rtn`` (round to nearest), ``gptq`` (error feedback through calibration Hessians),
            ``awq`` (activation-aware scaling and clipping, then round to nearest) or ``awq-gptq``
            (AWQ's scaling and clipping, then GPTQ's rounding).
        act_order: GPTQ only: quantize columns by decreasing activation energy (static groups);
            ``None`` (the default) means on for GPTQ. Without it, the few massive activation
            channels of an LLM dominate the Hessian and GPTQ, while lowering each layer's
            calibration error, leaves the model worse than RTN (bench/RESULTS.md).
        damp: GPTQ only: Hessian dampening as a fraction of its mean diagonal.
        stages: GPTQ only: the layers, in graph order, are quantized in this many stages, and each
            stage after the first is calibrated again with the earlier stages' weights quantized,
            so later layers correct for the error of earlier ones (one calibration pass per stage).
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    method: str = "rtn"
    act_order: bool | None = None
    damp: float = 0.01
    stages: int = 1

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"

    @property
    def scales_by_awq(self) -> bool:
        return self.method in ("awq", "awq-gptq")

    @property
    def rounds_by_gptq(self) -> bool:
        return self.method in ("gptq", "awq-gptq")

    def __post_init__(self):
        _check_field("weights", "bits", self.bits, (int,), "a whole number")
        _check_field("weights", "group_size", self.group_size, (int, type(None)), "a whole number or none")
        _check_field("weights", "symmetric", self.symmetric, (bool,), "true or false")
        _check_field("weights", "method", self.method, (str,), "a method name")
        _check_field("weights", "act_order", self.act_order, (bool, type(None)), "true or false")
        _check_field("weights", "damp", self.damp, (int, float), "a number")
        _check_field("weights", "stages", self.stages, (int,), "a whole number")
        if self.act_order is None:
            object.__setattr__(self, "act_order", self.rounds_by_gptq)
        if self.bits not in SUPPORTED_BITS:
            raise LowbitError(f"recipe: weight bits {self.bits} not supported; use one of {SUPPORTED_BITS}")
        if self.group_size is not None and self.group_size not in SUPPORTED_GROUP_SIZES:
            raise LowbitError(
                f"recipe: group size {self.group_size} out of range; use one of {SUPPORTED_GROUP_SIZES} "
                "or none (per output channel)"
            )
        if self.bits == 8 and self.group_size is not None:
            raise LowbitError("recipe: 8-bit weights are quantized per output channel; drop the group size")
        if self.method not in SUPPORTED_METHODS:
            raise LowbitError(f"recipe: weight method {self.method!r} unknown; use one of {SUPPORTED_METHODS}")
        if not 0 < self.damp <= 1:
            raise LowbitError(f"recipe: damp {self.damp} out of range; use a value in (0, 1], e.g. 0.01")
        if self.act_order and not self.rounds_by_gptq:
            raise LowbitError("recipe: act_order applies to gptq only")
        if not 1 <= self.stages <= MAX_STAGES:
            raise LowbitError(f"recipe: stages={self.stages} out of range; use 1 to {MAX_STAGES}")
        if self.stages > 1 and not self.rounds_by_gptq:
            raise LowbitError("recipe: stages (sequential calibration) applies to gptq only")


@dataclasses.dataclass(frozen=True)
class ActQuant:
    """How linear-layer inputs are quantized (W8A8).

    Attributes:
        bits: 8.
        granularity: ``token``: one scale per token, computed at run time inside the kernel;
            ``tensor``: one static scale per layer input, from the calibration absmax; ``group``:
            one scale per token and group of the weights' group size, at run time (W4A8).
    """

    bits: int = 8
    granularity: str = "token"

    @property
    def needs_calibration(self) -> bool:
        return self.granularity == "tensor"

    def __post_init__(self):
        _check_field("activations", "bits", self.bits, (int,), "a whole number")
        _check_field("activations", "granularity", self.granularity, (str,), "token or tensor")
        if self.bits != 8:
            raise LowbitError(f"recipe: activation bits {self.bits} not supported; use 8")
        if self.granularity not in ACT_GRANULARITIES:
            raise LowbitError(
                f"recipe: activation granularity {self.granularity!r} unknown; use one of {ACT_GRANULARITIES}"
            )


@dataclasses.dataclass(frozen=True)
class Smoothing:
    """SmoothQuant: migrate activation outliers into the weights before quantization.

    ``alpha`` is the migration strength in [0, 1]; ``None`` searches it per layer input on the
    calibration statistics.
    """

    alpha: float | None = 0.5

    def __post_init__(self):
        _check_field("smoothing", "alpha", self.alpha, (int, float, type(None)), "a number")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise LowbitError(f"recipe: alpha {self.alpha} out of range; use a value in [0, 1] or 'auto'")


@dataclasses.dataclass(frozen=True)
class Keep:
    """Layers kept in int8 (per-channel RTN) whatever the recipe: named by glob, or the ``auto``
    most sensitive ones as ranked by calibration (see :mod:`lowbit.passes.sensitivity`)."""

    patterns: tuple[str, ...] = ()
    auto: int = 0

    def __post_init__(self):
        _check_field("keep", "auto", self.auto, (int,), "a whole number")
        if self.auto < 0:
            raise LowbitError(f"recipe: keep=auto{self.auto} must keep a non-negative number of layers")
        for pattern in self.patterns:
            _check_field("keep", "pattern", pattern, (str,), "a glob pattern")


KV_BITS = (16, 8, 4)


@dataclasses.dataclass(frozen=True)
class KVQuant:
    """How the KV cache is stored (``+kv16`` / ``+kv8`` / ``+kv4`` in a recipe name).

    Attributes:
        bits: 16 (float16, nothing quantized), 8 (int8, symmetric, one fp32 scale per token and
            head) or 4 (KIVI-style int4,
            asymmetric: keys per channel over groups of ``group`` tokens, values per token over
            groups of ``group`` channels, fp16 scales and minimums).
        group: int4 only: tokens per key group and channels per value group.
        residual: int4 only: the most recent tokens always kept in float (fp16); older ones are
            quantized as their key group fills.
    """

    bits: int
    group: int = 64
    residual: int = 32

    def __post_init__(self):
        for field in ("bits", "group", "residual"):
            _check_field("kv", field, getattr(self, field), (int,), "a whole number")
        if self.bits not in KV_BITS:
            raise LowbitError(f"recipe: KV-cache bits {self.bits} not supported; use +kv16, +kv8 or +kv4")
        if self.group < KV_TILE or self.group % KV_TILE:
            raise LowbitError(f"recipe: kv4 group={self.group} must be a multiple of {KV_TILE} (keys are stored in "
                              f"tiles of {KV_TILE} positions), e.g. 64")
        if self.residual < 0:
            raise LowbitError(f"recipe: kv4 residual={self.residual} must be a whole number >= 0 (e.g. 32)")

    @property
    def name(self) -> str:
        return f"kv{self.bits}" if self.bits > 4 else f"kv4:group={self.group};residual={self.residual}"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named quantization scheme.

    Attributes:
        name: the canonical name, recorded in the artifact manifest.
        weights: weight quantization, or ``None`` to keep weights in float.
        activations: activation quantization (W8A8), or ``None`` for float activations.
        smoothing: SmoothQuant smoothing before quantization, or ``None``.
        ignore: glob patterns over weight names whose layers stay in float.
        keep: layers kept in int8.
        kv: how the KV cache is stored, or ``None`` for float.
    """

    name: str
    weights: WeightQuant | None = None
    activations: ActQuant | None = None
    smoothing: Smoothing | None = None
    ignore: tuple[str, ...] = ()
    keep: Keep = Keep()
    kv: KVQuant | None = None

    def __post_init__(self):
        if self.activations is None:
            return
        if self.activations.granularity == "group":
            if self.weights is None or self.weights.bits >= 8:
                raise LowbitError("recipe: int8 activations per group go with 3- or 4-bit weights (w4a8)")
        elif self.weights is None or self.weights.bits != 8:
            raise LowbitError("recipe: int8 activations per token or tensor need int8 weights (w8a8); "
                              "4-bit weights take them per group (w4a8)")

    @property
    def needs_calibration(self) -> bool:
        return (
            (self.weights is not None and self.weights.needs_calibration)
            or (self.activations is not None and self.activations.needs_calibration)
            or self.smoothing is not None
            or self.keep.auto > 0
        )

    def is_ignored(self, weight_name: str) -> bool:
        return any(fnmatch.fnmatchcase(weight_name, pattern) for pattern in self.ignore)

    def is_kept(self, weight_name: str) -> bool:
        return any(fnmatch.fnmatchcase(weight_name, pattern) for pattern in self.keep.patterns)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
