"""One timer for every engine: synchronise before reading the clock, keep warm-up apart."""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

_work_s = 0.0  # this process's seconds inside work(): the rest of its wall time is the stage's fixed cost


@contextlib.contextmanager
def work() -> Iterator[None]:
    """Mark the stage's useful work (reading data, training, timing), so that what is left is overhead."""
    global _work_s
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _work_s += time.perf_counter() - t0


def work_seconds() -> float:
    return _work_s


def no_sync() -> None:
    """CPU work is finished when the Python call returns."""


@dataclass
class Stopwatch:
    """Accumulates named wall-clock intervals, each closed by a device synchronisation.

    Without the sync, a GPU timer would measure how fast kernels are *queued*, not run.
    """

    sync: Callable[[], None] = no_sync
    laps: dict[str, list[float]] = field(default_factory=dict)

    def start(self) -> float:
        self.sync()
        return time.perf_counter()

    def stop(self, name: str, t0: float) -> float:
        self.sync()
        dt = time.perf_counter() - t0
        self.laps.setdefault(name, []).append(dt)
        return dt

    def total(self, name: str) -> float:
        return sum(self.laps.get(name, []))


@dataclass
class IntervalPlan:
    """Timed repeats split into intervals, each re-warmed, with hooks at its edges: the host readings, and the
    hand-over to the other device's process so that the CPU and GPU intervals interleave."""

    counts: list[int]  # repeats in each interval
    begin: Callable[[], None] = no_sync
    end: Callable[[], None] = no_sync

    def interval_of(self) -> list[int]:
        """The interval index of each repeat, in timing order."""
        return [k for k, n in enumerate(self.counts) for _ in range(n)]


def calls_to_last(min_s: float, one_call_s: float) -> int:
    """How many calls of a timed region make one window of at least `min_s` (at least one). A repeat of a few
    small-model steps lasts milliseconds, and a window that short reads the host's jitter as much as the work."""
    return max(1, math.ceil(min_s / one_call_s))


def long_step_count(min_s: float, steps: int, step_s: float) -> int | None:
    """Where `steps` steps of `step_s` each would last over twice the window `min_s` (a large batch on a CPU): the
    single steps that fill it, since the window's length, not its step count, keeps the timer's jitter small.
    None for shorter steps, whose `steps` run again as often as the window takes (both engines time so)."""
    return calls_to_last(min_s, step_s) if step_s * steps >= 2 * min_s else None


def steady(values: list[float], warmup: int) -> list[float]:
    """Drop the first `warmup` values (compilation, autotuning, allocator growth) when more remain."""
    return values[warmup:] if len(values) > warmup else values


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> float:
    """Interquartile range: robust to the odd slow repeat that a mean would chase."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]
