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


RING_CALL_TOKENS = 128  # the most tokens one call writes into a ring: the runtime splits longer calls


def ring_capacity_name(window: int | None) -> str:
    """The symbolic capacity of the caches of the layers of ``window`` (``None``: every position)."""
    return CAPACITY if window is None else f"{CAPACITY}_window{window}"


def layer_capacity(capacity: int, window: int | None, multiple: int) -> int:
    """What a layer's cache is allocated for when the full layers' is ``capacity``: that, or for a
    ring of ``window``, room for the window plus :data:`RING_CALL_TOKENS` (so that the positions a
    call's queries may see are still held once its keys are written), if that is less."""
    if window is None:
        return capacity
    return min(capacity, capacity_for(window + RING_CALL_TOKENS, multiple))


def layer_windows(kv_cache: dict) -> list:
    """Per layer of a manifest's ``kv_cache``, the window of its ring, or ``None``."""
    return list(kv_cache.get("windows") or [None] * kv_cache["num_layers"])


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
    window) and rings (a sliding-window layer's fixed capacity) amortized over ``context``."""
    multiple = kv_cache["capacity_multiple"]
    capacity = capacity_for(context, multiple)
    buffers = [CacheBuffer("", tuple(b["shape"]), b["dtype"]) for b in kv_cache["buffers"]]
    total = sum(buffer.bytes_at(layer_capacity(capacity, window, multiple))
                for window in layer_windows(kv_cache) for buffer in buffers)
    return total / context
