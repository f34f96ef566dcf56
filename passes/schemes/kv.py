"""KV-cache schemes: how one layer's keys and values are stored, written and read.

A scheme says which tensors one cache (a layer's keys, or its values) is made of
(:class:`CacheBuffer`: a name suffix, a shape with a ``capacity`` axis of positions, a dtype) and
which kernels the in-place cache rewrite (:mod:`lowbit.passes.kv_cache`) calls on them: the
append that writes (and quantizes) new positions, the read of a prefix back as floats (for any
reader that is not a fused attention), and decode's and a prompt's attention over the cache as
stored (kv4's prompt attention: over its prefix read back in the float cache's layout). A scheme
that ``rings`` has ``ring`` variants of its kernels for a sliding-window layer's cache kept as a
ring of slots (:mod:`lowbit.codegen.attention`). Recipes select a scheme with ``+kv16`` / ``+kv8`` / ``+kv4``; adding one is a class
here plus its kernels in :mod:`lowbit.codegen`.
"""

from __future__ import annotations

from lowbit.codegen import attention, kivi
from lowbit.codegen.cache_layout import CAPACITY, ROLES, CacheBuffer
from lowbit.codegen.errors import LowbitError

from ..model_ir import KVLayout
from ..recipe import KVQuant


class KVScheme:
    """A KV-cache scheme (see the module docstring); ``capacity_multiple`` is what every allocated
    capacity must be a multiple of; ``roles_differ``: keys and values are stored differently;
    ``rings``: a sliding-window layer's cache may be a ring (the kernels take ``ring=True``)."""

    name: str
    capacity_multiple: int
    roles_differ: bool
    rings: bool = True

    def __init__(self, kv: KVLayout):
        self.kv = kv

    def buffers(self, role: str) -> tuple[CacheBuffer, ...]:
        raise NotImplementedError

    def append_kernel(self, role: str, ring: bool = False):
        """Arguments ``(*buffers, new[1, kv_heads, seq, head_dim], past)``, in place on the buffers."""
        raise NotImplementedError

    def prefix_kernel(self, role: str, ring: bool = False):
        """Arguments ``(*buffers, length, out[1, kv_heads, length, head_dim])``; ``None`` when the
        cache is one float tensor whose prefix is a slice."""
        raise NotImplementedError

    def attention_kernel(self, q_heads: int, scale: float, bias_heads: int | None, ring: bool = False):
        """Decode's attention (see :func:`lowbit.codegen.attention.decode_attention_kernel`) with
        arguments ``(q, *key buffers, *value buffers[, bias], length, out)``."""
        raise NotImplementedError

    def prompt_attention_kernel(self, q_heads: int, scale: float, bias_heads: int | None, ring: bool = False):
        """A prompt's attention (see :func:`lowbit.codegen.attention.prompt_attention_kernel`), same
        arguments as :meth:`attention_kernel` but each cache's tensors as :meth:`prompt_layout_kernel`
        gives them."""
        raise NotImplementedError

    def prompt_layout_kernel(self, role: str):
        """``None`` when the prompt's attention reads the cache's own tensors; otherwise a kernel
        with arguments ``(*buffers, length, out)`` that reads the prefix back into what it reads."""
        return None

    def kernel_suffix(self) -> str:
        """What tells this scheme's kernels apart from another's in a symbol name."""
        return self.name.replace(":", "_").replace(";", "_").replace("=", "")

    def describe(self) -> dict:
        """The manifest's record: scheme name, capacity multiple and every buffer of a layer."""
        return {"scheme": self.name, "capacity_multiple": self.capacity_multiple,
                "buffers": [b.as_dict(role) for role in ROLES for b in self.buffers(role)]}


def _cache_dims(kv: KVLayout, role: str) -> tuple:
    """Keys in tiles of positions (:data:`lowbit.codegen.attention.TILE`), values by position."""
    if role == "key":
        return (1, kv.num_kv_heads, f"{CAPACITY}/{attention.TILE}", kv.head_dim, attention.TILE)
    return (1, kv.num_kv_heads, CAPACITY, kv.head_dim)


class _TiledCache(KVScheme):
    """A cache of one tensor per position (keys tiled, see :mod:`lowbit.codegen.attention`) that
    decode's attention reads through a :class:`~lowbit.codegen.attention.CacheReader` per role."""

    capacity_multiple = attention.CHUNK
    roles_differ = True

    def reader(self, role: str) -> attention.CacheReader:
        raise NotImplementedError

    def attention_kernel(self, q_heads, scale, bias_heads, ring=False):
        kv = self.kv
        return attention.decode_attention_kernel(q_heads, kv.num_kv_heads, kv.head_dim, scale, bias_heads,
                                                 *(self.reader(role) for role in ROLES), kv.dtype, ring)

    def prompt_attention_kernel(self, q_heads, scale, bias_heads, ring=False):
        kv = self.kv
        return attention.prompt_attention_kernel(q_heads, kv.num_kv_heads, kv.head_dim, scale, bias_heads,
                                                 *(self.reader(role) for role in ROLES), kv.dtype, ring)


