"""The runtime: load a verified artifact and run prefill / decode / generate; the KV cache lives here."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from .artifact import LIBRARY, WEIGHTS, read_manifest
from .host_memory import arena_tensors
from .threads import use_available_cores
from lowbit.codegen.errors import LowbitError
from lowbit.codegen.cache_layout import (RING_CALL_TOKENS, CacheBuffer, capacity_for, kv_report, layer_capacity,
                                         layer_windows)
from lowbit.codegen.entry_points import ENTRY_FUNCTIONS, PROMPT, PROMPT_LAST, STEP
from lowbit.codegen.host_cpu import TILE_CAPABILITY, missing_here, request_tile_state

INITIAL_CAPACITY = 256  # cache positions allocated for a new session that fixes no capacity
PREFILL_CHUNK = 128  # the most prompt tokens per prefill call in generate
PREFILL_SCORES = 1 << 18  # a chunk's attention scores per head at most (chunk x positions attended)

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
    """A loaded artifact with its own KV cache. Not thread-safe: one session per generation stream.

    The cache holds one conversation: :meth:`prefill` starts a new one, :meth:`extend` and
    :meth:`decode` continue it, :meth:`generate` starts a new one; :attr:`position` is its length.
    Token ids are checked against the vocabulary the artifact records before they reach a kernel.

    ``context``: the cache is allocated once, for that many positions (at most the model's
    context), and a conversation longer than it is refused; by default it is allocated for
    ``INITIAL_CAPACITY`` positions and grows by doubling, up to the model's context. A layer whose
    cache is a ring (a sliding window, ``kv_cache.windows``) stops growing at its window plus
    ``RING_CALL_TOKENS``, and calls then write at most that many tokens each (longer ones are
    split).
    """

    def __init__(self, artifact_dir: str | Path, trusted_keys=None, context: int | None = None):
        path = Path(artifact_dir)
        # verifies the signature (if asked) and every checksum before anything loads
        manifest = read_manifest(path, trusted_keys)
        _check_cpu(path, manifest["target"])
        arrays = _load_weights(path, manifest)
        tokenizer = path / "tokenizer.json"
        self._setup(_load_library(path), arrays, manifest, tokenizer if tokenizer.is_file() else None,
                    f"artifact {path}", verify=True, context=context)

    @classmethod
    def in_memory(cls, executable, params: dict[str, np.ndarray], manifest: dict,
                  tokenizer_file: Path | None, context: int | None = None) -> "Session":
        """A session on a freshly built module, without writing an artifact (``lowbit eval MODEL``).

        ``manifest`` needs ``model``, ``kv_cache``, ``max_context`` and ``vocab_size``; the weights
        are ``params``, in the order the module's functions take them."""
        weights = [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in params.items()]
        session = cls.__new__(cls)
        session._setup(executable, params, dict(manifest, weights=weights), tokenizer_file, manifest["model"]["name"],
                       context=context)
        return session

    def _setup(self, library, arrays: dict, manifest: dict, tokenizer_file: Path | None, where: str,
               verify: bool = False, context: int | None = None) -> None:
        """``verify``: check that the library's entry functions take what the manifest lists."""
        import tvm
        from tvm.runtime.vm import VirtualMachine

        use_available_cores()
        _request_cpu_state(where, manifest.get("target", {}))
        self.where = where
        self.manifest = manifest
        self.device = tvm.cpu()
        self._tvm = tvm
        # Decode allocates the same sizes every step: TVM's pooled allocator keeps them for the next.
        # A prompt's chunks allocate scores that grow with the position, which a pool would keep
        # chunk after chunk (measured: +270 MB of peak memory at 4,032 tokens): prefill frees its own.
        self._vm = VirtualMachine(library, self.device)
        self._prefill_vm = VirtualMachine(library, self.device, memory_cfg="naive")
        self._weight_names = [entry["name"] for entry in manifest["weights"]]
        if verify:
            self._check_signature()
        self._weights, views = arena_tensors([(arrays[name].shape, arrays[name].dtype) for name in self._weight_names])
        for view, name in zip(views, self._weight_names):
            np.copyto(view, arrays[name])
        kv = manifest["kv_cache"]
        self.num_layers = kv["num_layers"]
        # every cache tensor in the entry functions' order, with its layer's ring window (or None)
        self._buffers = [(CacheBuffer("", tuple(b["shape"]), b["dtype"]), window)
                         for window in layer_windows(kv) for b in kv["buffers"]]
        self._rings = any(window is not None for _, window in self._buffers)
        self._capacity_multiple = int(kv["capacity_multiple"])
        self.max_context = int(manifest["max_context"])
        if context is not None and not (_is_whole(context) and 1 <= context <= self.max_context):
            raise LowbitError(f"a KV cache for {context!r} tokens: use a whole number from 1 to the "
                              f"{self.max_context}-token context of {where}")
        self.fixed_context = context
        self.vocab_size = int(manifest["vocab_size"])
        self.eos_token_ids = set(manifest.get("eos_token_ids", []))
        self.tokenizer = None
        if tokenizer_file is not None:
            from tokenizers import Tokenizer

            try:
                self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
            except Exception as exc:  # tokenizers raises its own exception type for any bad file
                raise LowbitError(f"{where}: tokenizer.json cannot be read ({exc}); recompile the artifact") \
                    from None
        self._cache, self.capacity = [], 0  # allocated by the first call (see _reserve)
        self.reset()
        if context is not None:
            self._reserve(context)

    def _check_signature(self) -> None:
        """The entry functions take as many inputs as the manifest lists, then exactly its weights, in
        its order."""
        if self.manifest["entry_functions"] != list(ENTRY_FUNCTIONS):
            raise LowbitError(f"{self.where}: entry_functions must be {', '.join(ENTRY_FUNCTIONS)}; "
                              "recompile the artifact")
        kv = self.manifest["kv_cache"]
        if len(self.manifest["inputs"]) != 2 + len(kv["buffers"]) * kv["num_layers"]:
            raise LowbitError(f"{self.where}: manifest.json lists {len(self.manifest['inputs'])} inputs for "
                              f"{kv['num_layers']} layers of {len(kv['buffers'])} cache tensors; recompile it")
        for entry in self.manifest["entry_functions"]:
            try:
                arity = self._vm._get_function_arity(entry)
                names = [self._vm._get_function_param_name(entry, i) for i in range(arity)]
            except Exception:  # TVM reports an unknown function by its own error type
                raise LowbitError(f"{self.where}: model.so has no function {entry!r}; recompile the artifact") \
                    from None
            inputs = len(self.manifest["inputs"])
            if len(names) != inputs + len(self._weight_names) or names[inputs:] != self._weight_names:
                raise LowbitError(f"{self.where}: manifest.json does not describe model.so ({entry} takes "
                                  f"{len(names)} arguments, the manifest lists {inputs} inputs and "
                                  f"{len(self._weight_names)} weights, or another order); recompile the artifact")

    # -- cache -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (the cache's memory is kept for the next one)."""
        self.position = 0

    def kv_report(self, context: int | None = None) -> dict:
        """The cache's scheme and bytes per token at ``context`` positions (default: this session's
        fixed capacity, or the model's context; see :func:`~lowbit.passes.schemes.kv.kv_report`)."""
        return kv_report(self.manifest["kv_cache"], context or self.fixed_context or self.max_context)

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache holds now."""
        if not self.capacity:
            return 0
        return sum(buffer.bytes_at(self._layer_capacity(window)) for buffer, window in self._buffers)

    def _layer_capacity(self, window: int | None, capacity: int | None = None) -> int:
        return layer_capacity(capacity or self.capacity, window, self._capacity_multiple)

    def _reserve(self, tokens: int) -> None:
        """Caches that hold ``tokens`` positions: allocated once (for ``context`` positions when the
        session fixes it), else grown by doubling (up to the model's context) with the conversation so
        far copied over, so growth costs O(1) per token. Capacities are multiples of the KV scheme's
        ``capacity_multiple``."""
        if tokens <= self.capacity:
            return
        if self.fixed_context is not None and self.capacity:
            raise LowbitError(f"{tokens} tokens exceed the KV cache of {self.fixed_context} tokens this session "
                              f"allocated (--max-context); start it with a larger one, up to {self.max_context}")
        wanted = tokens if self.fixed_context is not None else max(tokens, 2 * self.capacity, INITIAL_CAPACITY)
        capacity = capacity_for(min(wanted, self.max_context), self._capacity_multiple)
        layers = [self._layer_capacity(window, capacity) for _, window in self._buffers]
        fresh = [index for index, (_, window) in enumerate(self._buffers)  # (a ring at its full size is kept)
                 if not self._cache or layers[index] != self._layer_capacity(window)]
        # kernels use only positions a call wrote (decode attention masks the rest of its last chunk);
        # a ring that grows has not wrapped yet (its capacity was the session's)
        tensors, views = arena_tensors([(self._buffers[index][0].shape(layers[index]), self._buffers[index][0].dtype)
                                        for index in fresh])
        cache = list(self._cache) or [None] * len(self._buffers)
        for index, tensor, view in zip(fresh, tensors, views):
            if self._cache and self.position:  # capacity axes grow; fixed ones match
                old = self._cache[index].numpy()
                view[tuple(slice(0, n) for n in old.shape)] = old
            cache[index] = tensor
        self._cache = cache
        self.capacity = capacity

    @contextlib.contextmanager
    def weights_replaced(self, arrays: dict[str, np.ndarray]):
        """Run with the named weights replaced by ``arrays`` (same shapes and dtypes), restored on exit."""
        names = self._weight_names
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
    def _checked_ids(self, token_ids) -> np.ndarray:
        """``token_ids`` as ``int64[1, n]``, every id an integer in ``[0, vocab_size)``."""
        try:
            ids = np.asarray(token_ids)
        except (ValueError, TypeError) as exc:
            raise LowbitError(f"token ids must be a sequence of integers ({exc})") from None
        if ids.size and (ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer)):
            raise LowbitError(f"token ids must be integers, got {ids.dtype} values")
        ids = ids.reshape(1, -1)
        if ids.shape[1] == 0:
            raise LowbitError("no token ids given: give at least one token")
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            raise LowbitError(f"token id {ids[0, bad[0]]} at position {bad[0]} is outside the vocabulary "
                              f"[0, {self.vocab_size}) of {self.where}")
        return ids.astype(np.int64)

    def _run(self, entry: str, ids: np.ndarray) -> np.ndarray:
        count = ids.shape[1]
        if self._rings and count > RING_CALL_TOKENS:  # a ring holds its window and one call's tokens
            pieces = [self._run(entry, ids[:, first:first + RING_CALL_TOKENS])
                      for first in range(0, count, RING_CALL_TOKENS)]
            return pieces[-1] if entry == PROMPT_LAST else np.concatenate(pieces)
        if self.position + count > self.max_context:
            raise LowbitError(
                f"{self.position + count} tokens exceed the context of {self.max_context} tokens of "
                f"{self.where}; shorten the prompt or lower --max-new-tokens"
            )
        self._reserve(self.position + count)
        inputs = [self._tvm.runtime.tensor(ids, self.device), self._tvm.runtime.ShapeTuple([self.position])]
        try:
            vm = self._vm if entry == STEP else self._prefill_vm
            outputs = vm[entry](*inputs, *self._cache, *self._weights)
        except (ValueError, TypeError) as exc:  # the kernels' own argument checks
            first = next(iter(str(exc).splitlines()), "")
            raise LowbitError(f"{self.where}: the compiled model rejected its weights ({first}); "
                              "recompile the artifact") from None
        self.position += count  # the entry function wrote the tokens' keys and values into the caches
        return np.from_dlpack(outputs[0])[0]  # a view: the tensor lives as long as the array

    def prefill(self, token_ids) -> np.ndarray:
        """Start a new conversation with ``token_ids`` (the cache is emptied first); returns their
        logits ``[len(token_ids), vocab]``. :meth:`extend` continues the current one instead."""
        ids = self._checked_ids(token_ids)
        self.reset()
        return self._run(PROMPT, ids)

    def extend(self, token_ids) -> np.ndarray:
        """Continue the current conversation with ``token_ids`` (after earlier prefill, extend,
        decode or generate calls); returns their logits ``[len(token_ids), vocab]``."""
        return self._run(PROMPT, self._checked_ids(token_ids))

    def feed(self, token_ids) -> np.ndarray:
        """Continue the current conversation with a prompt of any length, in the chunks
        :func:`prefill_chunk` sizes (memory bounded by a chunk's scores, not by the prompt); returns
        the logits of its last token ``[vocab]``. ``reset()`` first to start a new conversation."""
        ids = self._checked_ids(token_ids)
        first = 0
        while first < ids.shape[1]:
            chunk = prefill_chunk(self.position)
            logits = self._run(PROMPT_LAST, ids[:, first:first + chunk])
            first += chunk
        return logits[-1]

    def decode(self, token_id: int) -> np.ndarray:
        """Continue the current conversation with one token; returns its logits ``[vocab]``."""
        return self._run(STEP, self._checked_ids([token_id]))[0]

    # -- text ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise LowbitError(f"{self.where} has no tokenizer.json; pass token ids instead of text "
                              "(lowbit run --prompt-ids)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise LowbitError("the prompt is not valid UTF-8 text") from None
        return self.tokenizer.encode(text).ids

    def decode_text(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids)) if self.tokenizer is not None else ""

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> Generation:
        """Generate after ``prompt`` (text or token ids); greedy unless ``temperature > 0``."""
        if not (_is_whole(max_new_tokens) and max_new_tokens >= 1):
            raise LowbitError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}")
        if not (_is_number(temperature) and 0 <= temperature < math.inf):
            raise LowbitError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not (_is_number(top_p) and 0 < top_p <= 1):
            raise LowbitError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if seed is not None and not (_is_whole(seed) and seed >= 0):
            raise LowbitError(f"seed must be a whole number >= 0, got {seed!r}")
        ids = self.encode(prompt) if isinstance(prompt, str) else self._checked_ids(prompt)[0].tolist()
        limit = self.fixed_context or self.max_context
        if len(ids) + max_new_tokens > limit:
            held = (f"the KV cache of {limit} tokens this session allocated (--max-context; the model's context is "
                    f"{self.max_context})" if self.fixed_context else f"the context of {limit} tokens of {self.where}")
            raise LowbitError(f"prompt of {len(ids)} tokens plus {max_new_tokens} new tokens exceeds {held}; "
                              "shorten the prompt or lower --max-new-tokens")
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        self.reset()
        logits = self.feed(ids)
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


def prefill_chunk(position: int) -> int:
    """Prompt tokens for the next prefill call at ``position``: ``PREFILL_CHUNK``, halved (down to
    32) until the chunk's scores (chunk x positions attended, per head) fit ``PREFILL_SCORES``; 64
    from about 2,000 positions on, so a long prompt's peak memory stays near a short one's.
    Measured on SmolLM2 (``lowbit run``, 4,032 prompt tokens): 512-token chunks peaked 270 MB
    higher with a float cache than these; a 500-token prompt prefills 20 % faster in 128-token
    chunks than in one call."""
    chunk = PREFILL_CHUNK
    while chunk > 32 and chunk * (position + chunk) > PREFILL_SCORES:
        chunk //= 2
    return chunk


def _is_whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


def _check_cpu(path: Path, target: dict) -> None:
    """Refuse an artifact whose code needs what this CPU lacks, before its library is loaded (a
    missing instruction would kill the process with SIGILL). Artifacts that do not record their
    machines and CPU flags (before format 5's ``target.cpu_flags``) are not checked."""
    if "machines" not in target or "cpu_flags" not in target:
        return
    missing = missing_here(target["machines"], target["cpu_flags"], target["cpu_flags"])
    if missing:
        raise LowbitError(f"artifact {path} was compiled for target {target['name']}, which needs "
                          f"{', '.join(missing)}; this CPU lacks it: recompile it here with -t host "
                          "(`lowbit targets` lists what runs here)")


def _request_cpu_state(where: str, target: dict) -> None:
    """Ask the OS for the CPU state the code needs before any of it runs: AMX tiles
    (:func:`~lowbit.codegen.host_cpu.request_tile_state`)."""
    if TILE_CAPABILITY not in target.get("capabilities", ()):
        return
    try:
        request_tile_state()
    except OSError as exc:
        raise LowbitError(f"{where}: its kernels use AMX tiles (target {target.get('name')}), which this system "
                          f"does not grant ({exc.strerror}); recompile it with -t x86-vnni") from None


def _load_library(path: Path):
    import tvm

    try:
        return tvm.runtime.load_module(str(path / LIBRARY))
    except Exception as exc:  # a damaged library fails in the dynamic loader or in TVM's module reader
        raise LowbitError(f"artifact {path}: {LIBRARY} cannot be loaded ({type(exc).__name__}: "
                          f"{next(iter(str(exc).splitlines()), '')}); recompile the artifact") from None


def _load_weights(path: Path, manifest: dict) -> dict[str, np.ndarray]:
    """The weights, each checked against the shape and dtype the manifest records."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise LowbitError(f"artifact {path}: {WEIGHTS} cannot be read ({exc}); recompile the artifact") from None
    for entry in manifest["weights"]:
        array = arrays.get(entry["name"])
        if array is None:
            raise LowbitError(f"artifact {path}: {WEIGHTS} lacks weight {entry['name']}; recompile it")
        if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
            raise LowbitError(f"artifact {path}: weight {entry['name']} is {array.dtype}{list(array.shape)} in "
                              f"{WEIGHTS}, but the manifest says {entry['dtype']}{entry['shape']}; recompile it")
    return arrays


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
