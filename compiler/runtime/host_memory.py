"""Host memory for a session's large tensors: the weights, and the KV cache, each laid out in one
arena of anonymous memory that Linux is asked to back with transparent huge pages.

A decode step reads every weight and every cached position once: SmolLM2-135M's 4-bit weights
alone are ~18,000 pages of 4 KiB, and an fp32 cache at 4,096 tokens ~46,000 more, far more than a
CPU's TLB maps (Zen 4: 3,072 entries), so each step walks the page tables thousands of times. One
2 MiB page stands for 512 of them. The arena starts on a huge-page boundary and is advised with
``madvise(MADV_HUGEPAGE)`` (what the system's ``transparent_hugepage`` setting ``madvise`` asks
for; ``always`` needs no advice and ``never`` ignores it); where the platform has no such advice the
arena is plain anonymous memory. Pages are faulted in on first touch, so capacity reserved but not
yet written costs no resident memory.

Each tensor is a 64-byte-aligned slice of the arena (what TVM's kernels assume), handed to TVM
without a copy (DLPack); a tensor keeps its arena alive.
"""

from __future__ import annotations

import mmap

import numpy as np

HUGE_PAGE = 2 << 20
ALIGNMENT = 64  # bytes: TVM's kernels take 64-byte-aligned tensors


def arena_tensors(specs: list[tuple[tuple[int, ...], str]]) -> tuple[list, list[np.ndarray]]:
    """TVM CPU tensors of the given ``(shape, dtype)``, zero-filled, in one huge-page arena; returns
    the tensors and numpy views of the same memory (for filling them)."""
    import tvm

    sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype in specs]
    offsets = np.cumsum([0] + [-(-size // ALIGNMENT) * ALIGNMENT for size in sizes])
    region = mmap.mmap(-1, int(offsets[-1]) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(region, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE") and offsets[-1]:
        region.madvise(mmap.MADV_HUGEPAGE, start, int(offsets[-1]))
    views = [raw[start + offset:start + offset + size].view(dtype).reshape(shape)
             for (shape, dtype), offset, size in zip(specs, offsets, sizes)]
    return [tvm.runtime.from_dlpack(view) for view in views], views
