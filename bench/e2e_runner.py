"""One runner of bench/e2e.py, in its own process: loads one model, then answers commands on stdin.

    python bench/e2e_runner.py KIND MODEL_PATH [OPTIONS_JSON]

KIND is ``lowbit`` (an artifact folder), ``llama.cpp`` (a GGUF file), ``ort-genai`` (an ONNX
Runtime GenAI model folder) or ``torch`` (a Hugging Face folder). OPTIONS_JSON (llama.cpp only):
``n_ctx`` (default 1024), ``type_k`` / ``type_v`` (cache types such as ``q8_0``, ``q4_0``; default
f16), ``flash_attn`` (default false; llama.cpp needs it for a quantized value cache) and
``score_batch`` (tokens per evaluation call of the scoring instance, default 512). Commands, one
JSON object per line in and out: ``{"cmd": "speed", "prompt": [ids], "new": N}`` -> ``{"prefill_s",
"decode_s", "tokens"}`` (one prefill of the prompt from an empty cache, in chunks of at most 512
tokens, then N decode steps, each fed the argmax of the previous logits, end-of-sequence ignored);
``{"cmd": "nll", "window": [ids], "chunk": C}`` -> ``{"nll", "count"}`` (the summed negative
log-likelihood of tokens 1.. of the window given the ones before it, from an empty cache; with
``chunk`` (lowbit) the window is fed ``C`` tokens per call, so later tokens attend through the KV
cache as stored); ``{"cmd": "quit"}``. Every runner uses ``THREADS`` threads.
"""

from __future__ import annotations

import no_shadowing  # noqa: F401  (first: bench/kernels.py must not pass for the kernels package)

import json
import os
import sys
import time

THREADS = int(os.environ.get("E2E_THREADS", "2"))
os.environ["TVM_NUM_THREADS"] = str(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_nll(logits: np.ndarray, window: list[int]) -> float:
    """Summed NLL of ``window[1:]`` under ``logits[:-1]`` (``[len(window), vocab]``)."""
    lp = log_softmax(logits[: len(window) - 1])
    return float(-lp[np.arange(len(window) - 1), window[1:]].sum())


class Lowbit:
    def __init__(self, path, _options):
        from lowbit.compiler import load

        self.session = load(path)

    def prefill(self, ids):  # in the chunks generate() feeds
        self.session.reset()
        return self.session.feed(ids)

    def step(self, token):
        return self.session.decode(token)

    def logits(self, window, chunk=None):
        from lowbit.compiler.runtime.evaluation import chunked_logits

        return chunked_logits(self.session, window, chunk)


class LlamaCpp:
    def __init__(self, path, options):
        import llama_cpp

        cache = {f"type_{part}": getattr(llama_cpp, f"GGML_TYPE_{options[f'type_{part}'].upper()}")
                 for part in ("k", "v") if f"type_{part}" in options}
        common = dict(model_path=path, n_ctx=options.get("n_ctx", 1024), n_threads=THREADS, n_threads_batch=THREADS,
                      flash_attn=options.get("flash_attn", False), verbose=False, **cache)
        self.llm = llama_cpp.Llama(**common, n_batch=512, n_ubatch=512)
        batch = options.get("score_batch", 512)  # llama.cpp feeds an evaluation this many tokens per call
        self.scoring = llama_cpp.Llama(**common, n_batch=batch, n_ubatch=batch, logits_all=True)

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return None  # without logits_all llama-cpp-python keeps no logits (its sampler reads them): feed token 0

    def step(self, token):
        self.llm.eval([token])
        return None

    def logits(self, window, _chunk=None):
        self.scoring.reset()
        self.scoring.eval(window)
        return np.asarray(self.scoring.scores[: len(window)])


class OrtGenAI:
    def __init__(self, path, _options):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(path)
        config.clear_providers()
        if hasattr(config, "overlay"):  # the same thread count as every other runner
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": THREADS, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def _generator(self, length):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, do_sample=False, min_length=length)
        return self.og.Generator(self.model, params)

    def prefill(self, ids):
        self.generator = self._generator(len(ids) + self.new + 1)
        self.generator.append_tokens(ids)
        return None  # greedy search runs inside generate_next_token

    def step(self, _token):
        self.generator.generate_next_token()
        return None

    def logits(self, window, _chunk=None):
        generator = self._generator(len(window) + 1)
        generator.append_tokens(window)
        logits = np.asarray(generator.get_output("logits"))
        if logits.shape[-2] != len(window):
            raise RuntimeError(f"ORT GenAI returned logits for {logits.shape[-2]} of {len(window)} positions")
        return logits.reshape(len(window), -1)


class Torch:
    def __init__(self, path, _options):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def prefill(self, ids):
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids]), use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].numpy()

    def step(self, token):
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([[token]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].numpy()

    def logits(self, window, _chunk=None):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([window])).logits[0].numpy()


RUNNERS = {"lowbit": Lowbit, "llama.cpp": LlamaCpp, "ort-genai": OrtGenAI, "torch": Torch}


def main() -> None:
    kind, path = sys.argv[1], sys.argv[2]
    runner = RUNNERS[kind](path, json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        if command["cmd"] == "speed":
            prompt, new = command["prompt"], command["new"]
            runner.new = new
            start = time.perf_counter()
            logits = runner.prefill(prompt)
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(new):
                token = 0 if logits is None else int(np.argmax(logits))
                logits = runner.step(token)
            reply = {"prefill_s": prefill_s, "decode_s": time.perf_counter() - start, "tokens": new}
        else:
            window = command["window"]
            reply = {"nll": window_nll(runner.logits(window, command.get("chunk")), window), "count": len(window) - 1}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
