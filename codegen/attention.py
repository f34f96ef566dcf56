"""Kernels of the in-place KV cache: the cache write and decode's attention over the cache.

The cache of one layer's keys (or values) is one ``[1, kv_heads, capacity, head_dim]`` tensor the
runtime allocates once; ``capacity`` is symbolic, so one kernel serves any allocation.

* :func:`kv_append_kernel` writes ``new[1, kv_heads, seq, head_dim]`` at positions
  ``[past, past + seq)`` of the cache, in place (``call_tir_inplace`` on the cache).
* :func:`decode_attention_kernel` is one query token's attention over positions ``[0, length)`` of
  the key and value caches, read in place (no concatenated or broadcast copy): query head ``h``
  reads KV head ``h // (q_heads // kv_heads)`` (grouped-query attention), scores are
  ``q . k * scale (+ bias)``, softmax as ``exp(x - max) / sum`` with TVM's ``fast_exp`` (relative
  error below 1e-6 on the softmax's range, measured against numpy in the kernel tests).

Both carry ``lowbit.kernel`` so that a target's rules (:mod:`lowbit.targets.simd`) schedule them.
"""

from __future__ import annotations

from tvm import te, tirx, topi
from tvm.script import tirx as T

from .kernels import KERNEL_ATTR

APPEND_TAG = "kv_append"
DECODE_ATTENTION_TAG = "decode_attention"


def kv_append_kernel(kv_heads: int, head_dim: int, dtype: str = "float32") -> tirx.PrimFunc:
    """``cache[0, h, past + i, d] = new[0, h, i, d]``; arguments ``(cache, new, past)``, in place on ``cache``."""

    @T.prim_func(private=True, s_tir=True)
    def append(var_cache: T.handle, var_new: T.handle, past: T.int64):
        capacity = T.int64()
        seq = T.int64()
        cache = T.match_buffer(var_cache, (1, kv_heads, capacity, head_dim), dtype)
        new = T.match_buffer(var_new, (1, kv_heads, seq, head_dim), dtype)
        for h, i, d in T.grid(kv_heads, seq, head_dim):
            with T.sblock("append"):
                vh, vi, vd = T.axis.remap("SSS", [h, i, d])
                cache[0, vh, past + vi, vd] = new[0, vh, vi, vd]

    return append.with_attr(KERNEL_ATTR, APPEND_TAG)


def decode_attention_kernel(q_heads: int, kv_heads: int, head_dim: int, scale: float, bias_heads: int | None,
                            dtype: str = "float32") -> tirx.PrimFunc:
    """Attention of one query token; arguments ``(q, k_cache, v_cache[, bias], length, out)``.

    ``q[1, q_heads, 1, head_dim]``; caches ``[1, kv_heads, capacity, head_dim]``, positions
    ``[0, length)`` read; ``bias[1, bias_heads, 1, length]`` (``bias_heads`` 1 or ``q_heads``, or
    no bias when ``None``) added to the scaled scores; ``out[1, q_heads, 1, head_dim]``.
    Requires ``q_heads`` a multiple of ``kv_heads`` and ``length <= capacity``.
    """
    group = q_heads // kv_heads
    capacity = tirx.Var("capacity", "int64")
    length = tirx.Var("length", "int64")
    q = te.placeholder((1, q_heads, 1, head_dim), dtype, "q")
    keys = te.placeholder((1, kv_heads, capacity, head_dim), dtype, "k_cache")
    values = te.placeholder((1, kv_heads, capacity, head_dim), dtype, "v_cache")
    bias = None if bias_heads is None else te.placeholder((1, bias_heads, 1, length), dtype, "bias")

    d = te.reduce_axis((0, head_dim), "d")
    dots = te.compute((q_heads, length), lambda h, j: te.sum(q[0, h, 0, d] * keys[0, h // group, j, d], axis=d),
                      "dots")

    def logit(h, j):
        scaled = dots[h, j] * tirx.const(scale, dtype)
        if bias is None:
            return scaled
        return scaled + bias[0, h if bias_heads > 1 else 0, 0, j]

    logits = te.compute((q_heads, length), logit, "logits")
    j = te.reduce_axis((0, length), "j")
    peak = te.compute((q_heads,), lambda h: te.max(logits[h, j], axis=j), "peak")
    shifted = te.compute((q_heads, length), lambda h, i: logits[h, i] - peak[h], "shifted")
    weights = topi.fast_exp(shifted)  # a polynomial LLVM vectorizes (libm's expf is a call per score)
    j = te.reduce_axis((0, length), "j")
    total = te.compute((q_heads,), lambda h: te.sum(weights[h, j], axis=j), "total")
    j = te.reduce_axis((0, length), "j")
    mixed = te.compute((q_heads, head_dim),
                       lambda h, e: te.sum(weights[h, j] * values[0, h // group, j, e], axis=j), "mixed")
    out = te.compute((1, q_heads, 1, head_dim), lambda _b, h, _s, e: mixed[h, e] / total[h], "out")
    inputs = [q, keys, values] + ([] if bias is None else [bias])
    func = te.create_prim_func([*inputs, length, out])
    return func.with_attr(KERNEL_ATTR, DECODE_ATTENTION_TAG)
