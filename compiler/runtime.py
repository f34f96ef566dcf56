"""The runtime: load a verified artifact and run prefill / decode / generate; the KV cache lives here."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np

from .artifact import LIBRARY, WEIGHTS, read_manifest
from .errors import LowbitError


@dataclasses.dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first new token comes from prefill; the others from decode steps
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


class Session:
    """A loaded artifact with its own KV cache. Not thread-safe: one session per generation stream."""

    def __init__(self, artifact_dir: str | Path):
        import tvm
        from safetensors.numpy import load_file

        path = Path(artifact_dir)
        manifest = read_manifest(path)  # verifies every checksum before anything loads
        arrays = load_file(str(path / WEIGHTS))
        missing = [name for name in manifest["weight_names"] if name not in arrays]
        if missing:
            raise LowbitError(f"artifact {path}: {WEIGHTS} lacks weight {missing[0]}; recompile it")
        tokenizer = path / "tokenizer.json"
        self._setup(tvm.runtime.load_module(str(path / LIBRARY)), arrays, manifest,
                    tokenizer if tokenizer.is_file() else None, str(path))

    @classmethod
    def in_memory(cls, executable, params: dict[str, np.ndarray], manifest: dict,
                  tokenizer_file: Path | None) -> "Session":
        """A session on a freshly built module, without writing an artifact (``lowbit eval MODEL``)."""
        session = cls.__new__(cls)
        session._setup(executable, params, manifest, tokenizer_file, manifest["model"]["name"])
        return session

    def _setup(self, library, arrays: dict, manifest: dict, tokenizer_file: Path | None, where: str) -> None:
        import tvm
        from tvm import relax

        self.where = where
        self.manifest = manifest
        self.device = tvm.cpu()
        self._tvm = tvm
        self._vm = relax.VirtualMachine(library, self.device)
        self._weights = [tvm.runtime.tensor(arrays[name], self.device) for name in manifest["weight_names"]]
        kv = manifest["kv_cache"]
        self.num_layers, self.kv_heads, self.head_dim = kv["num_layers"], kv["num_kv_heads"], kv["head_dim"]
        self.max_context = int(manifest["max_context"])
        self.eos_token_ids = set(manifest.get("eos_token_ids", []))
        self.tokenizer = None
        if tokenizer_file is not None:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.reset()

    # -- cache -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation: empty KV cache."""
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        self._cache = [self._tvm.runtime.tensor(empty, self.device) for _ in range(2 * self.num_layers)]
        self.position = 0

    @contextlib.contextmanager
    def weights_replaced(self, arrays: dict[str, np.ndarray]):
        """Run with the named weights replaced by ``arrays`` (same shapes and dtypes), restored on exit."""
        names = self.manifest["weight_names"]
        saved = {}
        try:
            for name, array in arrays.items():
                index = names.index(name)
                old = self._weights[index]
                if tuple(old.shape) != array.shape or str(old.dtype) != str(array.dtype):
                    raise LowbitError(f"weight {name}: replacement {array.dtype}{list(array.shape)} does not match "
                                      f"{old.dtype}{list(old.shape)}")
                saved[index] = old
                self._weights[index] = self._tvm.runtime.tensor(array, self.device)
            yield self
        finally:
            for index, old in saved.items():
                self._weights[index] = old

    # -- model calls ---------------------------------------------------------------------------
    def _run(self, entry: str, token_ids: np.ndarray) -> np.ndarray:
        count = token_ids.shape[1]
        if self.position + count > self.max_context:
            raise LowbitError(
                f"{self.position + count} tokens exceed the model's context of {self.max_context} "
                "tokens; shorten the prompt or lower --max-new-tokens"
            )
        inputs = [self._tvm.runtime.tensor(token_ids.astype(np.int64), self.device)]
        outputs = self._vm[entry](*inputs, *self._cache, *self._weights)
        self._cache = list(outputs[1:])
        self.position += count
        return outputs[0].numpy()[0]

    def prefill(self, token_ids) -> np.ndarray:
        """Run the prompt through the model; returns logits ``[len(token_ids), vocab]``."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] == 0:
            raise LowbitError("the prompt is empty: give at least one token")
        return self._run("prefill", ids)

    def decode(self, token_id: int) -> np.ndarray:
        """Feed one token; returns its logits ``[vocab]``."""
        return self._run("decode", np.array([[int(token_id)]], dtype=np.int64))[0]

    # -- text ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise LowbitError(f"{self.where} has no tokenizer.json; pass token ids instead of text")
        return self.tokenizer.encode(text).ids

    def decode_text(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids)) if self.tokenizer is not None else ""

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> Generation:
        """Generate after ``prompt`` (text or token ids); greedy unless ``temperature > 0``."""
        if max_new_tokens < 1:
            raise LowbitError("max_new_tokens must be at least 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise LowbitError("temperature must be >= 0 and top_p in (0, 1]")
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if len(ids) + max_new_tokens > self.max_context:
            raise LowbitError(
                f"prompt of {len(ids)} tokens plus {max_new_tokens} new tokens exceeds the model's context "
                f"of {self.max_context} tokens; shorten the prompt or lower --max-new-tokens"
            )
        rng = np.random.default_rng(seed)
        self.reset()
        start = time.perf_counter()
        logits = self.prefill(ids)[-1]
        prefill_seconds = time.perf_counter() - start
        new: list[int] = []
        start = time.perf_counter()
        while True:
            token = _sample(logits, temperature, top_p, rng)
            new.append(token)
            if token in self.eos_token_ids or len(new) == max_new_tokens:
                break
            logits = self.decode(token)
        decode_seconds = time.perf_counter() - start
        return Generation(self.decode_text(new), new, len(ids), len(new), prefill_seconds, decode_seconds)

    def logits(self, token_ids) -> np.ndarray:
        """Logits ``[len(token_ids), vocab]`` of a fresh prefill (the cache is reset first)."""
        self.reset()
        return self.prefill(token_ids)


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.cumsum(probs[order]) - probs[order] < top_p
    kept = order[keep]
    return int(rng.choice(kept, p=probs[kept] / probs[kept].sum()))
