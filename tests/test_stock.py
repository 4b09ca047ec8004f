"""`stock`: the real stages on Kaggle-format Google price files, both frameworks, the leakage proof,
and every bad price file ending in one clear line."""
from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import assert_failure_recorded
from accelbench.io import write_json
from accelbench.workloads import get_workload

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "stock"
TRAIN = FIXTURES / "Google_Stock_Price_Train.csv"
TEST = FIXTURES / "Google_Stock_Price_Test.csv"
WINDOW = 10


def use_google_files(project, path: Path = TRAIN, **extra) -> None:
    params = project.params()
    params["cpu_threads"] = 1  # on a shared 2-core box, two OpenMP threads per process spin and crawl
    params["stock"]["data"].update(source="path", path=str(path))
    params["stock"]["prepare"]["window"] = WINDOW
    for dotted, value in extra.items():
        *parents, leaf = dotted.split(".")
        node = params["stock"]
        for key in parents:
            node = node[key]
        node[leaf] = value
    project.set_params(params)
    project.run("git", "commit", "-qam", "stock on the Google fixture")


def kaggle_opens() -> pd.Series:
    """The fixture read independently of accelbench: Train then Test, missing opens carried forward."""
    frames = [pd.read_csv(f, thousands=",") for f in (TRAIN, TEST)]
    return pd.concat(frames, ignore_index=True)["Open"].ffill()


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    from conftest import make_project

    project = make_project(tmp_path_factory.mktemp("stock") / "project")
    use_google_files(project)
    project.run(sys.executable, "-m", "dvc", "repro", "train@stock", "eda@stock")
    return project


def test_reads_the_kaggle_google_files(stock):
    source = json.loads((stock.root / "data/raw/stock/source.json").read_text())
    assert source["files"] == [TRAIN.name, TEST.name]  # the _Test file beside _Train is appended
    assert source["target"] == "Open"  # the notebook's column; this file's Close is pre-split
    assert source["rows"] == 170 and source["filled_missing"] == 2
    assert (source["first_date"], source["last_date"]) == ("2016-01-04", "2016-08-26")
    raw = stock.root / "data/raw/stock"
    assert (raw / TRAIN.name).read_bytes() == TRAIN.read_bytes()  # raw = the original, CRLF and all
    meta = json.loads((stock.root / "data/prepared/stock/meta.json").read_text())
    assert meta["target_rows"] == {"train": [WINDOW + 1, 118], "val": [118, 144], "test": [144, 170]}  # a window of moves needs its day before
    assert meta["target_dates"]["test"][1] == "2016-08-26"
    eda = json.loads((stock.root / "results/stock/eda/eda.json").read_text())
    assert eda["price"]["max"] == pytest.approx(kaggle_opens().max())  # "1,0xx.xx" read as numbers


def test_model_and_persistence_side_by_side_in_price_units(stock):
    metrics = json.loads((stock.root / "results/stock/evaluate.json").read_text())
    assert set(metrics) == {"lstm", "persistence", "verdict"}
    assert set(metrics["lstm"]) == set(metrics["persistence"])
    # tomorrow = today never moves: it has no direction to be right about, so n/a (null), not 0
    assert metrics["persistence"]["test/direction_acc"] is None and metrics["persistence"]["val/direction_acc"] is None
    for key in ["test/price_rmse", "test/price_mae", "test/mape_pct", "test/direction_acc", "test/rmse"]:
        assert np.isfinite(metrics["lstm"][key]), key
    opens = kaggle_opens().to_numpy()
    actual, yesterday = opens[144:], opens[143:-1]
    persistence = metrics["persistence"]
    assert persistence["test/price_mae"] == pytest.approx(np.mean(np.abs(actual - yesterday)), rel=1e-4)
    assert persistence["test/price_rmse"] == pytest.approx(np.sqrt(np.mean((actual - yesterday) ** 2)), rel=1e-4)
    assert persistence["test/mape_pct"] == pytest.approx(100 * np.mean(np.abs(actual - yesterday) / actual), rel=1e-4)
    runs = stock.runs("stock", "tags.stage = 'evaluate'")
    baseline = [r for r in runs if r.data.tags.get("baseline") == "true"]
    assert len(baseline) == 1 and baseline[0].info.run_name == "baseline-persistence"
    assert baseline[0].data.metrics["test/price_mae"] == pytest.approx(persistence["test/price_mae"])
    assert "test/direction_acc" not in baseline[0].data.metrics  # n/a is not logged as a number


