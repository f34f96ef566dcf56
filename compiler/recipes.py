"""The recipe grammar: readable names and TOML files parsed into :class:`lowbit.passes.recipe.Recipe`.

A recipe name is parsed, not enumerated, so every valid combination has a name:

* ``fp32``: no quantization.
* ``w8a16-rtn``: int8 weights, one scale per output channel (absmax / round-to-nearest).
* ``w4a16-rtn-g128``: int4 weights in groups of 128 along the input dimension; ``-g32``, ``-g64``;
  without ``-gN`` one group per output channel; ``-asym`` adds a zero point per group.
* ``w4a16-gptq-g128``: the same grid, rounded by GPTQ from calibration statistics, in act-order
  (static groups); ``-noact`` keeps the natural column order; ``w3a16-gptq-g128`` uses 3-bit codes
  (stored in the int4 kernels).
* ``w4a16-awq-g128``: activation-aware scales folded into the previous op and a clipping search,
  then the RTN grid; ``w4a16-awq-gptq-g128``: the same scales and clipping, then GPTQ's rounding.
* ``w4a8-rtn-g128`` (``-gptq``, ``-awq``... as for ``w4a16``): the same int4 weights times int8
  activations quantized per token and group at run time, on the chip's byte dot product (VNNI).
* ``w8a8-smoothquant``: int8 weights per channel and int8 activations per token (dynamic), after
  SmoothQuant smoothing; ``w8a8-naive`` is the same without smoothing; ``-static`` quantizes
  activations with one calibrated scale per layer input instead.

Options follow a colon, separated by ``;``: ``ignore=PATTERN[,PATTERN]`` keeps matching layers
(glob over weight names, e.g. ``lm_head*``) in float; ``keep=PATTERN[,PATTERN]`` or ``keep=autoN``
keeps the named layers, or the ``N`` most sensitive ones by calibration, in int8; ``alpha=0.5`` or
``alpha=auto`` sets SmoothQuant's migration strength; ``damp=0.01`` GPTQ's dampening; ``stages=N``
GPTQ's sequential stages (each one more calibration pass).
A ``+kv16`` / ``+kv8`` / ``+kv4`` suffix compresses the KV cache (any recipe, ``fp32`` included):
``kv16`` stores it in float16 (half the bytes, nothing quantized); ``kv8`` int8 with
one fp32 scale per token and head; ``kv4`` KIVI-style int4 (keys per channel over ``group`` tokens,
values per token over ``group`` channels, the last ``residual`` tokens in float), tuned by the
options ``group=64`` and ``residual=32``.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from lowbit.codegen.errors import LowbitError
from lowbit.passes.recipe import KV_BITS, ActQuant, Keep, KVQuant, Recipe, Smoothing, WeightQuant

_WEIGHT_ONLY = re.compile(
    r"^w(?P<bits>\d+)a(?P<abits>16|8)-(?P<method>awq-gptq|[a-z]+)(?:-g(?P<group>\d+))?(?P<asym>-asym)?"
    r"(?P<noact>-noact)?$"
)
_W8A8 = re.compile(r"^w8a8-(?P<smoothing>naive|smoothquant)(?P<static>-static)?$")
_GRAMMAR = ("w{3,4,8}a16-{rtn,gptq,awq,awq-gptq}[-g{32,64,128,256}][-asym][-noact], the same with "
            "w{3,4}a8 (int8 activations per group), or w8a8-{naive,smoothquant}[-static], then optional "
            ":options, or a .toml file")


def _parse_name(name: str) -> Recipe:
    if name == "fp32":
        return Recipe(name="fp32")
    if match := _W8A8.match(name):
        activations = ActQuant(granularity="tensor" if match["static"] else "token")
        smoothing = Smoothing() if match["smoothing"] == "smoothquant" else None
        return Recipe(name=name, weights=WeightQuant(8), activations=activations, smoothing=smoothing)
    match = _WEIGHT_ONLY.match(name)
    if not match:
        raise LowbitError(f"unknown recipe {name!r}; valid recipes: {', '.join(EXAMPLE_RECIPES)} (pattern: {_GRAMMAR})")
    if match["noact"] and "gptq" not in match["method"]:
        raise LowbitError(f"recipe {name}: -noact (GPTQ's column order) applies to gptq only")
    if match["abits"] == "8" and int(match["bits"]) >= 8:
        raise LowbitError(f"unknown recipe {name!r}: int8 weights with int8 activations are w8a8-naive or "
                          "w8a8-smoothquant[-static]")
    weights = WeightQuant(
        bits=int(match["bits"]),
        group_size=int(match["group"]) if match["group"] else None,
        symmetric=not match["asym"],
        method=match["method"],
        act_order=False if match["noact"] else None,
    )
    activations = ActQuant(granularity="group") if match["abits"] == "8" else None
    return Recipe(name=name, weights=weights, activations=activations)


EXAMPLE_RECIPES = ("fp32", "w8a16-rtn", "w4a16-rtn", "w4a16-rtn-g32", "w4a16-rtn-g64", "w4a16-rtn-g128",
                   "w4a16-rtn-g128-asym", "w4a16-gptq-g128", "w4a16-gptq-g128-noact", "w3a16-gptq-g128",
                   "w4a16-awq-g128", "w4a16-awq-gptq-g128", "w4a8-rtn-g32", "w4a8-rtn-g128", "w4a8-awq-g128",
                   "w4a8-gptq-g128", "w8a8-naive", "w8a8-smoothquant", "w8a8-smoothquant-static",
                   "w4a16-rtn-g128+kv16", "w4a16-rtn-g128+kv8", "w4a16-awq-g128+kv4")
DEFAULT_RECIPE = "w4a16-rtn-g128"
KV_COMPONENTS = tuple(f"kv{bits}" for bits in KV_BITS)  # kv16, kv8, kv4
_OPTIONS = ("ignore=PATTERN[,PATTERN], keep=PATTERN[,PATTERN]|autoN, alpha=0.5|auto, damp=0.01, stages=2, "
            "group=64 and residual=32 (kv4)")


def get_recipe(spec: str) -> Recipe:
    """Resolve a recipe from a name (``w4a16-gptq-g128:keep=auto5``) or a ``.toml`` file path."""
    return _resolve(spec, ())


def _resolve(spec: str, bases: tuple[Path, ...]) -> Recipe:
    """:func:`get_recipe`, inside the chain of TOML files ``bases`` that named ``spec`` as their base."""
    if not isinstance(spec, str):
        raise LowbitError(f"recipe must be a name or a .toml path, got {type(spec).__name__} {spec!r}")
    if spec.endswith(".toml"):
        return _from_toml(Path(spec), bases)
    base, _, options = spec.partition(":")
    name, *compose = base.split("+")
    recipe = _parse_name(name)
    *others, last = (f"+{c}" for c in KV_COMPONENTS)
    for part in compose:
        if part not in KV_COMPONENTS:
            raise LowbitError(f"recipe {spec!r}: unknown component +{part}; the components are "
                              f"{', '.join(others)} and {last} (the KV cache in float16, int8, int4)")
        if recipe.kv is not None:
            raise LowbitError(f"recipe {spec!r}: more than one KV-cache component; keep one of "
                              f"{', '.join([*others, last])}")
        recipe = dataclasses.replace(recipe, kv=KVQuant(bits=int(part[2:])))
    for option in filter(None, options.split(";")):
        recipe = _apply_option(recipe, spec, option)
    return dataclasses.replace(recipe, name=spec)


def _apply_option(recipe: Recipe, spec: str, option: str) -> Recipe:
    key, _, value = option.partition("=")
    if not value:
        raise LowbitError(f"recipe {spec!r}: option {option!r} needs a value; supported: {_OPTIONS}")
    values = tuple(v for v in value.split(",") if v)
    if key == "ignore":
        return dataclasses.replace(recipe, ignore=recipe.ignore + values)
    if key == "keep":
        if recipe.weights is None:
            raise LowbitError(f"recipe {spec!r}: keep= needs a quantized recipe")
        if value.startswith("auto"):
            auto = re.fullmatch(r"auto([1-9]\d{0,5})", value)
            if auto is None:
                raise LowbitError(f"recipe {spec!r}: keep={value} is not autoN with N a whole number from 1; "
                                  "write keep=auto10, or name layers: keep=lm_head*")
            keep = Keep(auto=int(auto[1]))
        else:
            keep = Keep(patterns=values)
        return dataclasses.replace(recipe, keep=keep)
    if key == "alpha":
        if recipe.smoothing is None:
            raise LowbitError(f"recipe {spec!r}: alpha= applies to smoothquant recipes only")
        return dataclasses.replace(recipe, smoothing=Smoothing(None if value == "auto" else _number(spec, key, value)))
    if key == "damp":
        if recipe.weights is None or not recipe.weights.rounds_by_gptq:
            raise LowbitError(f"recipe {spec!r}: damp= applies to gptq recipes only")
        return dataclasses.replace(recipe, weights=dataclasses.replace(recipe.weights, damp=_number(spec, key, value)))
    if key == "stages":
        if recipe.weights is None or not recipe.weights.rounds_by_gptq:
            raise LowbitError(f"recipe {spec!r}: stages= applies to gptq recipes only")
        if not value.isdigit():
            raise LowbitError(f"recipe {spec!r}: stages={value!r} is not a whole number")
        return dataclasses.replace(recipe, weights=dataclasses.replace(recipe.weights, stages=int(value)))
    if key in ("group", "residual"):
        if recipe.kv is None or recipe.kv.bits != 4:
            raise LowbitError(f"recipe {spec!r}: {key}= tunes the int4 KV cache; add +kv4")
        if not value.isdigit():
            raise LowbitError(f"recipe {spec!r}: {key}={value!r} is not a whole number")
        return dataclasses.replace(recipe, kv=dataclasses.replace(recipe.kv, **{key: int(value)}))
    raise LowbitError(f"recipe {spec!r}: unknown option {option!r}; supported: {_OPTIONS}")


def _number(spec: str, key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise LowbitError(f"recipe {spec!r}: {key}={value!r} is not a number") from None


def _from_toml(path: Path, bases: tuple[Path, ...] = ()) -> Recipe:
    """``name``, optional ``base`` (a recipe name or another .toml file), ``[weights]``,
    ``[activations]``, ``[smoothing]``, ``[kv]``, ``ignore = [...]`` and ``keep = [...]`` or ``keep_auto = N``."""
    if not path.is_file():
        raise LowbitError(f"recipe file {path} does not exist")
    if path.resolve() in bases:
        chain = " -> ".join(str(p) for p in (*bases, path.resolve()))
        raise LowbitError(f"recipe file {path}: its base chain loops ({chain}); a recipe cannot be its own base")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise LowbitError(f"recipe file {path}: not valid TOML ({exc})") from None
    known = {"name", "base", "weights", "activations", "smoothing", "kv", "ignore", "keep", "keep_auto"}
    if set(data) - known:
        raise LowbitError(f"recipe file {path}: unknown field(s) {sorted(set(data) - known)}; use {sorted(known)}")
    for field in ("name", "base"):
        if field in data and not isinstance(data[field], str):
            raise LowbitError(f"recipe file {path}: {field} must be a string, got {data[field]!r}")
    base = data.get("base")
    if base is not None and base.endswith(".toml"):  # a base file is found next to the file naming it
        base = str(path.parent / base)
    recipe = _resolve(base, (*bases, path.resolve())) if base is not None else Recipe(name="fp32")
    tables = {"weights": WeightQuant, "activations": ActQuant, "smoothing": Smoothing, "kv": KVQuant}
    for field, cls in tables.items():
        if field in data:
            table = data[field]
            fields = {f.name for f in dataclasses.fields(cls)}
            if not isinstance(table, dict) or set(table) - fields:
                raise LowbitError(f"recipe file {path}: [{field}] takes {sorted(fields)}")
            required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
            if set(required) - set(table):
                raise LowbitError(f"recipe file {path}: [{field}] needs {', '.join(required)}")
            try:
                recipe = dataclasses.replace(recipe, **{field: cls(**table)})
            except LowbitError as exc:
                raise LowbitError(f"recipe file {path}: {exc}") from None
    lists = {}
    for field in ("ignore", "keep"):
        value = data.get(field, [])
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise LowbitError(f"recipe file {path}: {field} must be a list of glob patterns")
        lists[field] = tuple(value)
    keep_auto = data.get("keep_auto", recipe.keep.auto)
    if isinstance(keep_auto, bool) or not isinstance(keep_auto, int) or keep_auto < 0:
        raise LowbitError(f"recipe file {path}: keep_auto must be a whole number >= 0, got {keep_auto!r}")
    keep = Keep(patterns=lists["keep"] or recipe.keep.patterns, auto=keep_auto)
    if (keep.patterns or keep.auto) and recipe.weights is None:
        raise LowbitError(f"recipe file {path}: keep needs a quantized recipe ([weights] or a quantized base)")
    return dataclasses.replace(recipe, name=data.get("name", path.stem), ignore=lists["ignore"] or recipe.ignore,
                               keep=keep)
