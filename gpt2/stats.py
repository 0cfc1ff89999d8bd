"""Paired statistics for comparing methods on the same evaluation batches or seeds.

Two methods evaluated on the same batches differ batch by batch far less
than either varies across batches, so the standard error of the mean
paired difference is what says whether a difference is real.
"""

import math
import statistics

NOISE_SE = 2.0  # a difference within this many standard errors is "within noise"
NOISE_FLOOR = 1e-6  # and so is one below float32 rounding of a mean loss, whatever its SE


def mean_sd(values):
    """(mean, sample standard deviation); sd is 0.0 for a single value."""
    values = list(values)
    if not values:
        raise ValueError("mean_sd of no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_difference(a, b):
    """(mean of a_i - b_i, its standard error) over pairs; SE is None for fewer than 2 pairs."""
    a, b = list(a), list(b)
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equally long, non-empty series, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return mean, se


def verdict(diff, se, higher="higher", lower="lower"):
    """'within noise' unless |diff| exceeds NOISE_SE standard errors (and NOISE_FLOOR);
    then `higher` or `lower`."""
    if se is None or abs(diff) <= max(NOISE_SE * se, NOISE_FLOOR):
        return "within noise"
    return higher if diff > 0 else lower
