"""Does the best model beat its best baseline on the test split, by how much, and how sure is that?

The margin's uncertainty is a seeded percentile bootstrap over test items: the same resampled items
score both sides, so the interval is of the paired difference.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

N_BOOT = 1000
LEVEL = 0.95

# score(indices of test items) -> the metric on those items
Score = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class Side:
    """One model or baseline: its name, its validation score (which picks the best) and its test scorer."""

    name: str
    val_value: float
    score: Score


def paired_margin(model: Score, baseline: Score, n_items: int, higher_is_better: bool, seed: int) -> tuple[float, float, float]:
    """(margin on all items, CI low, CI high); margin > 0 means the model is better."""
    sign = 1.0 if higher_is_better else -1.0
    every = np.arange(n_items)
    point = sign * (model(every) - baseline(every))
    rng = np.random.default_rng(seed)
    boot = np.empty(N_BOOT)
    for i in range(N_BOOT):
        idx = rng.integers(0, n_items, n_items)
        boot[i] = sign * (model(idx) - baseline(idx))
    boot = boot[np.isfinite(boot)]  # a resample holding one class has no AUC
    lo, hi = np.quantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]) if len(boot) else (np.nan, np.nan)
    return float(point), float(lo), float(hi)


def best(sides: list[Side], higher_is_better: bool) -> Side:
    """The side with the best validation score: chosen without looking at the test split."""
    key = (lambda s: s.val_value) if higher_is_better else (lambda s: -s.val_value)
    return max(sides, key=lambda s: key(s) if np.isfinite(s.val_value) else -np.inf)


def verdict(metric: str, higher_is_better: bool, models: list[Side], baselines: list[Side], n_items: int, seed: int,
            note: Callable[[bool, float, int], str]) -> dict[str, Any]:  # fmt: skip
    """The evaluate.json `verdict`; `note(beats, margin, n_items)` explains the outcome in words."""
    model, baseline = best(models, higher_is_better), best(baselines, higher_is_better)
    every = np.arange(n_items)
    margin, lo, hi = paired_margin(model.score, baseline.score, n_items, higher_is_better, seed)
    beats = bool(lo > 0)
    return {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "model": model.name,
        "model_value": float(model.score(every)),
        "baseline": baseline.name,
        "baseline_value": float(baseline.score(every)),
        "margin": margin,
        "margin_ci95": [lo, hi],
        "beats_baseline": beats,
        "note": note(beats, margin, n_items),
    }


def generic_note(beats: bool, margin: float, n_items: int, full_size: str = "") -> str:
    if beats:
        return f"the model beats the baseline on {n_items} test items: the 95% interval of the margin excludes 0"
    how = f"; {full_size}" if full_size else ""
    if margin > 0:
        return (f"ahead by {margin:.4g} on {n_items} test items, but the 95% interval includes 0: too few items "
                f"to tell them apart{how}")  # fmt: skip
    return f"the baseline is as good or better on {n_items} test items{how}"
