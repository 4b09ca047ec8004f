"""Fast checks of the core pieces that the pipeline tests exercise only end to end."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from accelbench import devices
from accelbench.config import ablation_options, with_overrides
from accelbench.project import load_config
from accelbench.errors import ConfigError, DeviceError
from accelbench.io import atomic_dir
from accelbench.timing import median, spread, steady
from accelbench.study import mask_secrets, storage_url
from accelbench.workloads import get_workload
from accelbench.workloads.diabetes import read_kaggle_csv
from conftest import FIXTURES, REPO


def test_repo_params_load_and_typed():
    cfg = load_config(REPO / "params.yaml")
    p = cfg.params("diabetes")
    assert p.model.hidden == [12, 8] and isinstance(p.train.lr, float)
    assert p.search["train.batch_size"].choices == [16, 32, 64, 128]


def test_overrides_are_type_checked_and_paths_checked():
    p = load_config(REPO / "params.yaml").params("diabetes")
    q = with_overrides(p, {"train.lr": 0.01, "model.dropout": 0})
    assert q.train.lr == 0.01 and q.model.dropout == 0.0 and p.train.lr != 0.01
    with pytest.raises(ConfigError, match="'train.lrr': no such parameter"):
        with_overrides(p, {"train.lrr": 1})
    with pytest.raises(ConfigError, match="train.batch_size: expected int"):
        with_overrides(p, {"train.batch_size": "big"})


def test_compile_mode_needs_compile_and_its_ablation_entry_compiles(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("compile_mode: default", "compile_mode: max-autotune-no-cudagraphs")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match="compile_mode 'max-autotune-no-cudagraphs' needs compile: true"):
        load_config(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(text.replace("compile: false", "compile: true"))
    assert load_config(tmp_path / "params.yaml").compile_mode == "max-autotune-no-cudagraphs"
    # alone in an ablation, the mode is compile in that mode; the default mode changes only the mode
    assert ablation_options(["compile_mode=max-autotune-no-cudagraphs", "compile_mode=default"]) == {
        "compile_mode=max-autotune-no-cudagraphs": {"compile_mode": "max-autotune-no-cudagraphs", "compile": True},
        "compile_mode=default": {"compile_mode": "default"}}
    with pytest.raises(ValueError, match=re.escape("compile_mode=default|max-autotune-no-cudagraphs")):
        ablation_options(["compile_mode=max-autotune"])  # its own CUDA graphs would fight cuda_graphs'


def test_search_spec_needs_range_or_choices(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("{low: 0.0, high: 0.5}", "{low: 0.5, high: 0.1}")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"diabetes.search.model.dropout: low \(0.5\) must be below high"):
        load_config(tmp_path / "params.yaml")


def test_missing_workloads_key(tmp_path):
    (tmp_path / "params.yaml").write_text("device: cpu\n")
    with pytest.raises(ConfigError, match="missing key 'workloads'"):
        load_config(tmp_path / "params.yaml")


def test_device_specs():
    assert devices.resolve("cpu", "torch").label == "cpu"
    with pytest.raises(DeviceError, match="not one of"):
        devices.resolve("tpu", "torch")
    import torch

    if not torch.cuda.is_available():
        assert devices.resolve("auto", "torch").type == "cpu"  # auto may pick the CPU; cuda may not
        with pytest.raises(DeviceError, match="sees no CUDA GPU"):
            devices.resolve("cuda:0", "torch")


def _prepare(folder: Path, df: pd.DataFrame):
    df.to_csv(folder / "diabetes.csv", index=False)
    params = load_config(REPO / "params.yaml").params("diabetes")
    return get_workload("diabetes").prepare(params, folder, seed=0)


def test_test_rows_cannot_leak_into_imputation_or_scaling(tmp_path):
    df = read_kaggle_csv(FIXTURES / "diabetes.csv")
    before = _prepare(tmp_path, df)
    test_rows = before.meta["split_rows"]["test"]
    corrupted = df.copy()
    corrupted.loc[test_rows, "Glucose"] = 0  # now missing in every test row
    corrupted.loc[test_rows, "BMI"] += 1000.0
    after = _prepare(tmp_path, corrupted)
    assert after.meta["split_rows"] == before.meta["split_rows"]
    for key in ("imputed_median", "scaler_mean", "scaler_std"):
        assert after.meta[key] == before.meta[key], key
    for split in ("train", "val"):
        np.testing.assert_array_equal(after.splits[split]["x"], before.splits[split]["x"])
    assert not np.array_equal(after.splits["test"]["x"], before.splits["test"]["x"])
    # and the imputed value really is the training rows' median, zeros excluded
    train = df.loc[before.meta["split_rows"]["train"], "Glucose"].replace(0, np.nan)
    assert before.meta["imputed_median"]["Glucose"] == pytest.approx(train.median())


def test_splits_are_disjoint_complete_and_stratified(tmp_path):
    prepared = _prepare(tmp_path, read_kaggle_csv(FIXTURES / "diabetes.csv"))
    rows = prepared.meta["split_rows"]
    assert sorted(rows["train"] + rows["val"] + rows["test"]) == list(range(90))
    rates = [prepared.splits[s]["y"].mean() for s in ("train", "val", "test")]
    assert max(rates) - min(rates) < 0.1


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_timing_stats():
    assert steady([9.0, 1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]
    assert steady([9.0], 1) == [9.0]
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0)


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_a_timed_repeat_runs_its_steps_until_it_lasts_min_repeat_s(prepared_project, framework):
    """Each engine's bench, on the prepared diabetes split: a few steps of a small MLP last about a millisecond,
    so with a 0.1 s floor every timed repeat runs them several times over; with no floor, once. With a floor far
    below one step (as a large batch on a CPU is to 0.25 s), a repeat is a single step."""
    from accelbench.project import load_config
    from accelbench.devices import Runtime, resolve
    from accelbench.engines import BenchSpec, get_engine
    from accelbench.io import load_prepared
    from accelbench.workloads import get_workload

    wl = get_workload("diabetes")
    params = load_config(prepared_project.root / "params.yaml").params("diabetes")
    prepared = load_prepared(prepared_project.root / "data" / "prepared" / "diabetes")
    runtime = Runtime(resolve("cpu", framework), framework, cpu_threads=1)
    engine = get_engine(framework)
    engine.setup(runtime)
    steps = {}
    for floor in (0.0, 0.1, 1e-7):
        model = wl.build_model(framework, params, prepared.meta)
        spec = BenchSpec(batch_size=32, steps=3, warmup=1, repeats=2, min_repeat_s=floor)
        res = engine.bench(model, wl.task(prepared.meta), prepared, params.train, runtime, spec)
        assert len(res.repeat_s) == 2
        steps[floor] = res.steps
    assert steps[0.0] == 3 and steps[0.1] > 3 and steps[0.1] % 3 == 0 and steps[1e-7] == 1


def test_storage_paths_and_secrets(tmp_path: Path):
    assert storage_url("sqlite:///mlruns/optuna.db", tmp_path) == f"sqlite:///{tmp_path}/mlruns/optuna.db"
    assert storage_url("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert mask_secrets("postgresql://bob:s3cret@db:5432/optuna") == "postgresql://bob:***@db:5432/optuna"


def test_a_stage_in_a_log_says_start_what_it_read_progress_and_result(prepared_project):
    """No terminal (output captured, as in a CI log): lines, not a bar; the interval set to 0 so that each of the
    fixture's few epochs gives one; MLflow's system-metrics chatter filtered out."""
    import subprocess
    import sys

    env = {**prepared_project.env, "ACCELBENCH_PROGRESS_S": "0"}
    proc = subprocess.run([sys.executable, "stages/train.py", "diabetes"], cwd=prepared_project.root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("accelbench ")]
    assert lines[0] == "accelbench train diabetes: start"
    assert re.fullmatch(r"accelbench train diabetes: read data/prepared/diabetes: train [\d,]+, val [\d,]+, test [\d,]+ rows", lines[1])
    epochs = [ln for ln in lines if ": epoch " in ln]
    assert len(epochs) >= 3, lines  # the fixture trains 4 epochs: one line each after the first
    assert all(re.search(r"epoch \d/4, [\d.]+ s/epoch, ETA [\d.]+ s", ln) for ln in epochs), epochs
    assert re.fullmatch(r"accelbench train diabetes: done in [\d.]+ s; mlp: [\d.e-]+ s/epoch, val/loss [\d.]+; "  # trained, then
                        r"mlp: test/loss [\d.]+, test/accuracy [\d.]+, .*; logreg: test/loss [\d.]+, .*", lines[-1])  # evaluated
    assert "Skip logging GPU metrics" not in proc.stderr and "\r" not in proc.stderr


def test_the_benchmark_stage_in_a_log_shows_its_childs_lines_while_the_child_runs(prepared_project):
    """The benchmark measures in a child process per device (interleave.py); its read and progress lines reach the
    stage's own stderr while it runs, in order between the stage's start and result lines, and not after it ends.
    A batch size above the training rows is timed at the whole split, and the log says so."""
    import json
    import subprocess
    import sys

    env = {**prepared_project.env, "ACCELBENCH_PROGRESS_S": "0"}
    sweep = prepared_project.params()["benchmark"]["batch_sizes"]
    prepared_project.update("benchmark.batch_sizes", [*sweep, 10**6])
    try:
        proc = subprocess.Popen([sys.executable, "stages/benchmark.py", "diabetes"], cwd=prepared_project.root, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        lines, child_alive_at_read = [], False
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if ": read " in line:  # the child's first line: the child must still be at work when it arrives
                child_alive_at_read = any("benchmark diabetes torch cpu " in cmd for cmd in _commands_in(prepared_project.root))
        assert proc.wait(timeout=600) == 0, "\n".join(lines[-40:])
    finally:
        prepared_project.update("benchmark.batch_sizes", sweep)
    ours = [ln for ln in lines if ln.startswith("accelbench ")]
    assert ours[0] == "accelbench benchmark diabetes: start"
    read = re.fullmatch(r"accelbench benchmark diabetes: read data/prepared/diabetes \(([\d,]+) training rows\) to time torch on cpu", ours[1])
    assert read and child_alive_at_read, "the child's read line arrived only after the child had ended"
    rows = int(read[1].replace(",", ""))
    assert ours[2] == f"accelbench benchmark diabetes: batch size 1000000 exceeds the {rows:,} training rows: mlp on cpu timed at {rows:,}"
    timed = {r["batch_size"] for r in json.loads((prepared_project.root / "results/diabetes/benchmark.json").read_text())["records"]
             if r["kind"] == "throughput"}  # fmt: skip
    assert max(timed) == rows and 10**6 not in timed
    points = [ln for ln in ours if ln.startswith("accelbench benchmark diabetes mlp torch cpu: batch size ")]
    assert points and all(re.search(r"batch size \d/\d, [\d.]+ s/batch size, ETA [\d.]+ s", ln) for ln in points), ours
    assert ours.index(points[0]) == 3  # progress follows the read line and the note: nothing of the child's is held back
    assert re.fullmatch(r"accelbench benchmark diabetes: done in [\d.]+ s; \d+ measurements in results/diabetes/benchmark.json", ours[-1])
    assert not [ln for ln in ours if ": error: " in ln or "interrupted" in ln], ours
    assert not [ln for ln in lines if " INFO " in ln], lines  # MLflow's and alembic's chatter stays filtered


def _commands_in(root) -> list[str]:
    """The command lines of the processes working in `root`: a stage's children, also those of a warm stage
    (preload.py), which the stage process waits on but did not start (one that ends while we look is passed over)."""
    import contextlib

    import psutil

    commands = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.cwd() == str(root):
                commands.append(" ".join(proc.cmdline()))
    return commands


def test_a_moved_project_keeps_its_mlflow_artifacts(prepared_project, tmp_path):
    """The local store keeps artifact locations relative to the project root (tracking.use_experiment): copied
    elsewhere and the original gone, MLflow finds every run's artifacts in the copy, and a stage run for the copy
    logs into it, never into the old place nor its own working directory."""
    import contextlib
    import shutil
    import subprocess
    import sys

    import mlflow

    from conftest import Project

    assert prepared_project.stage("train").returncode == 0
    copy = Project(tmp_path / "elsewhere" / "project", prepared_project.env)
    shutil.copytree(prepared_project.root, copy.root, symlinks=True)
    original = prepared_project.root
    gone = original.rename(original.with_name("gone"))
    try:
        assert copy.client().get_experiment_by_name("diabetes").artifact_location == "mlruns/artifacts/diabetes"
        train = copy.runs(filter_string="tags.stage = 'train'")[0]
        assert train.info.artifact_uri == f"mlruns/artifacts/diabetes/{train.info.run_id}/artifacts"
        assert {"model/model.pt", "model/model.json"} <= set(copy.artifacts(train.info.run_id, "model"))
        with contextlib.chdir(copy.root):
            got = mlflow.artifacts.download_artifacts(run_id=train.info.run_id, artifact_path="model/model.json",
                                                      dst_path=str(tmp_path / "got"), tracking_uri=str(copy.client().tracking_uri))  # fmt: skip
        assert Path(got).read_text() == (copy.root / "models/diabetes/mlp/model.json").read_text()
        # as a queued or temp experiment runs it: in a copy of the workspace, $DVC_ROOT naming the project
        workspace = tmp_path / "workspace"
        workspace.mkdir()
        proc = subprocess.run([sys.executable, str(copy.root / "stages/train.py"), "diabetes"], cwd=workspace,
                              env={**copy.env, "DVC_ROOT": str(copy.root)}, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        again = copy.runs(filter_string="tags.stage = 'train'")[0]
        assert again.info.run_id != train.info.run_id and "model/model.pt" in copy.artifacts(again.info.run_id, "model")
        assert not original.exists() and list(workspace.iterdir()) == []  # nothing written to the old place or the cwd
    finally:
        gone.rename(original)


def test_a_store_from_before_relative_locations_is_made_relative_where_it_now_lies(tmp_path):
    """A store made while locations were absolute, its project moved since: the first stage to open the experiment
    in the new place rewrites the old prefix, so the runs logged before the move find their artifacts again."""
    import contextlib
    import os
    import subprocess
    import sys

    import mlflow

    old, new = tmp_path / "old", tmp_path / "new"
    (new / "mlruns").mkdir(parents=True)
    client = mlflow.MlflowClient(f"sqlite:///{new / 'mlruns' / 'mlflow.db'}")
    exp = client.create_experiment("diabetes", artifact_location=(old / "mlruns/artifacts/diabetes").as_uri())
    run = client.create_run(exp).info
    moved = new / "mlruns/artifacts/diabetes" / run.run_id / "artifacts" / "note.txt"  # where the move took it
    moved.parent.mkdir(parents=True)
    moved.write_text("kept")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    subprocess.run([sys.executable, "-c", "from accelbench.tracking import use_experiment; use_experiment('diabetes')"],
                   env={**env, "DVC_ROOT": str(new)}, check=True, timeout=120)  # fmt: skip
    assert client.get_experiment(exp).artifact_location == "mlruns/artifacts/diabetes"
    assert client.get_run(run.run_id).info.artifact_uri == f"mlruns/artifacts/diabetes/{run.run_id}/artifacts"
    with contextlib.chdir(new):
        assert [a.path for a in client.list_artifacts(run.run_id)] == ["note.txt"]
