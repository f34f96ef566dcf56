"""The artifact manifest's schema: what ``manifest.json`` must hold, checked field by field.

The manifest is the artifact's documented ABI (README, "Artifact"). :func:`validate_manifest`
checks a parsed manifest against :class:`Manifest` (strict types: a string is never taken for a
number) and raises one :class:`LowbitError` naming the first bad field, so a hand-edited or
damaged manifest is refused before anything in the artifact is loaded.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from lowbit.codegen.errors import LowbitError

FORMAT_VERSION = 5

_Count = Annotated[int, Field(ge=1)]
_Size = Annotated[int, Field(ge=0)]
_Name = Annotated[str, StringConstraints(min_length=1)]


class _Record(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class ModelInfo(_Record):
    name: str
    kind: _Name


class Named(_Record):
    name: _Name


class TargetInfo(Named):
    machines: list[_Name] | None = None  # platform.machine() values that run its code
    cpu_flags: dict[_Name, _Name] | None = None  # capability -> the /proc/cpuinfo flag that proves it


class CacheBufferInfo(_Record):
    name: _Name  # after cache.{layer}.
    shape: list[Annotated[int, Field(ge=1)] | Annotated[str, StringConstraints(pattern=r"^capacity(/[1-9][0-9]*)?$")]]
    dtype: _Name


class KVCacheInfo(_Record):
    num_layers: _Count
    num_kv_heads: _Count
    head_dim: _Count
    dtype: _Name
    layout: str
    scheme: _Name  # float32, kv16, kv8, kv4:group=G;residual=R
    capacity_multiple: _Count  # every allocated capacity is a multiple of it
    buffers: list[CacheBufferInfo]  # one layer's cache tensors, in the order entry functions take them
    attention_fused: _Size  # layers whose decode attention is one kernel over the cache
    prompt_attention_fused: _Size = 0  # layers whose prompt attention is one (absent from artifacts before it)
    attention_layers: _Count
    windows: list[_Count | None] = []  # per layer, the window of a cache kept as a ring (empty: no rings)

    @model_validator(mode="after")
    def _one_window_per_layer(self) -> "KVCacheInfo":
        if self.windows and len(self.windows) != self.num_layers:
            raise ValueError(f"windows: {len(self.windows)} entries for {self.num_layers} layers")
        return self


class WeightInfo(_Record):
    name: _Name
    shape: list[_Size]
    dtype: _Name


class FileInfo(_Record):
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    bytes: _Size


class Manifest(_Record):
    format_version: int
    model: ModelInfo
    recipe: Named
    target: TargetInfo
    inputs: list[_Name]
    outputs: list[_Name]
    entry_functions: list[_Name]
    kv_cache: KVCacheInfo
    vocab_size: _Count
    max_context: Annotated[int, Field(ge=2)]
    eos_token_ids: list[_Size]
    weight_bytes: _Size
    layers: dict[str, str]
    weights: list[WeightInfo]
    files: dict[str, FileInfo]

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        names = [w.name for w in self.weights]
        if len(set(names)) != len(names):
            raise ValueError("weights: a weight name appears twice")
        if any(i >= self.vocab_size for i in self.eos_token_ids):
            raise ValueError(f"eos_token_ids: an id is not below vocab_size {self.vocab_size}")
        return self


def validate_manifest(manifest, where: str) -> None:
    """Raise a :class:`LowbitError` naming the first field of ``manifest`` that breaks the schema."""
    if not isinstance(manifest, dict):
        raise LowbitError(f"{where}: manifest.json holds a {type(manifest).__name__}, not an object; recompile it")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise LowbitError(f"{where}: format version {version!r} is not supported by this lowbit "
                          f"(reads version {FORMAT_VERSION}); recompile it")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise LowbitError(f"{where}: manifest.json field {field}: {error['msg']}; recompile it") from None
