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


# ---- between-interval statistics: each paired figure is timed in several interleaved intervals ----

UNSTABLE_SPREAD = 0.10  # between-interval spread above which a figure is flagged as unstable
AGREEMENT = 0.15  # two runs of the study agree on a figure when they differ by at most this share


def split_repeats(repeats: int, intervals: int) -> list[int]:
    """The timed repeats spread over the intervals as evenly as they go: 5 over 2 -> [3, 2]."""
    if intervals < 1 or repeats < intervals:
        raise ValueError(f"{repeats} repeats cannot fill {intervals} intervals (each needs at least one)")
    base, extra = divmod(repeats, intervals)
    return [base + (i < extra) for i in range(intervals)]


def interval_medians(values: Sequence[float], interval_of: Sequence[int]) -> list[float]:
    """Median of the repeats of each interval, in interval order."""
    groups: dict[int, list[float]] = {}
    for v, k in zip(values, interval_of):
        groups.setdefault(k, []).append(v)
    return [float(np.median(groups[k])) for k in sorted(groups)]


def relative_spread(values: Sequence[float]) -> float:
    """(max - min) / median: one slow interval in five shows in full, where an IQR would hide it."""
    a = np.asarray(values, float)
    if len(a) < 2:
        return 0.0
    return float((a.max() - a.min()) / np.median(a))


def interval_ratio_ci(num: Sequence[float], den: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Speedup from per-interval throughputs. Paired intervals (interleaved, same count) give a t-interval on the
    mean log ratio, so a slow spell that hit both sides cancels; unpaired ones fall back to the bootstrap ratio of
    medians over the intervals. A single interval has no between-interval spread: its CI is the point."""
    from scipy import stats as st

    a, b = np.asarray(num, float), np.asarray(den, float)
    if len(a) != len(b) or len(a) < 2:
        if min(len(a), len(b)) < 2:
            point = float(np.median(a) / np.median(b))
            return point, point, point
        return ratio_ci(a, b, level)
    logs = np.log(a / b)
    mean, sem = float(logs.mean()), float(logs.std(ddof=1) / math.sqrt(len(logs)))
    half = float(st.t.ppf((1 + level) / 2, len(logs) - 1)) * sem
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def agreement(first: float, second: float) -> float:
    """How far apart two runs' figures are, as a share of the smaller: 0.2 = the larger is 20% above it."""
    return abs(first - second) / min(first, second)


STEAL_PCT = 5.0  # hypervisor steal above this share of the interval's CPU time counts as a cause
FREQ_SWING = 0.05  # clock readings that differ by more than this share between intervals count as a cause


def contended_cores(logical_cores: int) -> float:
    """Other processes' load (in cores) from which a CPU figure no longer reads as the CPU's own speed: half a
    core, or a tenth of a large host (whose daemons alone use some)."""
    return max(0.5, 0.1 * logical_cores)


def likely_causes(readings: Sequence[dict[str, float | None]], logical_cores: int) -> list[str]:
    """What the host readings of a figure's intervals show that can move a timing: steal, other load, frequency."""
    causes = []
    steal = [r["steal_pct"] for r in readings if r.get("steal_pct") is not None]
    if steal and max(steal) > STEAL_PCT:
        causes.append(f"steal time up to {max(steal):.0f}%")
    others = [r["others_cores"] for r in readings if r.get("others_cores") is not None]
    if others and max(others) >= contended_cores(logical_cores):
        causes.append(f"other processes used up to {max(others):.1f} of {logical_cores} cores")
    mhz = [r["mhz"] for r in readings if r.get("mhz")]
    if mhz and (max(mhz) - min(mhz)) / max(mhz) > FREQ_SWING:
        causes.append(f"CPU clock {min(mhz):,.0f}-{max(mhz):,.0f} MHz")
    return causes


def stability_flag(intervals: Sequence[float], readings: Sequence[dict[str, float | None]], logical_cores: int,
                   cpu_side: bool) -> str:  # fmt: skip
    """'' for a figure that holds; else why a reader should not take it as the device's speed. A CPU figure timed
    while other processes competed for the cores is flagged whatever its spread; an unstable figure (intervals
    more than 10% apart) carries the causes the readings show, or says none was measured."""
    parts = []
    causes = likely_causes(readings, logical_cores)
    contention = [c for c in causes if c.startswith("other processes")]
    if cpu_side and contention:
        parts.append(f"contended: {contention[0]}")
    spread = relative_spread(intervals)
    if spread > UNSTABLE_SPREAD:
        why = "; ".join(causes) if causes else "no steal, other load or clock change measured"
        parts.append(f"unstable: intervals {100 * spread:.0f}% apart (likely cause: {why})")
    return "; ".join(parts)
