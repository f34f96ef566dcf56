"""The in-place KV cache: its kernels against numpy, the rewrite on a hand-built attention (fused
and not), and on SmolLM2 (every layer fused; decode through a growing cache equals one prefill)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from lowbit.codegen.attention import (CHUNK, TILE, decode_attention_kernel, float_cache, int8_cache,
                                     kv8_append_kernel, kv8_dequantize_kernel, kv_append_kernel, kv_read_kernel,
                                     prompt_attention_kernel)
from lowbit.codegen.kivi import Kivi
from lowbit.compiler.runtime.host_memory import ALIGNMENT, HUGE_PAGE, arena_tensors
from lowbit.passes.kv_cache import cache_in_place
from lowbit.passes.model_ir import KVLayout, ModelIR, kv_names, make_entry_module
from lowbit.passes.recipe import KVQuant
from lowbit.codegen.cache_layout import CacheBuffer
from lowbit.passes.schemes.kv import kv_scheme
from lowbit.targets import build, get_target
from lowbit.targets.pipeline import schedule

HOST = get_target("host")


def _run_kernel(func, *args):
    lib = tvm.compile(schedule(func.with_attr("global_symbol", "main"), HOST).mod, target=HOST.tvm())
    lib["main"](*args)


def _tiles(x: np.ndarray) -> np.ndarray:
    """``[1, heads, positions, dim]`` in the key layout ``[1, heads, positions / TILE, dim, TILE]``."""
    return x.reshape(1, x.shape[1], -1, TILE, x.shape[3]).transpose(0, 1, 2, 4, 3).copy()


def _untiled(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 1, 2, 4, 3).reshape(1, x.shape[1], -1, x.shape[3])


@pytest.mark.parametrize("stored", ["float32", "float16"])
@pytest.mark.parametrize("tiled", [True, False], ids=["keys", "values"])
def test_append_writes_the_new_positions_in_place(tiled, stored):
    """The float cache, and kv16's: float16 codes equal numpy's rounding (nearest even), read back
    exactly."""
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((1, 2, 32, 8)).astype(stored)
    new = rng.standard_normal((1, 2, 14, 8)).astype(np.float32)
    layout = _tiles if tiled else (lambda x: x)
    device = tvm.runtime.tensor(layout(cache))
    _run_kernel(kv_append_kernel(2, 8, tiled, stored=stored), device, tvm.runtime.tensor(new), 5)  # across a tile
    want = cache.copy()
    want[:, :, 5:19] = new.astype(stored)
    np.testing.assert_array_equal(device.numpy(), layout(want))
    out = tvm.runtime.tensor(np.zeros((1, 2, 19, 8), np.float32))
    _run_kernel(kv_read_kernel(2, 8, tiled, stored=stored), device, 19, out)
    np.testing.assert_array_equal(out.numpy(), want[:, :, :19].astype(np.float32))


# -- numpy references of the quantized caches ---------------------------------------------------
def _int8_reference(x: np.ndarray):
    """kv8's codes and scales of ``x[1, heads, positions, dim]`` (float32 arithmetic as the kernel's)."""
    peak = np.abs(x).max(-1)
    inverse = np.where(peak > 0, np.float32(127) / np.where(peak > 0, peak, 1), 0).astype(np.float32)
    return np.round(x * inverse[..., None]).astype(np.int8), (peak / np.float32(127)).astype(np.float32)


def _int4_reference(x: np.ndarray, role: str, group: int):
    """kv4's per-element levels, scales and minimums of ``x`` (all positions quantized)."""
    stored = x.astype(np.float16).astype(np.float32)
    heads, length, dim = x.shape[1:]
    if role == "key":  # per channel over groups of positions
        grouped = stored.reshape(1, heads, length // group, group, dim)
        low, high = grouped.min(3), grouped.max(3)
        expand = lambda stat: np.repeat(stat, group, axis=2)  # noqa: E731
    else:  # per position over groups of channels
        grouped = stored.reshape(1, heads, length, dim // group, group)
        low, high = grouped.min(4), grouped.max(4)
        expand = lambda stat: np.repeat(stat, group, axis=3)  # noqa: E731
    low = low.astype(np.float16)
    scale = ((high.astype(np.float16).astype(np.float32) - low.astype(np.float32)) / np.float32(15)).astype(np.float16)
    step, minimum = expand(scale.astype(np.float32)), expand(low.astype(np.float32))
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(step > 0, np.round((stored - minimum) / step), 0)
    levels = np.clip(levels, 0, 15).astype(np.uint8)
    return levels, scale, low, levels * step + minimum


def _pack(levels: np.ndarray, role: str) -> np.ndarray:
    """kv4's codes of ``levels[1, heads, positions, dim]``: keys ``[1, heads, positions / 16, dim / 8,
    16, 4]`` (byte ``i`` of a position's nibble quad: channels ``8b + i`` and ``8b + 4 + i``), values
    ``[1, heads, positions / 8, dim, 4]`` (byte ``i`` of a channel: positions ``8b + i`` and ``8b + 4 + i``)."""
    heads, positions, dim = levels.shape[1:]
    if role == "key":
        quads = levels.reshape(1, heads, positions // TILE, TILE, dim // 8, 2, 4)
        return (quads[..., 0, :] | (quads[..., 1, :] << 4)).transpose(0, 1, 2, 4, 3, 5)
    blocks = levels.reshape(1, heads, positions // 8, 2, 4, dim)
    return (blocks[:, :, :, 0] | (blocks[:, :, :, 1] << 4)).transpose(0, 1, 2, 4, 3)


def _allocate(buffers, capacity: int):
    return [tvm.runtime.tensor(np.zeros(CacheBuffer("", dims, dtype).shape(capacity), dtype))
            for _suffix, dims, dtype in buffers]


def _appended(kivi: Kivi, role: str, x: np.ndarray, chunks, capacity: int):
    """``x`` appended chunk by chunk into a fresh kv4 cache; its tensors."""
    buffers = _allocate(kivi.buffers(role), capacity)
    position = 0
    for count in chunks:
        _run_kernel(kivi.append_kernel(role), *buffers, tvm.runtime.tensor(x[:, :, position:position + count]),
                    position)
        position += count
    return buffers


@pytest.mark.parametrize("tiled", [True, False], ids=["keys", "values"])
def test_int8_append_and_read_back_are_exact(tiled):
    rng = np.random.default_rng(3)
    new = rng.standard_normal((1, 2, 4, 16)).astype(np.float32)
    new[0, 1, 2] = 0.0  # an all-zero row: scale 0, codes 0
    layout, unlayout = (_tiles, _untiled) if tiled else (lambda x: x, lambda x: x)
    codes = tvm.runtime.tensor(layout(np.zeros((1, 2, 16, 16), np.int8)))
    scales = tvm.runtime.tensor(np.zeros((1, 2, 16), np.float32))
    _run_kernel(kv8_append_kernel(2, 16, tiled), codes, scales, tvm.runtime.tensor(new), 5)
    want_codes, want_scales = _int8_reference(new)
    np.testing.assert_array_equal(unlayout(codes.numpy())[:, :, 5:9], want_codes)
    np.testing.assert_array_equal(scales.numpy()[:, :, 5:9], want_scales)
    assert not unlayout(codes.numpy())[:, :, 9:].any()
    out = tvm.runtime.tensor(np.zeros((1, 2, 9, 16), np.float32))
    _run_kernel(kv8_dequantize_kernel(2, 16, tiled), codes, scales, 9, out)
    np.testing.assert_array_equal(out.numpy()[:, :, 5:], want_codes * want_scales[..., None])
    assert np.abs(out.numpy()[:, :, 5:] - new).max() <= np.abs(new).max() / 127 / 2 * 1.0001


@pytest.mark.parametrize("role", ["key", "value"])
def test_int4_append_quantizes_whole_groups_and_keeps_the_rest_in_the_window(role):
    """Appended in uneven chunks (prefill, decode steps, a chunk spanning groups), every position
    before ``quantized_end`` holds numpy's codes, scales and minimums bit for bit, and every later one
    its fp16 value in the window; the read-back kernel returns both."""
    kivi = Kivi(kv_heads=2, head_dim=32, group=16, residual=5)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((1, 2, 43, 32)) * np.linspace(0.5, 4, 32)).astype(np.float32)
    x[0, 0, 16:32, :] = 1.5  # a constant key group / constant value rows: scale 0
    codes, scale, low, window = _appended(kivi, role, x, (5, 1, 1, 17, 1, 14, 4), capacity=48)
    end = 32  # max(43 - 5, 0) // 16 * 16
    levels, want_scale, want_low, dequantized = _int4_reference(x[:, :, :end], role, kivi.group)
    np.testing.assert_array_equal(codes.numpy()[:, :, :end // (TILE if role == "key" else 8)], _pack(levels, role))
    rows = end // kivi.group if role == "key" else end
    np.testing.assert_array_equal(scale.numpy()[:, :, :rows], want_scale)
    np.testing.assert_array_equal(low.numpy()[:, :, :rows], want_low)
    recent = np.arange(end, 43)
    np.testing.assert_array_equal(window.numpy()[:, :, recent % kivi.window], x[:, :, end:].astype(np.float16))
    out = tvm.runtime.tensor(np.zeros((1, 2, 43, 32), np.float32))
    _run_kernel(kivi.dequantize_kernel(role), codes, scale, low, window, 43, out)
    np.testing.assert_allclose(out.numpy()[:, :, :end], dequantized, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out.numpy()[:, :, end:], x[:, :, end:].astype(np.float16).astype(np.float32))


def _attention_reference(q, keys, values, scale, bias=None):
    group = q.shape[1] // keys.shape[1]
    scores = q @ np.repeat(keys, group, axis=1).transpose(0, 1, 3, 2) * scale
    if bias is not None:
        scores = scores + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)) @ np.repeat(values, group, axis=1)


@pytest.mark.parametrize("stored, bias_heads", [("float32", None), ("float32", 1), ("float32", 6), ("float16", 1)])
def test_decode_attention_matches_numpy_and_reads_only_the_prefix(stored, bias_heads):
    """Grouped-query attention (6 query heads on 2 KV heads) over 11 of 64 positions (the kernel
    computes a whole chunk and masks what is past the length); the unused positions hold NaN, so
    using one would poison the result. kv16: numpy over the float16 cache's values."""
    rng = np.random.default_rng(1)
    length, scale = 11, 0.3
    q = rng.standard_normal((1, 6, 1, 16)).astype(np.float32)
    keys, values = (np.full((1, 2, CHUNK, 16), np.nan, stored) for _ in range(2))
    keys[:, :, :length] = rng.standard_normal((1, 2, length, 16))
    values[:, :, :length] = rng.standard_normal((1, 2, length, 16))
    args, bias = [q, keys, values], None
    if bias_heads is not None:
        bias = np.where(rng.random((1, bias_heads, 1, length)) < 0.3, -3.0e38, 0.0).astype(np.float32)
        bias[..., 0] = 0.0  # every row keeps a position
        args.append(bias)
    want = _attention_reference(q, *(x[:, :, :length].astype(np.float32) for x in (keys, values)), scale, bias)
    out = tvm.runtime.tensor(np.zeros((1, 6, 1, 16), np.float32))
    kernel = decode_attention_kernel(6, 2, 16, scale, bias_heads, float_cache(2, 16, "k", True, stored=stored),
                                     float_cache(2, 16, "v", False, stored=stored))
    args[1] = _tiles(keys)
    _run_kernel(kernel, *map(tvm.runtime.tensor, args), length, out)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)


def _int8_caches(rng, length: int, dim: int):
    """Random keys and values of 2 KV heads as int8 caches of one chunk (``[codes, scales]`` each,
    keys tiled; past ``length`` the codes are -128 and the scales NaN), and their dequantized values."""
    caches, dequantized = [], []
    for role in ("key", "value"):
        codes, scales = _int8_reference(rng.standard_normal((1, 2, length, dim)).astype(np.float32))
        dequantized.append(codes * scales[..., None])
        padded_codes = np.full((1, 2, CHUNK, dim), -128, np.int8)
        padded_scales = np.full((1, 2, CHUNK), np.nan, np.float32)
        padded_codes[:, :, :length], padded_scales[:, :, :length] = codes, scales
        caches += [_tiles(padded_codes) if role == "key" else padded_codes, padded_scales]
    return caches, dequantized


def test_int8_decode_attention_reads_codes_in_place():
    """kv8 attention (head_dim 64: the vectorized dot products) equals numpy's attention over the
    dequantized cache; positions past the length hold NaN scales."""
    rng = np.random.default_rng(5)
    length, scale, dim = 37, 0.125, 64
    q = rng.standard_normal((1, 6, 1, dim)).astype(np.float32)
    bias = np.zeros((1, 1, 1, length), np.float32)
    bias[..., 3] = -3.0e38
    caches, dequantized = _int8_caches(rng, length, dim)
    out = tvm.runtime.tensor(np.zeros((1, 6, 1, dim), np.float32))
    kernel = decode_attention_kernel(6, 2, dim, scale, 1, int8_cache(2, dim, "k", True), int8_cache(2, dim, "v", False))
    _run_kernel(kernel, *map(tvm.runtime.tensor, [q, *caches, bias]), length, out)
    np.testing.assert_allclose(out.numpy(), _attention_reference(q, *dequantized, scale, bias), rtol=1e-5, atol=1e-6)


def _causal_bias(heads: int, seq: int, past: int, rng) -> np.ndarray:
    """A causal mask ``[1, heads, seq, past + seq]`` (row ``i`` sees ``[0, past + i]``), with a few
    more positions masked at random per head so a per-head bias is told from a shared one."""
    seen = np.arange(past + seq)[None, :] <= past + np.arange(seq)[:, None]
    seen = seen[None] & ((rng.random((heads, seq, past + seq)) > 0.2) | (np.arange(past + seq) == 0))
    return np.where(seen, 0.0, -3.0e38).astype(np.float32)[None]


@pytest.mark.parametrize("stored, bias_heads, seq, past", [("float32", 1, 7, 30), ("float32", 6, 5, 0),
                                                           ("float32", None, 9, 60), ("float16", 1, 4, 13)])
def test_prompt_attention_matches_numpy_and_reads_only_the_prefix(stored, bias_heads, seq, past):
    """A prompt's attention (6 query heads on 2 KV heads, head_dim 64) over ``past + seq`` of 128
    positions, row counts that are and are not a multiple of the kernel's row block, one and
    several chunks of positions; the positions past the length hold NaN."""
    rng = np.random.default_rng(3)
    length, scale, dim = past + seq, 0.2, 64
    q = rng.standard_normal((1, 6, seq, dim)).astype(np.float32)
    keys, values = (np.full((1, 2, 2 * CHUNK, dim), np.nan, stored) for _ in range(2))
    keys[:, :, :length] = rng.standard_normal((1, 2, length, dim))
    values[:, :, :length] = rng.standard_normal((1, 2, length, dim))
    bias = None if bias_heads is None else _causal_bias(bias_heads, seq, past, rng)
    want = _attention_reference(q, *(x[:, :, :length].astype(np.float32) for x in (keys, values)), scale, bias)
    out = tvm.runtime.tensor(np.zeros((1, 6, seq, dim), np.float32))
    kernel = prompt_attention_kernel(6, 2, dim, scale, bias_heads, float_cache(2, dim, "k", True, stored=stored),
                                     float_cache(2, dim, "v", False, stored=stored))
    args = [q, _tiles(keys), values] + ([] if bias is None else [bias])
    _run_kernel(kernel, *map(tvm.runtime.tensor, args), length, out)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def _window_bias(seq: int, past: int, window: int) -> np.ndarray:
    """A sliding-window causal mask ``[1, 1, seq, past + seq]``: row ``i`` (position ``past + i``)
    sees the ``window`` positions up to itself, as transformers' sliding-window masks do."""
    distance = past + np.arange(seq)[:, None] - np.arange(past + seq)[None, :]
    return np.where((distance >= 0) & (distance < window), 0.0, -3.0e38).astype(np.float32)[None, None]


def test_ring_kernels_hold_a_window_past_their_capacity():
    """A sliding-window layer's ring of 64 slots (window 20) through 150 positions written by calls
    of 1 to 44 tokens (at most the ring less the window): after each call, the ring's prompt or
    decode attention equals numpy's over the whole history with the window's mask, and the
    read-back holds the last 64 positions at their slots."""
    rng = np.random.default_rng(11)
    window, capacity, dim, scale = 20, CHUNK, 16, 0.25
    calls = [30, 1, 44, 1, 1, 40, 1, 20, 12, 1]
    history = [rng.standard_normal((1, 2, sum(calls), dim)).astype(np.float32) for _ in range(2)]
    keys, values = (tvm.runtime.tensor(np.full(shape, np.nan, np.float32))
                    for shape in ((1, 2, capacity // TILE, dim, TILE), (1, 2, capacity, dim)))
    append_keys, append_values = (kv_append_kernel(2, dim, tiled, ring=True) for tiled in (True, False))
    kernels = {decodes: (decode_attention_kernel if decodes else prompt_attention_kernel)(
        6, 2, dim, scale, 1, float_cache(2, dim, "k", True), float_cache(2, dim, "v", False), ring=True)
        for decodes in (True, False)}
    past = 0
    for seq in calls:
        length = past + seq
        _run_kernel(append_keys, keys, tvm.runtime.tensor(history[0][:, :, past:length]), past)
        _run_kernel(append_values, values, tvm.runtime.tensor(history[1][:, :, past:length]), past)
        q = rng.standard_normal((1, 6, seq, dim)).astype(np.float32)
        bias = _window_bias(seq, past, window)
        out = tvm.runtime.tensor(np.zeros((1, 6, seq, dim), np.float32))
        _run_kernel(kernels[seq == 1], *map(tvm.runtime.tensor, [q, keys, values, bias]), length, out)
        want = _attention_reference(q, history[0][:, :, :length], history[1][:, :, :length], scale, bias)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5, err_msg=f"{seq} tokens at {past}")
        past = length
    out = tvm.runtime.tensor(np.zeros((1, 2, past, dim), np.float32))
    _run_kernel(kv_read_kernel(2, dim, True, ring=True), keys, past, out)
    np.testing.assert_array_equal(out.numpy()[:, :, past - capacity:], history[0][:, :, past - capacity:past])


def test_int8_prompt_attention_reads_codes_in_place():
    """kv8: the prompt's attention over the codes (scales applied per position) equals numpy's over
    the dequantized cache; positions past the length hold NaN scales."""
    rng = np.random.default_rng(7)
    seq, past, dim = 6, 41, 64
    length = past + seq
    q = rng.standard_normal((1, 6, seq, dim)).astype(np.float32)
    caches, dequantized = _int8_caches(rng, length, dim)
    bias = _causal_bias(1, seq, past, rng)
    out = tvm.runtime.tensor(np.zeros((1, 6, seq, dim), np.float32))
    kernel = prompt_attention_kernel(6, 2, dim, 0.125, 1, int8_cache(2, dim, "k", True), int8_cache(2, dim, "v", False))
    _run_kernel(kernel, *map(tvm.runtime.tensor, [q, *caches, bias]), length, out)
    np.testing.assert_allclose(out.numpy(), _attention_reference(q, *dequantized, 0.125, bias), rtol=1e-5, atol=1e-5)


def _unpack(codes: np.ndarray, role: str) -> np.ndarray:
    """The levels ``[1, heads, positions, dim]`` of kv4's codes (the inverse of :func:`_pack`)."""
    nibbles = np.stack([codes & 15, codes >> 4], axis=-2)
    if role == "key":  # [1, h, tiles, dim / 8, 16, 2, 4] -> [1, h, tiles, 16, dim / 8, 2, 4]
        return nibbles.transpose(0, 1, 2, 4, 3, 5, 6).reshape(*codes.shape[:2], -1, codes.shape[3] * 8)
    return nibbles.transpose(0, 1, 2, 4, 5, 3).reshape(*codes.shape[:2], -1, codes.shape[3])  # [.., b, 2, 4, dim]


def _int4_decode_reference(kivi: Kivi, q: np.ndarray, caches, length: int, scale: float) -> np.ndarray:
    """What kv4's decode attention computes, in numpy: the quantized keys' scores as int8 queries
    (times the keys' scales, one step per head and key group) dotted with the codes, the quantized
    values' weights (times their scales) as int8 with one step per block of 8 positions."""
    (key_codes, key_scale, key_min, key_win), (value_codes, value_scale, value_min, value_win) = (
        [b.numpy() for b in caches[:4]], [b.numpy() for b in caches[4:]])
    group, heads, per = kivi.group, q.shape[1], q.shape[1] // kivi.kv_heads
    end = max(length - kivi.residual, 0) // group * group
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    key_levels, value_levels = f32(_unpack(key_codes, "key")[0, :, :end]), f32(_unpack(value_codes, "value")[0, :, :end])
    recent = np.arange(end, length) % kivi.window
    out = np.zeros((1, heads, 1, kivi.head_dim), np.float32)
    for h in range(heads):
        k, query = h // per, q[0, h, 0]
        scaled = query * f32(key_scale[0, k, :end // group])  # [groups, dim]
        q_step = np.abs(scaled).max(-1) / np.float32(127)
        with np.errstate(divide="ignore", invalid="ignore"):
            q_codes = np.where(q_step[:, None] > 0, np.rint(scaled / q_step[:, None]), 0)
        dots = (key_levels[k] * np.repeat(q_codes, group, axis=0)).sum(-1)
        offset = (query * f32(key_min[0, k, :end // group])).sum(-1)
        logits = np.concatenate([(dots * np.repeat(q_step, group) + np.repeat(offset, group)) * scale,
                                 f32(key_win[0, k, recent]) @ query * scale])
        weights = np.exp(logits - logits.max())
        total = weights.sum()
        weighted = weights[:end, None] / total * f32(value_scale[0, k, :end])  # [end, value groups]
        p_step = weighted.reshape(-1, 8, weighted.shape[1]).max(1) / np.float32(127)
        with np.errstate(divide="ignore", invalid="ignore"):
            p_codes = np.where(np.repeat(p_step, 8, 0) > 0, np.rint(weighted / np.repeat(p_step, 8, 0)), 0)
        mixed = (value_levels[k] * np.repeat(p_codes, group, 1)).reshape(-1, 8, kivi.head_dim).sum(1)
        mixed = (mixed * np.repeat(p_step, group, 1)).sum(0)
        minimums = np.repeat(weights[:end] @ f32(value_min[0, k, :end]), group)
        out[0, h, 0] = (minimums + weights[end:] @ f32(value_win[0, k, recent])) / total + mixed
    return out


def _int4_case(length: int):
    """A kv4 cache (2 KV heads of 64 channels, group 16, residual 5) of ``length`` random positions
    appended by a prompt and two steps, 6 query heads' query; the cache read back as floats."""
    kivi = Kivi(kv_heads=2, head_dim=64, group=16, residual=5)
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 6, 1, 64)).astype(np.float32)
    caches, dequantized = [], []
    for role in ("key", "value"):
        x = rng.standard_normal((1, 2, length, 64)).astype(np.float32)
        buffers = _appended(kivi, role, x, (length - 2, 1, 1), capacity=112)
        out = tvm.runtime.tensor(np.zeros((1, 2, length, 64), np.float32))
        _run_kernel(kivi.dequantize_kernel(role), *buffers, length, out)
        caches += buffers
        dequantized.append(out.numpy())
    return kivi, q, caches, dequantized


@pytest.mark.parametrize("length", [4, 37, 43, 101])
def test_int4_decode_attention_matches_numpy_over_the_dequantized_cache(length):
    """kv4 attention over the quantized part and the window (lengths with nothing quantized yet,
    with a part of a group past the residual still in float, and over several chunks) equals numpy's
    model of its arithmetic (int8 queries and weights), and numpy's float attention over the cache
    as the read-back kernel returns it within what those int8 steps cost (0.02 here, on values
    of unit variance)."""
    kivi, q, caches, dequantized = _int4_case(length)
    out = tvm.runtime.tensor(np.zeros((1, 6, 1, 64), np.float32))
    _run_kernel(kivi.attention_kernel(6, 0.125, None), tvm.runtime.tensor(q), *caches, length, out)
    np.testing.assert_allclose(out.numpy(), _int4_decode_reference(kivi, q, caches, length, 0.125),
                               rtol=1e-5, atol=1e-5)
    exact = _attention_reference(q, *dequantized, 0.125)
    assert np.abs(out.numpy() - exact).max() < 0.02


DOT_PATHS = {"x86-vnni": "vpdpbusd", "x86-avxvnni": "{vex}\tvpdpbusd", "x86-avx2": "vpmaddubsw",
             "arm-dotprod": "sdot"}  # target -> the dot instruction its int4_dot step uses


@pytest.mark.parametrize("target", sorted(DOT_PATHS))
def test_int4_decode_attention_runs_on_each_dot_product_path(target):
    """The kv4 decode kernel of every CPU target uses its dot instruction (checked in the assembly)
    and, where this CPU has it, computes numpy's model of it (skipped with the missing instruction
    set elsewhere, so the report records which paths ran)."""
    chip = get_target(target)
    kivi, q, caches, _ = _int4_case(101)
    func = kivi.attention_kernel(6, 0.125, None).with_attr("global_symbol", "main")
    executable = tvm.compile(schedule(func, chip).mod, target=chip.tvm())
    assert DOT_PATHS[target] in executable.mod.inspect_source("asm")
    if not chip.runs_on_this_machine():
        pytest.skip(f"{target} code does not run on this CPU (needs {', '.join(chip.capabilities)}); "
                    "compiled and checked for its instructions only")
    out = tvm.runtime.tensor(np.zeros((1, 6, 1, 64), np.float32))
    executable.jit()["main"](tvm.runtime.tensor(q), *caches, 101, out)
    np.testing.assert_allclose(out.numpy(), _int4_decode_reference(kivi, q, caches, 101, 0.125), rtol=1e-5, atol=1e-5)


def test_int4_prompt_layout_is_the_read_back_prefix_in_the_float_cache_layout():
    """kv4's prompt attention reads the prefix back in the float cache's layout: the same values as
    the plain read-back, keys tiled, positions up to the next whole chunk zero."""
    kivi = Kivi(kv_heads=2, head_dim=64, group=16, residual=5)
    rng = np.random.default_rng(8)
    length = 43
    padded = -(-length // CHUNK) * CHUNK
    for role in ("key", "value"):
        buffers = _appended(kivi, role, rng.standard_normal((1, 2, length, 64)).astype(np.float32),
                            (length - 2, 1, 1), capacity=48)
        plain = tvm.runtime.tensor(np.zeros((1, 2, length, 64), np.float32))
        _run_kernel(kivi.dequantize_kernel(role), *buffers, length, plain)
        want = np.zeros((1, 2, padded, 64), np.float32)
        want[:, :, :length] = plain.numpy()
        shape = (1, 2, padded // TILE, 64, TILE) if role == "key" else (1, 2, padded, 64)
        out = tvm.runtime.tensor(np.full(shape, np.nan, np.float32))
        _run_kernel(kivi.dequantize_kernel(role, float_layout=True), *buffers, length, out)
        np.testing.assert_array_equal(out.numpy(), _tiles(want) if role == "key" else want)


# -- the rewrite on a hand-built one-layer attention --------------------------------------------
VOCAB, Q_HEADS, KV_HEADS, DIM = 32, 4, 2, 16


def _attention_model(softcap: bool) -> tvm.IRModule:
    """A module whose ``main`` maps ``input_ids`` -> logits ``[1, seq, Q_HEADS * DIM]``: q/k/v
    looked up from tables, the cache concatenated and returned, grouped-query attention as
    torch.export imports it; with ``softcap``, ``tanh`` on the scores (an attention the fused
    kernel does not compute)."""
    seq, past = tirx.Var("seq", "int64"), tirx.Var("past", "int64")
    ids = relax.Var("input_ids", relax.TensorType([1, seq], "int64"))
    cache_in = [relax.Var(n, relax.TensorType([1, KV_HEADS, past, DIM], "float32"))
                for n in kv_names("past_key_values", 1)]
    tables = [relax.Var(n, relax.TensorType([VOCAB, h * DIM], "float32"))
              for n, h in (("wq", Q_HEADS), ("wk", KV_HEADS), ("wv", KV_HEADS))]
    bb = relax.BlockBuilder()
    with bb.function("main", [ids, *cache_in, *tables]):
        with bb.dataflow():
            def heads(table, count):
                rows = bb.emit(relax.op.take(table, relax.op.reshape(ids, [seq]), axis=0))
                return bb.emit(relax.op.permute_dims(relax.op.reshape(rows, [1, seq, count, DIM]), [0, 2, 1, 3]))

            q, k, v = heads(tables[0], Q_HEADS), heads(tables[1], KV_HEADS), heads(tables[2], KV_HEADS)
            keys = bb.emit(relax.op.concat([cache_in[0], k], axis=2))
            values = bb.emit(relax.op.concat([cache_in[1], v], axis=2))

            def repeat(x):
                wide = bb.emit(relax.op.broadcast_to(relax.op.expand_dims(x, [2]),
                                                     [1, KV_HEADS, Q_HEADS // KV_HEADS, past + seq, DIM]))
                return bb.emit(relax.op.reshape(wide, [1, Q_HEADS, past + seq, DIM]))

            scores = bb.emit(relax.op.matmul(q, relax.op.permute_dims(repeat(keys), [0, 1, 3, 2])))
            scores = bb.emit(relax.op.multiply(scores, relax.const(0.25, "float32")))
            if softcap:
                scores = bb.emit(relax.op.tanh(scores))
            probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
            mixed = bb.emit(relax.op.matmul(probs, repeat(values)))
            logits = bb.emit(relax.op.reshape(relax.op.permute_dims(mixed, [0, 2, 1, 3]), [1, seq, Q_HEADS * DIM]))
            out = bb.emit_output(relax.Tuple([logits, keys, values]))
        bb.emit_func_output(out)
    return bb.get()


def _model(softcap: bool) -> ModelIR:
    rng = np.random.default_rng(2)
    params = {n: rng.standard_normal((VOCAB, h * DIM)).astype(np.float32)
              for n, h in (("wq", Q_HEADS), ("wk", KV_HEADS), ("wv", KV_HEADS))}
    mod = make_entry_module(_attention_model(softcap), 3)
    return ModelIR(mod, params, ["input_ids"] + kv_names("past_key_values", 1), ["logits"] + kv_names("present", 1),
                   KVLayout(1, KV_HEADS, DIM), VOCAB, 64)


def _caches(scheme, capacity: int) -> list:
    return [tvm.runtime.tensor(np.zeros(buffer.shape(capacity), buffer.dtype))
            for role in ("key", "value") for buffer in scheme.buffers(role)]


@pytest.mark.parametrize("softcap", [False, True], ids=["fused", "copied"])
def test_cache_in_place_computes_what_the_imported_graph_computes(softcap):
    ir = _model(softcap)
    rewritten, summary = cache_in_place(ir, kv_scheme(None, ir.kv))
    assert summary["attention_fused"] == summary["prompt_attention_fused"] == (0 if softcap else 1)
    assert rewritten.input_names[:2] == ["input_ids", "past_length"]
    before = relax.VirtualMachine(build(ir.mod, HOST), tvm.cpu())
    after = relax.VirtualMachine(build(rewritten.mod, HOST), tvm.cpu())
    weights = [tvm.runtime.tensor(a) for a in ir.params.values()]
    caches = _caches(kv_scheme(None, ir.kv), CHUNK)
    past = [tvm.runtime.tensor(np.zeros((1, KV_HEADS, 0, DIM), np.float32)) for _ in range(2)]
    position = 0
    for entry, ids in [("prefill", [3, 1, 4, 1, 5]), ("decode", [9]), ("decode", [2]), ("prefill", [6, 5])]:
        tokens = tvm.runtime.tensor(np.array([ids], np.int64))
        want = before[entry](tokens, *past, *weights)
        got = after[entry](tokens, tvm.runtime.ShapeTuple([position]), *caches, *weights)
        np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-5, atol=1e-6)
        past = [want[1], want[2]]
        position += len(ids)
        np.testing.assert_array_equal(_untiled(caches[0].numpy())[:, :, :position], past[0].numpy())
        np.testing.assert_array_equal(caches[1].numpy()[:, :, :position], past[1].numpy())


@pytest.mark.parametrize("quant, bound, paths", [(KVQuant(16), 2e-3, 1e-5), (KVQuant(8), 0.015, 1e-5),
                                                 (KVQuant(4, group=16, residual=3), 0.2, 0.03)],
                         ids=["kv16", "kv8", "kv4"])
def test_quantized_cache_decodes_as_its_read_back_path_does(quant, bound, paths):
    """From the same cache state, decode (the fused kernel reading codes in place) and a one-token
    prefill (the prompt kernel; kv4: the read-back kernel, then the imported attention) give the
    same output within ``paths`` of the largest logit (float rounding; kv4's decode also quantizes
    the query and the attention weights to int8, which its read-back path does not), step after
    step across quantized groups; both stay within ``bound`` (relative, max) of the float graph."""
    ir = _model(softcap=False)
    scheme = kv_scheme(quant, ir.kv)
    rewritten, summary = cache_in_place(ir, scheme)
    assert summary["attention_fused"] == 1
    assert len(rewritten.input_names) == 2 + 2 * len(scheme.buffers("key"))
    imported = relax.VirtualMachine(build(ir.mod, HOST), tvm.cpu())
    vm = relax.VirtualMachine(build(rewritten.mod, HOST), tvm.cpu())
    weights = [tvm.runtime.tensor(a) for a in ir.params.values()]
    fused, read_back = _caches(scheme, CHUNK), _caches(scheme, CHUNK)
    ids = [(7 * i + 3) % VOCAB for i in range(40)]  # kv4: two key groups quantized by the end
    first = tvm.runtime.tensor(np.array([ids[:5]], np.int64))
    vm["prefill"](first, tvm.runtime.ShapeTuple([0]), *fused, *weights)
    vm["prefill"](first, tvm.runtime.ShapeTuple([0]), *read_back, *weights)
    past = [tvm.runtime.tensor(np.zeros((1, KV_HEADS, 0, DIM), np.float32)) for _ in range(2)]
    _, *past = imported["prefill"](first, *past, *weights)
    worst = 0.0
    for position, token in enumerate(ids[5:], start=5):
        tokens, length = tvm.runtime.tensor(np.array([[token]], np.int64)), tvm.runtime.ShapeTuple([position])
        got = vm["decode"](tokens, length, *fused, *weights)[0].numpy()
        again = vm["prefill"](tokens, length, *read_back, *weights)[0].numpy()
        assert np.abs(got - again).max() <= paths * max(np.abs(again).max(), 1.0), f"step {position}"
        want, *past = imported["decode"](tokens, *past, *weights)
        worst = max(worst, float(np.abs(got - want.numpy()).max() / np.abs(want.numpy()).max()))
    assert worst < bound, f"{scheme.name}: {worst:.3g} from the float cache"


def test_an_unexpected_cache_reader_is_named():
    from lowbit.codegen.errors import LowbitError

    length = tirx.Var("past", "int64")
    keys, values = (relax.Var(n, relax.TensorType([1, KV_HEADS, length, DIM], "float32"))
                    for n in kv_names("past_key_values", 1))
    bb = relax.BlockBuilder()
    with bb.function("f", [relax.Var("input_ids", relax.TensorType([1, 1], "int64")), keys, values]):
        with bb.dataflow():
            out = bb.emit_output(relax.Tuple([relax.op.sum(keys), values]))
        bb.emit_func_output(out)
    func = bb.get()["f"].with_attr("num_input", 3)
    broken = ModelIR(tvm.IRModule({"prefill": func, "decode": func}), {}, ["input_ids"] + kv_names("past_key_values", 1),
                     ["logits"], KVLayout(1, KV_HEADS, DIM), VOCAB, 64)
    with pytest.raises(LowbitError, match=r"KV-cache input past_key_values\.0\.key is read by relax\.sum"):
        cache_in_place(broken, kv_scheme(None, broken.kv))


def test_host_arena_tensors_are_aligned_zero_and_shared_with_their_views():
    """The session's weights and caches live in one arena each (compiler/runtime/host_memory.py): every
    tensor 64-byte aligned (the first on a huge-page boundary), zero, of its shape and dtype, and the
    same memory as its numpy view (filling the view fills the tensor, no copy)."""
    specs = [((3, 5), "float32"), ((0, 4), "uint8"), ((7,), "float16"), ((2, 3, 64), "int8")]
    tensors, views = arena_tensors(specs)
    assert [(tuple(t.shape), str(t.dtype)) for t in tensors] == specs
    assert views[0].ctypes.data % HUGE_PAGE == 0
    assert all(view.ctypes.data % ALIGNMENT == 0 for view in views)
    assert all(not t.numpy().any() for t in tensors)
    views[3][...] = np.arange(6 * 64).reshape(2, 3, 64) % 127
    views[0][1] = 1.5
    np.testing.assert_array_equal(tensors[3].numpy(), np.arange(6 * 64).reshape(2, 3, 64) % 127)
    np.testing.assert_array_equal(tensors[0].numpy()[:, 0], [0, 1.5, 0])


# -- SmolLM2 ------------------------------------------------------------------------------------
def test_smollm2_decode_attends_in_place_through_a_growing_cache(smol, smol_source):
    """Every layer's decode attention is fused; decoding across the session's first capacity
    (256 positions) gives the logits one prefill of the whole sequence gives."""
    built = smol.built("fp32")
    assert built.manifest["kv_cache"]["attention_fused"] == built.manifest["kv_cache"]["attention_layers"] == 30
    session = built.session()
    ids = [(37 * i + 11) % 49152 for i in range(262)]
    full = session.prefill(ids)
    session.prefill(ids[:250])
    steps = np.stack([session.decode(token) for token in ids[250:]])
    assert session.capacity >= 262
    rel = np.abs(steps - full[250:]).max() / np.abs(full[250:]).max()
    assert rel < 1e-4, f"decode through the cache differs from prefill by {rel:.2e} (relative)"


KV_RECIPES = {"kv8": "w4a16-rtn-g128+kv8", "kv4": "w4a16-rtn-g128+kv4"}


@pytest.fixture(scope="module")
def kv_scores(smol):
    """The cheap setting of the KV-cache bars: 1024 tokens of Alice in windows of 256 fed in chunks of
    64 (every token after a window's first chunk attends through the cache as stored), each +kv
    recipe against the same weights on a float cache under the same protocol."""
    from lowbit.compiler.runtime.evaluation import evaluate_session
    from lowbit.compiler.sources.texts import read_text

    ids = smol.prepared.tokenize(read_text("alice29"))[:1025]
    baseline = evaluate_session(smol.built("w4a16-rtn-g128").session(), ids, 256, chunk=64).perplexity
    sessions = {name: smol.built(recipe).session() for name, recipe in KV_RECIPES.items()}
    gaps = {name: evaluate_session(s, ids, 256, chunk=64).perplexity / baseline - 1 for name, s in sessions.items()}
    return gaps, sessions


@pytest.mark.parametrize("name, gap_bar, bytes_bar, context", [("kv8", 0.005, 0.27, 8192), ("kv4", 0.05, 0.17, 2048)])
def test_smollm2_quantized_cache_meets_its_bars(kv_scores, name, gap_bar, bytes_bar, context):
    gaps, sessions = kv_scores
    assert gaps[name] <= gap_bar, f"{name}: perplexity gap {gaps[name]:.4f} over the float cache"
    report = sessions[name].kv_report(context)
    ratio = report["kv_bytes_per_token"] / report["kv_fp32_bytes_per_token"]
    assert ratio <= bytes_bar, f"{name}: {ratio:.3f} x the fp32 cache's bytes per token at {context}"


def test_smollm2_int8_cache_generates_what_the_float_cache_does(smol):
    """Greedy, 64 tokens of the README's prompt: the same tokens on the int8 cache and the float one."""
    from .conftest import PROMPT

    float_cache = smol.built("w4a16-rtn-g128").session().generate(PROMPT, 64)
    int8_cache = smol.built(KV_RECIPES["kv8"]).session().generate(PROMPT, 64)
    assert int8_cache.token_ids == float_cache.token_ids, (float_cache.text, int8_cache.text)
