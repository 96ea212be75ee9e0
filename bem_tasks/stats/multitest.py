"""Benjamini-Hochberg false discovery rate adjustment (through statsmodels)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def bh_adjust(pvalues: ArrayLike) -> NDArray[np.float64]:
    """Benjamini-Hochberg adjusted p-values, in the order given.

    Uses ``statsmodels.stats.multitest.multipletests(method="fdr_bh")``, which takes the running
    minimum from the largest p-value down, so the adjusted values are monotone in the raw ones
    (the naive ``p * m / rank`` is not) and capped at 1. Reject at FDR level ``q`` where the
    adjusted value is ``<= q``. An empty input gives an empty array.
    """
    try:
        p = np.asarray(pvalues, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"pvalues: expected an array of numbers ({exc})") from None
    if p.ndim != 1:
        raise ValueError(f"pvalues: expected a 1-D array, got shape {p.shape}")
    if p.size == 0:
        return p.copy()
    if not np.all(np.isfinite(p)):
        raise ValueError(f"pvalues: {int(np.sum(~np.isfinite(p)))} value(s) are NaN or infinite")
    if np.any((p < 0) | (p > 1)):
        raise ValueError(
            f"pvalues: every p-value must be in [0, 1], got min {p.min()} max {p.max()}"
        )
    from statsmodels.stats.multitest import multipletests

    return np.asarray(multipletests(p, method="fdr_bh")[1], dtype=np.float64)
