"""Accuracy of a model on real text: perplexity, and agreement with a float reference.

The protocol (shared by ``lowbit eval`` on artifacts and on models): the text's token ids are cut
into non-overlapping windows of ``window + 1`` tokens; each window is run from an empty cache and
every token after the first is scored given its prefix. With ``chunk``, each window is fed in
chunks of that many tokens (a prefill, then extensions of the same conversation), so every token
after the first chunk attends to earlier tokens through the KV cache as stored: that is how a
quantized cache's error is measured, and the reference runs the same protocol. With a float reference run on the same
windows, ``kl_vs_float`` is the mean over scored positions of KL(p_float || p_model) in nats (what
llama.cpp's perplexity tool reports as mean KLD) and ``top1_agreement`` the share of positions where
both models' most likely next token agree.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lowbit.codegen.errors import LowbitError


@dataclasses.dataclass
class EvalResult:
    perplexity: float
    tokens: int
    window: int
    kl_vs_float: float | None = None
    top1_agreement: float | None = None
    float_perplexity: float | None = None  # the reference's, on the same windows
    chunk: int | None = None  # tokens fed per call within a window (None: the whole window at once)

    def as_dict(self) -> dict:
        out = {"perplexity": round(self.perplexity, 4), "tokens": self.tokens, "window": self.window,
               "chunk": self.chunk}
        if self.kl_vs_float is not None:
            out["kl_vs_float"] = round(self.kl_vs_float, 6)
            out["top1_agreement"] = round(self.top1_agreement, 4)
            out["float_perplexity"] = round(self.float_perplexity, 4)
            out["perplexity_gap"] = round(self.perplexity / self.float_perplexity - 1, 4)
        return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def windows(token_ids, window: int) -> list[list[int]]:
    """Non-overlapping windows of ``window + 1`` ids (the last may be shorter; at least 2 ids each)."""
    if window < 1:
        raise LowbitError(f"evaluation window must be at least 1 token, got {window}")
    ids = list(token_ids)
    chunks = [ids[start:start + window + 1] for start in range(0, len(ids) - 1, window)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise LowbitError(f"evaluation text has {len(ids)} tokens; at least 2 are needed")
    return chunks


def evaluate_session(session, token_ids, window: int, reference=None, progress=None,
                     chunk: int | None = None) -> EvalResult:
    """Score ``token_ids`` with ``session`` (anything with ``prefill(ids)`` and ``extend(ids) -> [len,
    vocab]``); see the module docstring for ``chunk``.

    ``reference``: a float session to compare against on the same windows (KL, top-1 agreement).
    """
    if chunk is not None and chunk < 1:
        raise LowbitError(f"evaluation chunk must be at least 1 token, got {chunk}")
    nll = nll_ref = kl = agree = 0.0
    count = 0
    for piece in windows(token_ids, window):
        inputs, targets = piece[:-1], np.asarray(piece[1:])
        log_p = log_softmax(chunked_logits(session, inputs, chunk))
        if not np.isfinite(log_p).all():
            raise LowbitError("the model produced NaN or Inf logits on the evaluation text")
        nll -= float(log_p[np.arange(len(targets)), targets].sum())
        if reference is not None:
            log_ref = log_softmax(chunked_logits(reference, inputs, chunk))
            nll_ref -= float(log_ref[np.arange(len(targets)), targets].sum())
            kl += float((np.exp(log_ref) * (log_ref - log_p)).sum())
            agree += float((log_ref.argmax(axis=-1) == log_p.argmax(axis=-1)).sum())
        count += len(targets)
        if progress is not None:
            progress.update(1)
    result = EvalResult(float(np.exp(nll / count)), count, window, chunk=chunk)
    if reference is not None:
        result.kl_vs_float, result.top1_agreement = kl / count, agree / count
        result.float_perplexity = float(np.exp(nll_ref / count))
    return result


def chunked_logits(session, ids: list[int], chunk: int | None) -> np.ndarray:
    """``ids``' logits from an empty cache, fed all at once or ``chunk`` tokens per call."""
    if chunk is None or chunk >= len(ids):
        return session.prefill(ids)
    parts = [session.prefill(ids[:chunk])]
    parts += [session.extend(ids[start:start + chunk]) for start in range(chunk, len(ids), chunk)]
    return np.concatenate(parts)