class FloatCache(_TiledCache):
    """The model's own float cache."""

    name = "float32"
    stored: str | None = None  # the dtype the cache is stored as, when not the model's

    @property
    def storage(self) -> str:
        return self.stored or self.kv.dtype

    def buffers(self, role):
        return (CacheBuffer("", _cache_dims(self.kv, role), self.storage),)

    def append_kernel(self, role, ring=False):
        return attention.kv_append_kernel(self.kv.num_kv_heads, self.kv.head_dim, role == "key", self.kv.dtype,
                                          self.storage, ring)

    def prefix_kernel(self, role, ring=False):
        if role == "value" and self.storage == self.kv.dtype and not ring:
            return None
        return attention.kv_read_kernel(self.kv.num_kv_heads, self.kv.head_dim, role == "key", self.kv.dtype,
                                        self.storage, ring)

    def reader(self, role):
        return attention.float_cache(self.kv.num_kv_heads, self.kv.head_dim, f"{role}_cache", role == "key",
                                     self.kv.dtype, self.storage)


class Float16Cache(FloatCache):
    """``kv16``: the float cache stored in float16 (rounded to nearest even as written, widened as
    read; the arithmetic stays in the model's float): half the bytes, nothing quantized."""

    name = "kv16"
    stored = "float16"


class Int8Cache(_TiledCache):
    """``kv8``: int8 codes, symmetric, one fp32 scale per position and KV head."""

    name = "kv8"

    def buffers(self, role):
        kv = self.kv
        return (CacheBuffer("", _cache_dims(kv, role), "int8"),
                CacheBuffer(".scale", (1, kv.num_kv_heads, CAPACITY), "float32"))

    def append_kernel(self, role, ring=False):
        return attention.kv8_append_kernel(self.kv.num_kv_heads, self.kv.head_dim, role == "key", self.kv.dtype,
                                           ring)

    def prefix_kernel(self, role, ring=False):
        return attention.kv8_dequantize_kernel(self.kv.num_kv_heads, self.kv.head_dim, role == "key", self.kv.dtype,
                                               ring)

    def reader(self, role):
        return attention.int8_cache(self.kv.num_kv_heads, self.kv.head_dim, f"{role}_cache", role == "key",
                                    self.kv.dtype)


class Int4Cache(KVScheme):
    """``kv4``: KIVI-style int4 (see :mod:`lowbit.codegen.kivi` for the layout and rounding). Not a
    ring: its groups of positions and its float window are laid out by position from 0, so a
    sliding-window layer keeps every position (its window still applied by the graph's mask)."""

    roles_differ = True
    rings = False

    def __init__(self, kv: KVLayout, quant: KVQuant):
        super().__init__(kv)
        if kv.head_dim % quant.group:
            raise LowbitError(f"kv4 group={quant.group} does not divide the model's head_dim {kv.head_dim} (values "
                              f"are quantized in groups of {quant.group} channels); use a divisor of {kv.head_dim}")
        if kv.head_dim % 2:
            raise LowbitError(f"kv4 packs two channels per byte, and head_dim {kv.head_dim} is odd; use +kv8")
        self.layout = kivi.Kivi(kv.num_kv_heads, kv.head_dim, quant.group, quant.residual)
        self.name = quant.name
        self.capacity_multiple = quant.group

    def buffers(self, role):
        return tuple(CacheBuffer(*entry) for entry in self.layout.buffers(role))

    def append_kernel(self, role, ring=False):
        assert not ring, "kv4 does not ring"
        return self.layout.append_kernel(role, self.kv.dtype)

    def prefix_kernel(self, role, ring=False):
        assert not ring, "kv4 does not ring"
        return self.layout.dequantize_kernel(role, self.kv.dtype)

    def attention_kernel(self, q_heads, scale, bias_heads, ring=False):
        assert not ring, "kv4 does not ring"
        return self.layout.attention_kernel(q_heads, scale, bias_heads, self.kv.dtype)

    def prompt_attention_kernel(self, q_heads, scale, bias_heads, ring=False):
        """The float cache's prompt attention, over the prefix :meth:`prompt_layout_kernel` reads back."""
        assert not ring, "kv4 does not ring"
        return FloatCache(self.kv).prompt_attention_kernel(q_heads, scale, bias_heads)

    def prompt_layout_kernel(self, role):
        return self.layout.dequantize_kernel(role, self.kv.dtype, float_layout=True)


def kv_scheme(quant: KVQuant | None, kv: KVLayout) -> KVScheme:
    """The scheme a recipe's ``kv`` setting selects for a model's KV layout."""
    if quant is None:
        return FloatCache(kv)
    if kv.dtype != "float32":
        raise LowbitError(f"+kv{quant.bits} compresses a float32 cache; this model's cache is {kv.dtype}")
    if quant.bits == 16:
        return Float16Cache(kv)
    return Int8Cache(kv) if quant.bits == 8 else Int4Cache(kv, quant)
