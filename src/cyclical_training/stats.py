"""Summary statistics and the paired comparison behind ``gct reproduce`` reports.

Two arms trained with the same seeds form pairs: seed k of both arms shares the training subset,
the initial weights and the data order, so the per-seed difference removes that shared noise.
The comparison is a paired t-test (``scipy.stats.ttest_rel``) with a t-distribution confidence
interval for the mean difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

from .errors import ConfigError

BETTER = "better"
WORSE = "worse"
NO_DETECTABLE_DIFFERENCE = "no difference we can detect at this seed count"
NO_TEST_ONE_SEED = "no test possible with 1 seed"
NO_PAIRS = "no paired seeds finished"

# Differences are rounded to this many decimals before testing. Accuracies are ratios of image
# counts, so two seeds that differ by the same number of images give differences that agree far
# above 1e-12, but floating-point subtraction can leave them unequal in the last bits. Unrounded,
# such pairs make the t statistic depend on rounding noise instead of being exactly infinite.
DIFFERENCE_DECIMALS = 12


@dataclass(frozen=True)
class Summary:
    """Count, mean and sample standard deviation (ddof = 1) of a list of values."""

    n: int
    mean: float
    std: float  # NaN for fewer than two values


def summarize(values: Sequence[float]) -> Summary:
    """Compute the mean and the sample standard deviation (ddof = 1) of ``values``."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ConfigError(f"values must be a flat sequence of numbers, got an array of shape {array.shape}")
    if len(array) == 0:
        return Summary(0, math.nan, math.nan)
    std = float(np.std(array, ddof=1)) if len(array) > 1 else math.nan
    return Summary(len(array), float(np.mean(array)), std)


@dataclass(frozen=True)
class PairedComparison:
    """The per-pair differences (treatment minus control) and what a paired t-test makes of them.

    ``ci_low``, ``ci_high`` and ``p_value`` are ``None`` for fewer than two pairs. ``p_value`` is
    NaN when every difference is 0, where the t statistic is 0 / 0.
    """

    differences: tuple[float, ...]
    mean: float
    std: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    confidence: float

    @property
    def n(self) -> int:
        return len(self.differences)


def compare_paired(treatment: Sequence[float], control: Sequence[float], confidence: float = 0.95) -> PairedComparison:
    """Compare paired samples: the mean difference, its t-distribution interval and the p-value.

    ``treatment[i]`` and ``control[i]`` must come from the same pair (the same seed). The
    interval is ``mean +- t_{(1 + confidence) / 2, n - 1} * std / sqrt(n)`` and the p-value is the
    two-sided one of ``scipy.stats.ttest_rel``.
    """
    if len(treatment) != len(control):
        raise ConfigError(
            f"treatment and control must have the same length (one value per seed), got {len(treatment)} and {len(control)}"
        )
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    treatment_array = np.asarray(treatment, dtype=np.float64)
    control_array = np.asarray(control, dtype=np.float64)
    differences = np.round(treatment_array - control_array, DIFFERENCE_DECIMALS)
    summary = summarize(differences)
    n = summary.n
    if n < 2:
        return PairedComparison(tuple(differences.tolist()), summary.mean, summary.std, None, None, None, confidence)

    half_width = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * summary.std / math.sqrt(n)
    if np.ptp(differences) == 0.0:
        # Equal differences: t is +-inf (p = 0), or 0 / 0 when all are 0 (p undefined).
        p_value = math.nan if summary.mean == 0.0 else 0.0
    else:
        # ttest_rel against zeros tests the rounded differences themselves.
        p_value = float(scipy_stats.ttest_rel(differences, np.zeros(n)).pvalue)
    return PairedComparison(
        differences=tuple(differences.tolist()),
        mean=summary.mean,
        std=summary.std,
        ci_low=summary.mean - half_width,
        ci_high=summary.mean + half_width,
        p_value=p_value,
        confidence=confidence,
    )


def verdict(comparison: PairedComparison, alpha: float = 0.05) -> str:
    """Return ``better``, ``worse`` or that no difference can be detected, for treatment vs control.

    The treatment is better or worse only when the two-sided p-value is below ``alpha``, which for
    ``alpha = 1 - confidence`` is the same as the confidence interval excluding 0.
    """
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    if comparison.n == 0:
        return NO_PAIRS
    if comparison.n == 1:
        return NO_TEST_ONE_SEED
    p_value = comparison.p_value
    if p_value is None or math.isnan(p_value) or p_value >= alpha:
        return NO_DETECTABLE_DIFFERENCE
    return BETTER if comparison.mean > 0 else WORSE
