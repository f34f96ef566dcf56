"""The tensors a KV cache is made of, as an artifact's manifest records them (``kv_cache.buffers``),
and what they cost: plain data and arithmetic, no TVM, so that the runtime reads a manifest
without the compiler. The schemes that produce these layouts are :mod:`lowbit.passes.schemes.kv`."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

CAPACITY = "capacity"
ROLES = ("key", "value")


@dataclasses.dataclass(frozen=True)
class CacheBuffer:
    """One tensor of a cache: ``suffix`` after ``cache.{layer}.{role}``, ``dims`` of ints and
    ``"capacity"`` (one entry per position) or ``"capacity/N"`` (one per ``N`` positions), ``dtype``."""

    suffix: str
    dims: tuple
    dtype: str

    def shape(self, capacity) -> list:
        """The shape for ``capacity`` positions (an int, or a symbolic TIR variable)."""
        return [_capacity_dim(dim, capacity) if isinstance(dim, str) else dim for dim in self.dims]

    def bytes_at(self, capacity: int) -> int:
        return math.prod(self.shape(capacity)) * np.dtype(self.dtype).itemsize

    def as_dict(self, role: str) -> dict:
        return {"name": role + self.suffix, "shape": list(self.dims), "dtype": self.dtype}


def _capacity_dim(dim: str, capacity):
    if dim == CAPACITY:
        return capacity
    return capacity // int(dim.split("/")[1])


def capacity_for(positions: int, multiple: int) -> int:
    """The smallest capacity of at least ``positions`` that is a multiple of ``multiple``."""
    return -(-positions // multiple) * multiple


def kv_report(kv_cache: dict, context: int) -> dict:
    """What ``inspect``, ``eval`` and ``run`` report of a manifest's ``kv_cache`` at ``context`` positions:
    the scheme, the bytes per token, and those of a float32 cache of the same model."""
    float_bytes = kv_cache["num_layers"] * len(ROLES) * kv_cache["num_kv_heads"] * kv_cache["head_dim"] * 4
    return {"kv_scheme": kv_cache["scheme"], "kv_context": context,
            "kv_bytes_per_token": round(kv_bytes_per_token(kv_cache, context), 1),
            "kv_fp32_bytes_per_token": float_bytes}


def kv_bytes_per_token(kv_cache: dict, context: int) -> float:
    """Bytes of cache per token of the manifest's ``kv_cache`` (its layers, and the buffers of one
    layer) at a capacity of ``context`` positions: all
    layers, keys and values, scales and zero points included, fixed-size buffers (kv4's float
    window) amortized over ``context``."""
    capacity = capacity_for(context, kv_cache["capacity_multiple"])
    total = sum(CacheBuffer("", tuple(b["shape"]), b["dtype"]).bytes_at(capacity) for b in kv_cache["buffers"])
    return kv_cache["num_layers"] * total / context
