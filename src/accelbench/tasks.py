"""What a model predicts and how it is scored: shared by both engines and every workload."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Task:
    """`kind` picks the loss in each engine; `objective` is the val metric tuning optimises."""

    kind: Literal["binary", "multiclass", "regression"]
    n_outputs: int = 1
    objective: str = "val/loss"
    direction: Literal["minimize", "maximize"] = "minimize"
    class_names: tuple[str, ...] = ()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        if self.kind == "binary":
            return 1.0 / (1.0 + np.exp(-logits.reshape(-1)))
        if self.kind == "multiclass":
            z = logits - logits.max(axis=1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(axis=1, keepdims=True)
        return logits

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        if self.kind == "binary":
            return (logits.reshape(-1) > 0).astype(np.int64)
        if self.kind == "multiclass":
            return logits.argmax(axis=1)
        return logits

    def metrics(self, y_true: np.ndarray, logits: np.ndarray, prefix: str) -> dict[str, float]:
        """Scores under names like `val/accuracy`; identical on every device and framework."""
        logits = np.asarray(logits, dtype=np.float64)
        if not np.all(np.isfinite(logits)):
            return {f"{prefix}/loss": float("nan")}
        if self.kind == "regression":
            y = y_true.reshape(logits.shape)
            err = logits - y
            return {
                f"{prefix}/loss": float(np.mean(err**2)),
                f"{prefix}/rmse": float(np.sqrt(np.mean(err**2))),
                f"{prefix}/mae": float(np.mean(np.abs(err))),
            }
        from sklearn import metrics as skm  # 0.7 s to import: the data stages, which score nothing, skip it

        y = y_true.astype(np.int64).reshape(-1)
        proba = self.probabilities(logits)
        pred = self.predictions(logits)
        labels = list(range(max(self.n_outputs, 2)))
        out = {
            f"{prefix}/loss": float(skm.log_loss(y, proba, labels=labels)),
            f"{prefix}/accuracy": float(skm.accuracy_score(y, pred)),
        }
        if self.kind == "binary":
            out[f"{prefix}/f1"] = float(skm.f1_score(y, pred, zero_division=0))
            if len(np.unique(y)) == 2:
                out[f"{prefix}/roc_auc"] = float(skm.roc_auc_score(y, proba))
        else:
            out[f"{prefix}/macro_f1"] = float(skm.f1_score(y, pred, average="macro", zero_division=0))
        return out

    def score(self, y_true: np.ndarray, logits: np.ndarray, metric: str) -> float | None:
        """One of `metrics`' values (e.g. `test/macro_f1`), None where it has none. The verdict's bootstrap asks
        a thousand resamples for one metric: sklearn's checks around each call took seconds, numpy's counts
        take milliseconds (tests/test_verdict.py pins each to sklearn)."""
        prefix, name = metric.split("/", 1)
        logits = np.asarray(logits, dtype=np.float64)
        if self.kind == "regression" or name == "loss" or not np.all(np.isfinite(logits)):
            return self.metrics(y_true, logits, prefix).get(metric)
        y = y_true.astype(np.int64).reshape(-1)
        pred = self.predictions(logits)
        if name == "accuracy":
            return float(np.mean(pred == y))
        if name == "roc_auc":
            return _roc_auc(y, logits.reshape(-1)) if len(np.unique(y)) == 2 else None
        if name == "f1":
            return _f1s(y, pred, [1])[0]
        if name == "macro_f1":  # as sklearn: over the labels in either y or the predictions
            return float(np.mean(_f1s(y, pred, np.union1d(y, pred))))
        return None

    def confusion(self, y_true: np.ndarray, logits: np.ndarray) -> np.ndarray:
        from sklearn import metrics as skm

        labels = list(range(max(self.n_outputs, 2)))
        return skm.confusion_matrix(y_true.astype(np.int64).reshape(-1), self.predictions(logits), labels=labels)


def _f1s(y: np.ndarray, pred: np.ndarray, labels) -> list[float]:
    """Each label's F1 (0 where it has no true or predicted item, as sklearn's zero_division=0)."""
    out = []
    for label in labels:
        tp = np.sum((pred == label) & (y == label))
        wrong = np.sum(pred == label) + np.sum(y == label) - 2 * tp
        out.append(float(2 * tp / (2 * tp + wrong)) if tp else 0.0)
    return out


def _roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """The Mann-Whitney U of the positives' scores over the negatives', ties counted half: sklearn's value."""
    from scipy.stats import rankdata

    ranks = rankdata(score)
    n_pos = int(np.sum(y == 1))
    n_neg = len(y) - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