def test_verdict_compares_the_model_with_persistence_in_prices(stock):
    metrics = json.loads((stock.root / "results/stock/evaluate.json").read_text())
    verdict = metrics["verdict"]
    assert set(verdict) == {"metric", "higher_is_better", "model", "model_value", "baseline", "baseline_value",
                            "margin", "margin_ci95", "beats_baseline", "note"}  # fmt: skip
    assert (verdict["metric"], verdict["higher_is_better"], verdict["model"], verdict["baseline"]) == (
        "test/price_rmse", False, "lstm", "persistence")
    assert verdict["model_value"] == pytest.approx(metrics["lstm"]["test/price_rmse"])
    assert verdict["baseline_value"] == pytest.approx(metrics["persistence"]["test/price_rmse"])
    assert verdict["margin"] == pytest.approx(verdict["baseline_value"] - verdict["model_value"])  # > 0: model better
    lo, hi = verdict["margin_ci95"]
    assert lo <= verdict["margin"] <= hi and verdict["beats_baseline"] == (lo > 0)
    if not verdict["beats_baseline"]:
        assert "random walk" in verdict["note"]


def test_predicted_vs_actual_png_is_written_and_logged(stock):
    png = stock.root / "results/stock/plots/lstm_test_predicted_vs_actual.png"
    assert Image.open(png).size[0] > 500
    run = [r for r in stock.runs("stock", "tags.stage = 'evaluate'") if r.data.tags.get("variant") == "lstm"][0]
    logged = stock.artifacts(run.info.run_id, "plots")
    assert "plots/lstm_test_predicted_vs_actual.png" in logged


def test_train_run_says_whether_cudnn_ran_and_counts_params(stock):
    train = stock.runs("stock", "tags.stage = 'train'")[0]
    tags = train.data.tags
    assert tags["cell"] == "lstm" and tags["variant"] == "lstm"
    assert tags["cudnn_rnn"] == "not used" and "no cuDNN on CPU" in tags["cudnn_rnn_detail"]
    units = int(train.data.params["model.units"])
    layers = int(train.data.params["model.layers"])
    lstm = sum(4 * units * ((1 if i == 0 else units) + units) + 8 * units for i in range(layers))
    assert train.data.metrics["model/params"] == lstm + units + 1  # torch: two bias vectors per layer


def test_exp_run_tensorflow(stock):
    stock.run(sys.executable, "-m", "dvc", "exp", "run", "train@stock", "-S", "framework=tensorflow")
    train = stock.runs("stock", "tags.stage = 'train' and tags.framework = 'tensorflow'")
    assert len(train) == 1 and train[0].info.status == "FINISHED"
    assert train[0].data.tags["cudnn_rnn"] == "not used" and train[0].data.tags["cell"] == "lstm"
    metrics = json.loads((stock.root / "results/stock/evaluate.json").read_text())
    assert np.isfinite(metrics["lstm"]["test/price_mae"])
    units, layers = int(train[0].data.params["model.units"]), int(train[0].data.params["model.layers"])
    lstm = sum(4 * units * ((1 if i == 0 else units) + units + 1) for i in range(layers))
    assert train[0].data.metrics["model/params"] == lstm + units + 1  # Keras: one bias vector per layer
    assert (stock.root / "models/stock/lstm/model.keras").is_file()


def prepared(wl, params, raw: Path):
    raw.mkdir(parents=True)
    write_json(raw / "source.json", wl.ingest(params, raw))
    return wl.prepare(params, raw, seed=0)


def check_level_scaler(base, opens: np.ndarray) -> None:
    """Min-max fitted on the training rows; each test window is the scaled prices right before its target."""
    from sklearn.preprocessing import MinMaxScaler

    ref = MinMaxScaler().fit(opens[0:118].reshape(-1, 1))
    assert base.meta["scaler"]["low"] == pytest.approx(ref.data_min_[0])
    assert base.meta["scaler"]["span"] == pytest.approx(ref.data_range_[0])
    test_x, start = base.splits["test"]["x"][:, :, 0], base.meta["target_rows"]["test"][0]
    for i in (0, len(test_x) - 1):
        t = start + i
        assert test_x[i] == pytest.approx(ref.transform(opens[t - WINDOW : t].reshape(-1, 1)).ravel(), abs=1e-6)


def check_difference_scaler(base, opens: np.ndarray) -> None:
    """Daily differences divided by their std over the training rows; y = the next difference, same scale;
    persistence (no move) reproduces yesterday's price."""
    from accelbench.workloads._timeseries import forecast_prices, persistence

    std = np.std(np.diff(opens[0:118]))
    assert base.meta["scaler"] == {"predict": "difference", "x_std": pytest.approx(std), "y_std": pytest.approx(std)}
    test, start = base.splits["test"], base.meta["target_rows"]["test"][0]
    for i in (0, len(test["y"]) - 1):
        t = start + i
        assert test["x"][i, :, 0] == pytest.approx(np.diff(opens[t - WINDOW - 1 : t]) / std, abs=1e-5)
        assert test["y"][i] == pytest.approx((opens[t] - opens[t - 1]) / std, abs=1e-5)
    last, actual, forecast = forecast_prices(base.meta, test, persistence(base.meta, test))
    np.testing.assert_allclose(forecast, opens[start - 1 : -1])
    np.testing.assert_allclose(actual, opens[start:], rtol=1e-5)


