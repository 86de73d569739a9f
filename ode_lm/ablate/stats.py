"""Statistics over seeds: mean, sample std, Student-t confidence interval, Welch's t-test.

For ``n`` runs of a cell with mean ``m`` and sample standard deviation ``s`` (ddof = 1), the
95% confidence interval of the mean is ``m +- t_{0.975, n-1} * s / sqrt(n)``. A cell is
compared with its baseline by Welch's unequal-variance t-test (two-sided), which does not
assume the two cells share a variance: ``t = (m1 - m2) / sqrt(s1^2/n1 + s2^2/n2)`` with the
Welch-Satterthwaite degrees of freedom.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ode_lm.errors import UserError


def _scipy_stats():
    try:
        import scipy.stats
    except ImportError:
        raise UserError("ode-lm ablate needs scipy for its statistics; install it with "
                        "pip install 'ode-lm[ablate]'") from None
    return scipy.stats


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof = 1); nan for n < 2
    ci_low: float  # 95% confidence interval of the mean (Student t); nan for n < 2
    ci_high: float
    minimum: float
    maximum: float


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Summary(0, *(math.nan,) * 6)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan, mean, mean)
    std = float(x.std(ddof=1))
    half = float(_scipy_stats().t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, float(x.min()), float(x.max()))


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test for equal means; nan when it is undefined
    (fewer than 2 runs on a side, or no variance on either side)."""
    x = [v for v in a if v is not None and math.isfinite(v)]
    y = [v for v in b if v is not None and math.isfinite(v)]
    if len(x) < 2 or len(y) < 2 or (np.std(x) == 0 and np.std(y) == 0):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(_scipy_stats().ttest_ind(x, y, equal_var=False).pvalue)
