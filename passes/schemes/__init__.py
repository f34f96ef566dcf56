"""Quantization schemes, registered by name: each one unit of numerics, format and rewrite.

A linear scheme (:mod:`.linear`) owns what a linear layer's weight becomes (its grid, :mod:`.grids`,
one numpy source of truth that RTN, GPTQ, AWQ, SmoothQuant's search, the sensitivity ranking and
the tests all call), the weight format it asks the chip target to lay out, and the kernel call
the rewrite inserts (:class:`~lowbit.passes.quantize_linears.QuantizeLinears`). Recipes select a
scheme from their weight and activation settings; adding a scheme is one class registered here
plus its kernels in ``lowbit.codegen``. KV-cache schemes (:mod:`.kv`) do the same for how each
layer's keys and values are stored, written and read.
"""

from __future__ import annotations

from lowbit.codegen.cache_layout import kv_bytes_per_token

from ..recipe import ActQuant, WeightQuant
from .grids import ActivationGrid, QuantizedWeight, WeightGrid
from .kv import KVScheme, kv_scheme
from .linear import FloatLinear, Int4Linear, Int8Linear, LinearScheme, W4A8Linear, W8A8Linear

LINEAR_SCHEMES: dict[str, type[LinearScheme]] = {}


def register_linear_scheme(scheme: type[LinearScheme]) -> type[LinearScheme]:
    if scheme.name in LINEAR_SCHEMES:
        raise ValueError(f"linear scheme {scheme.name!r} is registered twice")
    LINEAR_SCHEMES[scheme.name] = scheme
    return scheme


for _scheme in (FloatLinear, Int8Linear, Int4Linear, W4A8Linear, W8A8Linear):
    register_linear_scheme(_scheme)


def linear_scheme(weights: WeightQuant | None, activations: ActQuant | None = None) -> LinearScheme:
    """The registered scheme for a recipe's weight and activation settings."""
    matching = [cls for cls in LINEAR_SCHEMES.values() if cls.matches(weights, activations)]
    if len(matching) != 1:
        raise ValueError(f"{len(matching)} linear schemes match weights={weights}, activations={activations}")
    return matching[0](weights, activations)


__all__ = ["ActivationGrid", "KVScheme", "LINEAR_SCHEMES", "LinearScheme", "QuantizedWeight", "WeightGrid",
           "kv_bytes_per_token", "kv_scheme", "linear_scheme", "register_linear_scheme"]
