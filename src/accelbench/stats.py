"""The few statistics the study rests on, kept small so that tests can check them on known inputs."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def median_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of a few repeats: it stays within the values observed
    (a t-interval on five noisy throughputs can go below zero)."""
    a = np.asarray(values, float)
    if len(a) == 0:
        return math.nan, math.nan
    boot = np.median(np.random.default_rng(seed).choice(a, (n_boot, len(a))), axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def ratio_ci(num: Sequence[float], den: Sequence[float], level: float = 0.95, n_boot: int = 4000, seed: int = 0):
    """Ratio of medians (e.g. GPU/CPU samples/s) with a percentile-bootstrap interval over the repeats."""
    a, b = np.asarray(num, float), np.asarray(den, float)
    point = float(np.median(a) / np.median(b))
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(a, (n_boot, len(a))), axis=1) / np.median(rng.choice(b, (n_boot, len(b))), axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)


def crossover(batch_sizes: Sequence[int], cpu: Sequence[float], gpu: Sequence[float]) -> int | None:
    """Smallest batch size from which the GPU's throughput stays at or above the CPU's; None if it never does."""
    pairs = sorted(zip(batch_sizes, cpu, gpu))
    for i, (b, _, _) in enumerate(pairs):
        if all(g >= c for _, c, g in pairs[i:]):
            return b
    return None


def scaling_stops(batch_sizes: Sequence[int], throughput: Sequence[float], min_gain: float = 1.1) -> int | None:
    """First batch size after which a larger batch gains less than `min_gain` x: where scaling stops."""
    pairs = sorted(zip(batch_sizes, throughput))
    for (b, t), (_, t_next) in zip(pairs, pairs[1:]):
        if t_next < min_gain * t:
            return b
    return None


def verdict(speedup: float, lo: float, hi: float, batch: int, cross: int | None, largest: int) -> str:
    """One sentence drawn from the numbers: how the GPU compares at the reference batch and where it pays off."""
    if lo <= 1.0 <= hi:
        head = f"the GPU and the CPU are level at batch {batch} ({speedup:.2f}x, 95% CI {lo:.2f}-{hi:.2f})"
    elif speedup >= 1:
        head = f"the GPU is {speedup:.1f}x faster at batch {batch}"
    else:
        head = f"the GPU is {1 / speedup:.1f}x slower at batch {batch}"
    if cross is None:
        return f"{head} and does not pay off at any batch size measured (up to {largest})"
    if cross > batch:
        return f"{head} and pays off from batch {cross}"
    return head
