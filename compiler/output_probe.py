"""How far quantizing one linear layer alone moves the model's output: the end-to-end sensitivity.

The float model is built once, for the host (:meth:`lowbit.compiler.building.PreparedModel.build`).
:meth:`OutputProbe.kl` replaces one layer's weight by a given one (the float weight a quantized
layer's codes stand for) and returns the mean ``KL(p_float || p)`` over the probe tokens, the
measure ``lowbit eval`` reports. A layer's own relative output error misses how an error
propagates: on SmolLM2 the output head, whose error reaches the logits unattenuated, moves the
output most though its own error is unremarkable. Weight-only: activation quantization is not
simulated in the float graph.
"""

from __future__ import annotations

import numpy as np

from lowbit.passes.quantize_linears import pack_linear
from lowbit.passes.recipe import Recipe
from lowbit.targets import get_target

from .runtime.evaluation import log_softmax


class OutputProbe:
    """A float ``session`` (an fp32 build for the host) and its log-probabilities on ``token_ids``."""

    def __init__(self, session, token_ids: list[int]):
        self.session = session
        self.token_ids = list(token_ids)[: session.max_context]
        self.reference = self._log_probs()

    def _log_probs(self) -> np.ndarray:
        return log_softmax(self.session.prefill(self.token_ids))

    def kl(self, name: str, weight_nk: np.ndarray) -> float:
        """Mean KL divergence of the output with linear weight ``name`` replaced by ``weight_nk`` ``[N, K]``."""
        tiled = pack_linear(weight_nk, Recipe("fp32"), name, get_target("host")).tensors["tiled"]
        with self.session.weights_replaced({f"{name}.tiled": tiled}):
            log_p = self._log_probs()
        return float((np.exp(self.reference) * (self.reference - log_p)).sum(axis=-1).mean())
