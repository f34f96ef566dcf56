"""Calibration statistics of one linear layer's input: what GPTQ, AWQ, SmoothQuant and the
sensitivity ranking read.

Produced by the compiler's calibration (:mod:`lowbit.compiler.calibration`: the model's own
compiled graph run over real text); shared by the layers that read the same input (q/k/v).
"""

from __future__ import annotations

import dataclasses

import numpy as np

SAMPLE_ROWS = 512  # activation rows kept per layer input for error simulation


@dataclasses.dataclass
class LinearStatistics:
    """Running statistics of one linear layer's input.

    GPTQ and AWQ read :meth:`hessian` (GPTQ also :meth:`split_hessians` to validate on held-out
    samples); SmoothQuant the per-channel magnitudes; sensitivity analysis and activation-error
    estimates the ``sample``: up to :data:`SAMPLE_ROWS` token rows drawn evenly from all
    calibration samples (a fixed seed, so results repeat).
    """

    xtx: np.ndarray  # [K, K] float64
    absmax: np.ndarray  # [K]
    abssum: np.ndarray  # [K]
    sample: np.ndarray  # [rows, K] float32
    heldout_xtx: np.ndarray  # [K, K] float64: X^T X of every second calibration sample only
    rows_per_add: int = 1
    tokens: int = 0
    heldout_tokens: int = 0
    samples: int = 0

    @classmethod
    def empty(cls, width: int, samples: int = 1) -> "LinearStatistics":
        """Statistics to be fed ``samples`` calls of :meth:`add`."""
        return cls(np.zeros((width, width)), np.zeros(width, np.float32), np.zeros(width),
                   np.zeros((0, width), np.float32), np.zeros((width, width)), max(1, SAMPLE_ROWS // max(samples, 1)))

    def add(self, rows: np.ndarray) -> None:
        """Accumulate one calibration sample's ``[tokens, K]`` rows."""
        xtx = (rows.T @ rows).astype(np.float64)
        self.xtx += xtx
        if self.samples % 2:
            self.heldout_xtx += xtx
            self.heldout_tokens += rows.shape[0]
        self.samples += 1
        magnitude = np.abs(rows)
        self.absmax = np.maximum(self.absmax, magnitude.max(axis=0))
        self.abssum += magnitude.sum(axis=0, dtype=np.float64)
        picked = np.random.default_rng(self.tokens).choice(len(rows), min(self.rows_per_add, len(rows)), replace=False)
        self.sample = np.concatenate([self.sample, rows[np.sort(picked)].astype(np.float32)])
        self.tokens += rows.shape[0]

    def hessian(self) -> np.ndarray:
        return self.xtx / max(self.tokens, 1)

    def split_hessians(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(H_fit, H_heldout)`` from disjoint halves of the samples, or ``None`` below two samples."""
        if self.heldout_tokens == 0 or self.heldout_tokens == self.tokens:
            return None
        fit = (self.xtx - self.heldout_xtx) / (self.tokens - self.heldout_tokens)
        return fit, self.heldout_xtx / self.heldout_tokens

    def divided(self, s: np.ndarray) -> "LinearStatistics":
        """The statistics of ``X / s`` (per input channel): a new object, this one unchanged."""
        s64 = s.astype(np.float64)
        outer = np.outer(s64, s64)
        return dataclasses.replace(self, xtx=self.xtx / outer, heldout_xtx=self.heldout_xtx / outer,
                                   absmax=(self.absmax / s).astype(np.float32), abssum=self.abssum / s64,
                                   sample=(self.sample / s).astype(np.float32))
