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

    def confusion(self, y_true: np.ndarray, logits: np.ndarray) -> np.ndarray:
        from sklearn import metrics as skm

        labels = list(range(max(self.n_outputs, 2)))
        return skm.confusion_matrix(y_true.astype(np.int64).reshape(-1), self.predictions(logits), labels=labels)
