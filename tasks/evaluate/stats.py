"""The bootstrap over samples that puts a 95 % interval on every reported estimate."""
from __future__ import annotations

from typing import Callable

import numpy as np

N_BOOT = 1000
SEED = 0


def bootstrap_ci(statistic: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int = N_BOOT,
                 seed: int = SEED) -> list[float] | None:
    """Percentile 95 % interval [low, high] of ``statistic`` over ``n_boot`` resamples of the ``n``
    samples (with replacement, numpy's default_rng(seed): the same interval every run).

    ``statistic(idx)`` takes an index matrix [n_boot, n] and returns one value per row; resampling
    whole samples (never tokens or pixels) keeps the samples' internal correlation in the interval.
    None for fewer than two samples.
    """
    if n < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    vals = np.asarray(statistic(idx), np.float64)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return None
    low, high = np.percentile(vals, [2.5, 97.5])
    return [round(float(low), 6), round(float(high), 6)]