@pytest.mark.parametrize("predict", ["level", "difference"])
def test_no_future_price_reaches_training_inputs_or_the_scaler(tmp_path, predict):
    """The scaler is the one fitted on the training rows alone; rewriting later prices (val, test)
    changes nothing that training sees, and rewriting test prices changes nothing validation sees."""
    from accelbench.config import with_overrides

    wl = get_workload("stock")
    params = with_overrides(wl.Params(), {"data.path": str(TRAIN), "data.source": "path", "prepare.window": WINDOW,
                                          "prepare.predict": predict})  # fmt: skip
    base = prepared(wl, params, tmp_path / "base")
    opens = kaggle_opens().to_numpy()
    assert base.meta["scaler_fitted_on_rows"] == [0, 118]
    (check_level_scaler if predict == "level" else check_difference_scaler)(base, opens)

    def shocked(first_row: int, name: str):
        """The fixture with every price from `first_row` on multiplied by 3 (new highs the scaler must not see)."""
        folder = tmp_path / name
        folder.mkdir()
        frames = [pd.read_csv(f, dtype=str, keep_default_na=False) for f in (TRAIN, TEST)]
        offset = 0
        for frame, path in zip(frames, (TRAIN, TEST)):
            for col in ("Open", "High", "Low"):
                values = pd.to_numeric(frame[col].str.replace(",", ""), errors="coerce")
                rows = np.arange(len(frame)) + offset >= first_row
                frame[col] = frame[col].where(~rows, (values * 3).map("{:.2f}".format))
            offset += len(frame)
            frame.to_csv(folder / path.name, index=False)
        return prepared(wl, with_overrides(params, {"data.path": str(folder / TRAIN.name)}), tmp_path / f"{name}-raw")

    future_val = shocked(118, "val-and-test")
    future_test = shocked(144, "test-only")
    for changed in (future_val, future_test):
        assert changed.meta["scaler"] == base.meta["scaler"]
        np.testing.assert_array_equal(changed.splits["train"]["x"], base.splits["train"]["x"])
        np.testing.assert_array_equal(changed.splits["train"]["y"], base.splits["train"]["y"])
        assert not np.array_equal(changed.splits["test"]["y"], base.splits["test"]["y"])  # the shock is real
    np.testing.assert_array_equal(future_test.splits["val"]["x"], base.splits["val"]["x"])
    np.testing.assert_array_equal(future_test.splits["val"]["y"], base.splits["val"]["y"])


# ---------------------------------------------------------------------------------------------------
# Bad input: one line naming file and field, non-zero exit, no output, a FAILED run with the reason


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    from conftest import make_project

    return make_project(tmp_path_factory.mktemp("stock-bad") / "project")


def edited(tmp_path: Path, column: str, row: int, value: str | None) -> Path:
    """A copy of the Train fixture (CRLF, quotes kept) with the cell at `row` (1-based, header = 1)
    replaced, or with the whole column emptied when `value` is None."""
    rows = list(csv.reader(io.StringIO(TRAIN.read_text())))
    col = rows[0].index(column)
    for i, cells in enumerate(rows[1:], start=2):
        if value is None or i == row:
            cells[col] = "" if value is None else value
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    path = tmp_path / TRAIN.name
    path.write_text(out.getvalue().rstrip("\r\n"), newline="")
    return path


def assert_fails_cleanly(project, stage: str, workload: str, output: str, *expected: str) -> str:
    proc = project.stage(stage, workload)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"accelbench {stage}: error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-2000:]
    for text in expected:
        assert text in errors[0], errors[0]
    assert not (project.root / output).exists()
    assert_failure_recorded(project, workload, stage, errors[0].split(": error: ", 1)[1])
    return errors[0]


@pytest.mark.parametrize(
    "column, row, value, expected",
    [
        ("Open", 9, "12.3.4", ["column 'Open', row 9: '12.3.4' is not a number"]),
        ("Open", 0, None, ["column 'Open' is empty (all 150 rows missing)"]),
        ("Date", 30, "2/30/2016", ["column 'Date', row 30: '2/30/2016' is not a date", "m/d/Y or ISO"]),
    ],
    ids=["non-numeric-target", "empty-target", "unparseable-date"],
)
def test_bad_price_file(bad, tmp_path, column, row, value, expected):
    path = edited(tmp_path, column, row, value)
    use_google_files(bad, path)
    assert_fails_cleanly(bad, "ingest", "stock", "data/raw/stock", str(path), *expected)


def test_target_that_is_not_split_adjusted(bad, tmp_path):
    path = tmp_path / TRAIN.name
    shutil.copy(TRAIN, path)
    use_google_files(bad, path, **{"data.target": "Close"})
    assert_fails_cleanly(bad, "ingest", "stock", "data/raw/stock", str(path), "column 'Close', row 2",
                         "not split-adjusted", "stock.data.target")  # fmt: skip
