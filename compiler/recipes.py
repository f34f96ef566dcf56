"""Quantization recipes: validated data, looked up by readable name or read from a TOML file.

A recipe name is parsed, not enumerated, so every valid combination has a name:

* ``fp32``: no quantization.
* ``w8a16-rtn``: int8 weights, one scale per output channel (absmax / round-to-nearest).
* ``w4a16-rtn-g128``: int4 weights in groups of 128 along the input dimension; ``-g32``, ``-g64``;
  without ``-gN`` one group per output channel; ``-asym`` adds a zero point per group.
* ``w4a16-gptq-g128``: the same grid, rounded by GPTQ from calibration statistics; ``-act`` adds
  act-order (static groups); ``w3a16-gptq-g128`` uses 3-bit codes (stored in the int4 kernels).

Suffix ``:ignore=PATTERN[,PATTERN]`` keeps matching layers (glob over parameter names, e.g.
``lm_head*``) in float.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import tomllib
from pathlib import Path

from .errors import LowbitError

SUPPORTED_BITS = (3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
SUPPORTED_METHODS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """How linear-layer weights are quantized.

    Attributes:
        bits: 4 or 8.
        group_size: input channels sharing one scale; ``None`` means one scale per output channel.
        symmetric: symmetric (scale only) or asymmetric (scale and zero point).
        method: ``rtn`` (round to nearest) or ``gptq`` (error feedback through calibration Hessians).
        act_order: GPTQ only: quantize columns by decreasing activation energy (static groups).
        damp: GPTQ only: Hessian dampening as a fraction of its mean diagonal.
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    method: str = "rtn"
    act_order: bool = False
    damp: float = 0.01

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    def __post_init__(self):
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
        if self.act_order and self.method != "gptq":
            raise LowbitError("recipe: act_order applies to gptq only")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named quantization scheme.

    Attributes:
        name: the canonical name, recorded in the artifact manifest.
        weights: weight quantization, or ``None`` to keep weights in float.
        ignore: glob patterns over parameter names whose layers stay in float.
    """

    name: str
    weights: WeightQuant | None = None
    ignore: tuple[str, ...] = ()

    def is_ignored(self, param_name: str) -> bool:
        return any(fnmatch.fnmatchcase(param_name, pattern) for pattern in self.ignore)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_NAME = re.compile(
    r"^w(?P<bits>\d+)a16-(?P<method>[a-z]+)(?:-g(?P<group>\d+))?(?P<asym>-asym)?(?P<act>-act)?$"
)


def _parse_name(name: str) -> Recipe:
    if name == "fp32":
        return Recipe(name="fp32")
    match = _NAME.match(name)
    if not match:
        raise LowbitError(
            f"unknown recipe {name!r}; valid recipes: {', '.join(EXAMPLE_RECIPES)} "
            "(pattern: w{3,4,8}a16-{rtn,gptq}[-g{32,64,128,256}][-asym][-act], or a .toml file)"
        )
    weights = WeightQuant(
        bits=int(match["bits"]),
        group_size=int(match["group"]) if match["group"] else None,
        symmetric=not match["asym"],
        method=match["method"],
        act_order=bool(match["act"]),
    )
    return Recipe(name=name, weights=weights)


EXAMPLE_RECIPES = ("fp32", "w8a16-rtn", "w4a16-rtn", "w4a16-rtn-g32", "w4a16-rtn-g64", "w4a16-rtn-g128",
                   "w4a16-rtn-g128-asym", "w4a16-gptq-g128", "w4a16-gptq-g128-act", "w3a16-gptq-g128")
DEFAULT_RECIPE = "w4a16-rtn-g128"


def get_recipe(spec: str) -> Recipe:
    """Resolve a recipe from a name (``w4a16-rtn-g128:ignore=lm_head*``) or a ``.toml`` file path."""
    if spec.endswith(".toml"):
        return _from_toml(Path(spec))
    name, _, options = spec.partition(":")
    recipe = _parse_name(name)
    ignore: list[str] = []
    for option in filter(None, options.split(";")):
        key, _, value = option.partition("=")
        if key != "ignore" or not value:
            raise LowbitError(f"recipe {spec!r}: unknown option {option!r}; supported: ignore=PATTERN[,PATTERN]")
        ignore += [p for p in value.split(",") if p]
    return dataclasses.replace(recipe, name=spec, ignore=tuple(ignore)) if ignore else recipe


def _from_toml(path: Path) -> Recipe:
    """``name = "..."`` plus an optional ``[weights]`` table and ``ignore = [...]``."""
    if not path.is_file():
        raise LowbitError(f"recipe file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LowbitError(f"recipe file {path}: not valid TOML ({exc})") from None
    unknown = set(data) - {"name", "base", "weights", "ignore"}
    if unknown:
        raise LowbitError(f"recipe file {path}: unknown field(s) {sorted(unknown)}; use name, base, weights, ignore")
    base = get_recipe(data["base"]) if "base" in data else Recipe(name="fp32")
    weights = base.weights
    if "weights" in data:
        table = data["weights"]
        fields = {f.name for f in dataclasses.fields(WeightQuant)}
        if not isinstance(table, dict) or set(table) - fields:
            raise LowbitError(f"recipe file {path}: [weights] takes {sorted(fields)}")
        weights = WeightQuant(**table)
    ignore = data.get("ignore", list(base.ignore))
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise LowbitError(f"recipe file {path}: ignore must be a list of glob patterns")
    return Recipe(name=data.get("name", path.stem), weights=weights, ignore=tuple(ignore))
