"""Accuracy bars on the real model (the cheap setting of the accuracy issue's bars).

SmolLM2-135M is imported and calibrated once per session (``tests/conftest.py``: 16 windows of 256
tokens of the bundled calibration text, keep=autoN's probe on 32 of them); each recipe is quantized
and built in memory and scored on 1024 held-out tokens of Alice (windows of 256).
gap = PPL / PPL_float - 1.
"""

import numpy as np
import pytest

from lowbit.compiler.runtime.evaluation import evaluate_session
from lowbit.compiler.sources.texts import read_text

pytestmark = pytest.mark.slow

EVAL_TOKENS, WINDOW = 1024, 256


class Remembered:
    """A session whose ``prefill`` logits are kept per input: the fp32 reference scores the same
    windows for every recipe, so it runs them once."""

    def __init__(self, session):
        self.session = session
        self.logits: dict[tuple[int, ...], np.ndarray] = {}

    def prefill(self, ids) -> np.ndarray:
        key = tuple(ids)
        if key not in self.logits:
            self.logits[key] = self.session.prefill(ids)
        return self.logits[key]


@pytest.fixture(scope="module")
def bench(smol):
    """``bench(recipe) -> (EvalResult, gap)`` (memoized) on the session's calibrated SmolLM2, scored
    against its fp32 build."""
    ids = smol.prepared.tokenize(read_text("alice29"))[: EVAL_TOKENS + 1]
    sessions: dict = {}
    results: dict = {}

    def session(recipe: str):
        if recipe not in sessions:
            built = smol.built(recipe).session()
            sessions[recipe] = Remembered(built) if recipe == "fp32" else built
        return sessions[recipe]

    def score(recipe: str):
        """``(EvalResult, gap)`` of ``recipe``; quantized recipes are compared with fp32."""
        if recipe not in results:
            reference = None if recipe == "fp32" else session("fp32")
            results[recipe] = evaluate_session(session(recipe), ids, WINDOW, reference)
        result = results[recipe]
        return result, result.perplexity / score("fp32")[0].perplexity - 1 if recipe != "fp32" else 0.0

    return score


def test_w8a16_rtn_is_nearly_free(bench):
    result, gap = bench("w8a16-rtn")
    assert gap <= 0.005, f"w8a16-rtn gap {gap:.4f}"
    assert result.top1_agreement > 0.93 and result.kl_vs_float < 0.01


def test_smoothquant_halves_the_w8a8_gap(bench):
    """Same activation granularity (int8 per token): smoothing must at least halve naive's gap."""
    (_, naive), (smooth_result, smooth) = bench("w8a8-naive"), bench("w8a8-smoothquant")
    assert smooth <= 0.03, f"w8a8-smoothquant gap {smooth:.4f}"
    assert smooth <= 0.5 * naive, f"smoothquant gap {smooth:.4f} vs naive {naive:.4f}"
    assert smooth_result.kl_vs_float < bench("w8a8-naive")[0].kl_vs_float


@pytest.mark.parametrize("recipe", ["w4a16-awq-g128", "w4a16-gptq-g128"])
def test_calibrated_int4_beats_round_to_nearest(bench, recipe):
    """The issue's bar is gap <= 0.6 x RTN's, met on 4096 tokens with 64 x 512 calibration tokens
    (bench/RESULTS.md). This cheaper setting guards the improvement with some margin."""
    (rtn_result, rtn), (result, gap) = bench("w4a16-rtn-g128"), bench(recipe)
    assert gap <= 0.75 * rtn, f"{recipe} gap {gap:.4f} vs rtn {rtn:.4f}"
    assert result.kl_vs_float < rtn_result.kl_vs_float


def test_keep_auto_keeps_the_layers_that_move_the_output_most(bench):
    """Ranked end to end (the model's KL with one layer quantized), four layers of 211 kept in int8
    recover a large part of RTN's gap (ten layers ranked by their own output error recovered 7 %).
    Ranked on 32 probe tokens: gap 0.31 against RTN's 0.82, KL 0.36 against 0.73."""
    (rtn_result, rtn), (result, kept) = bench("w4a16-rtn-g128"), bench("w4a16-rtn-g128:keep=auto4")
    assert kept < 0.6 * rtn, f"keep=auto4 gap {kept:.4f} vs rtn {rtn:.4f}"
    assert result.kl_vs_float < 0.7 * rtn_result.kl_vs_float


def test_int8_activations_per_group_cost_little_over_weight_only(bench):
    """w4a8 quantizes every linear input to int8 per token and group on top of w4a16's grid: the
    activations may add at most 3 points of perplexity gap (4,096 tokens: +39.0 % against +38.9 %)."""
    (_, weight_only), (result, w4a8) = bench("w4a16-rtn-g32"), bench("w4a8-rtn-g32")
    assert w4a8 <= weight_only + 0.03, f"w4a8-rtn-g32 gap {w4a8:.4f} vs w4a16-rtn-g32 {weight_only:.4f}"
    assert result.perplexity / result.float_perplexity - 1 == pytest.approx(w4a8, rel=1e-6)  # same float windows
