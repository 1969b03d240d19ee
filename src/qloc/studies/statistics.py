"""Summary statistics shared by the experiments' tables."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 2000


def bootstrap_mean_ci(
    values: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded, so tables do not change between runs);
    NaN values are left out, and (NaN, NaN) where none is left."""
    data = np.asarray(values, dtype=float)
    data = data[np.isfinite(data)]
    if len(data) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def otsu_threshold(values: Sequence[float], bins: int = 256) -> float:
    """Otsu's threshold on [0, 1]: the histogram cut maximising the between-class variance
    (``bins`` bins; values >= the threshold are the upper class)."""
    data = np.asarray(values, dtype=float)
    if len(data) == 0:
        return float("nan")
    hist, edges = np.histogram(data, bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centers)
    mean_low = np.divide(sum_low, weight_low, out=np.zeros(bins), where=weight_low > 0)
    mean_high = np.divide(sum_low[-1] - sum_low, weight_high, out=np.zeros(bins), where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    # Every cut inside an empty gap between the classes scores the same: take the middle one.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-12))
    return float(edges[best[len(best) // 2] + 1])


def welch(kc: Sequence[float], ki: Sequence[float]) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value of KC against KI (NaN with fewer than 2 of either)."""
    if len(kc) < 2 or len(ki) < 2:
        return float("nan"), float("nan")
    result = stats.ttest_ind(kc, ki, equal_var=False)
    return float(result.statistic), float(result.pvalue)
