"""How far quantizing one linear layer alone moves the model's output: the end-to-end sensitivity.

The float model is built once for the host. :meth:`OutputProbe.kl` replaces one layer's weight by
a given one (the float weight a quantized layer's codes stand for) and returns the mean
``KL(p_float || p)`` over the probe tokens, the measure ``lowbit eval`` reports. A layer's own
relative output error misses how an error propagates: on SmolLM2 the output head, whose error
reaches the logits unattenuated, moves the output most though its own error is unremarkable.
Weight-only: activation quantization is not simulated in the float graph.
"""

from __future__ import annotations

import numpy as np

from lowbit.passes.quantize_weights import pack_linear

from .evaluate import log_softmax
from .model_ir import ModelIR
from .recipes import Recipe
from .runtime import Session

PROBE_TOKENS = 256


class OutputProbe:
    """The float build of ``ir`` and its log-probabilities on ``token_ids`` (at most :data:`PROBE_TOKENS`)."""

    def __init__(self, ir: ModelIR, chip, token_ids: list[int]):
        from lowbit.codegen.build import build

        from .pipeline import run_pipeline

        result = run_pipeline(ir, Recipe("fp32"), chip)
        manifest = {"model": {"name": "output probe"}, "vocab_size": ir.vocab_size,
                    "kv_cache": vars(ir.kv), "max_context": ir.max_context}
        self.session = Session.in_memory(build(result.ir.mod, chip), result.ir.params, manifest, None)
        self.tile = chip.linear_tile
        self.token_ids = list(token_ids)[: min(PROBE_TOKENS, ir.max_context)]
        self.reference = self._log_probs()

    def _log_probs(self) -> np.ndarray:
        self.session.reset()
        return log_softmax(self.session.prefill(self.token_ids))

    def kl(self, name: str, weight_nk: np.ndarray) -> float:
        """Mean KL divergence of the output with linear weight ``name`` replaced by ``weight_nk`` ``[N, K]``."""
        tiled = pack_linear(weight_nk, Recipe("fp32"), name, self.tile).tensors["tiled"]
        with self.session.weights_replaced({f"{name}.tiled": tiled}):
            log_p = self._log_probs()
        return float((np.exp(self.reference) * (self.reference - log_p)).sum(axis=-1).mean())
