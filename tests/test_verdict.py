"""The verdict's paired bootstrap on known inputs: a clear win, a tie, and a metric where lower is better."""
from __future__ import annotations

import numpy as np
import pytest

from accelbench.verdict import Side, generic_note, verdict

Y = np.arange(200) % 2


def accuracy(pred: np.ndarray):
    return lambda idx: float(np.mean(pred[idx] == Y[idx]))


def test_a_clear_win_has_an_interval_above_zero():
    right, coin = Y.copy(), np.random.default_rng(0).integers(0, 2, len(Y))
    v = verdict("test/accuracy", True, [Side("model", 0.9, accuracy(right))], [Side("base", 0.5, accuracy(coin))],
                len(Y), seed=0, note=generic_note)  # fmt: skip
    assert v["model_value"] == 1.0 and v["margin"] == pytest.approx(1.0 - v["baseline_value"])
    assert 0 < v["margin_ci95"][0] <= v["margin"] <= v["margin_ci95"][1] and v["beats_baseline"] is True


def test_a_tie_does_not_beat_and_the_best_side_is_picked_on_validation():
    same = accuracy(Y.copy())
    worse = accuracy(1 - Y)
    v = verdict("test/accuracy", True, [Side("a", 0.8, same), Side("b", 0.1, worse)], [Side("base", 0.7, same)],
                len(Y), seed=0, note=generic_note)  # fmt: skip
    assert v["model"] == "a" and v["margin"] == 0.0 and v["margin_ci95"] == [0.0, 0.0]
    assert v["beats_baseline"] is False and "as good or better" in v["note"]


def test_lower_is_better_flips_the_sign():
    truth = np.random.default_rng(1).normal(size=200)
    rmse = lambda pred: (lambda idx: float(np.sqrt(np.mean((pred[idx] - truth[idx]) ** 2))))  # noqa: E731
    v = verdict("test/price_rmse", False, [Side("model", 2.0, rmse(truth + 0.1))], [Side("persistence", 1.0, rmse(np.zeros(200)))],
                200, seed=0, note=generic_note)  # fmt: skip
    assert v["model_value"] < v["baseline_value"] and v["margin"] == pytest.approx(v["baseline_value"] - v["model_value"])
    assert v["beats_baseline"] is True


@pytest.mark.parametrize("kind, n_outputs, metric", [
    ("binary", 1, "test/roc_auc"), ("binary", 1, "test/f1"), ("binary", 1, "test/accuracy"), ("binary", 1, "test/loss"),
    ("multiclass", 4, "test/macro_f1"), ("multiclass", 4, "test/accuracy"), ("regression", 1, "test/rmse"),
])  # fmt: skip
def test_the_bootstraps_one_metric_scorer_gives_the_full_metrics_value(kind, n_outputs, metric):
    """Task.score (numpy, a thousand calls per verdict) against Task.metrics (sklearn) on resamples with repeats,
    ties in the scores and classes missing from a resample."""
    from accelbench.tasks import Task

    task = Task(kind, n_outputs)
    rng = np.random.default_rng(3)
    n = 120
    y = rng.integers(0, n_outputs if kind == "multiclass" else 2, n).astype(np.float64)
    logits = np.round(rng.normal(size=(n, n_outputs)), 1)  # rounded: tied scores
    if kind == "regression":
        y = rng.normal(size=n)
    for _ in range(20):
        idx = rng.integers(0, n, n // 3)
        want = task.metrics(y[idx], logits[idx], "test").get(metric)
        got = task.score(y[idx], logits[idx], metric)
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-9, abs=1e-12)
    diverged = np.full_like(logits, np.nan)  # a diverged model: loss nan, no other metric
    want = task.metrics(y, diverged, "test").get(metric)
    assert np.isnan(task.score(y, diverged, metric)) if metric.endswith("loss") else task.score(y, diverged, metric) is want is None
