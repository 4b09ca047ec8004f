"""Runs that survive: SIGKILL and resume, SIGTERM, determinism, parallel tuning workers, secrets."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from conftest import REPO, make_project


def train_popen(project):
    return subprocess.Popen([sys.executable, "stages/train.py", "diabetes"], cwd=project.root, env=project.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_checkpoint(project, proc, min_epoch: int, timeout: float = 300) -> int:
    """Poll the torch checkpoint until it holds at least `min_epoch` epochs; return the epoch seen."""
    import torch

    path = project.root / "checkpoints/diabetes/mlp-torch.pt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.is_file():
            try:
                epoch = torch.load(path, weights_only=True)["epoch"]
            except (EOFError, RuntimeError):  # cannot happen with the atomic rename; would fail below if it did
                raise
            if epoch >= min_epoch:
                return epoch
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture
def long_training(prepared_project):
    project = prepared_project
    original = project.params()
    project.update("deterministic", True)
    project.update("checkpoint.every_epochs", 2)
    project.update("diabetes.train.epochs", 40)
    for path in ("checkpoints", "models", "results/diabetes/train.json"):
        subprocess.run(["rm", "-rf", str(project.root / path)], check=True)
    yield project
    project.set_params(original)
    subprocess.run(["rm", "-rf", str(project.root / "checkpoints")], check=True)


def test_sigkill_then_restart_gives_the_uninterrupted_result(long_training):
    project = long_training
    t0 = time.monotonic()
    assert project.stage("train").returncode == 0
    uninterrupted_s = time.monotonic() - t0
    reference = json.loads((project.root / "results/diabetes/train.json").read_text())["mlp"]
    subprocess.run(["rm", "-rf", str(project.root / "checkpoints"), str(project.root / "models")], check=True)
    (project.root / "results/diabetes/train.json").unlink()

    t0 = time.monotonic()
    proc = train_popen(project)
    killed_at = wait_for_checkpoint(project, proc, min_epoch=10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_s = time.monotonic() - t0
    assert not (project.root / "models/diabetes").exists()  # nothing looks complete
    assert not (project.root / "results/diabetes/train.json").exists()
    t0 = time.monotonic()
    proc = project.stage("train")
    resumed_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads((project.root / "results/diabetes/train.json").read_text())["mlp"]
    for key in ("train/loss", "val/loss", "val/roc_auc", "val/accuracy"):
        assert resumed[key] == reference[key], key  # bit-identical: RNG, optimiser and scaler state restored
    runs = project.runs(filter_string="tags.stage = 'train'")
    assert int(runs[0].data.tags["resumed_from_epoch"]) >= killed_at
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert killed and "died without ending its run" in killed[0].data.tags["failure_reason"]  # no RUNNING lie
    print(f"\nuninterrupted {uninterrupted_s:.1f}s; killed after {first_s:.1f}s at epoch >= {killed_at}; "
          f"resumed run {resumed_s:.1f}s; lost {first_s + resumed_s - uninterrupted_s:.1f}s")  # fmt: skip


def test_changed_params_start_fresh(long_training):
    project = long_training
    proc = train_popen(project)
    wait_for_checkpoint(project, proc, min_epoch=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    project.update("diabetes.train.lr", 0.002)
    assert project.stage("train").returncode == 0
    run = project.runs(filter_string="tags.stage = 'train' and attributes.status = 'FINISHED'")[0]
    assert run.data.tags["resumed_from_epoch"] == "0"


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_the_run_killed_with_the_epoch(long_training, sig, code):
    project = long_training
    proc = train_popen(project)
    wait_for_checkpoint(project, proc, min_epoch=4)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (project.root / "models/diabetes").exists()
    run = project.runs(filter_string="tags.stage = 'train'")[0]
    assert run.info.status == "KILLED"
    assert int(run.data.tags["epoch_reached"]) >= 4
    assert "interrupted" in run.data.tags["failure_reason"]


def test_deterministic_runs_are_identical(long_training):
    project = long_training
    project.update("checkpoint.every_epochs", 0)
    project.update("diabetes.train.epochs", 6)
    results = []
    for _ in range(2):
        assert project.stage("train").returncode == 0
        results.append(json.loads((project.root / "results/diabetes/train.json").read_text())["mlp"])
    keys = [k for k in results[0] if k.startswith(("train/", "val/"))]
    assert keys and all(results[0][k] == results[1][k] for k in keys)
    run = project.runs(filter_string="tags.stage = 'train'")[0]
    assert run.data.tags["deterministic"] == "true"
    assert run.data.tags["torch.use_deterministic_algorithms"] == "True"
    assert run.data.tags["cudnn.benchmark"] == "False"


def test_four_tuning_workers_share_one_sqlite_study(prepared_project):
    project = prepared_project
    original = project.params()
    try:
        project.update("tune.workers", 4)
        project.update("tune.n_trials", 8)
        project.update("tune.prune_warmup_epochs", 100)  # no pruning: every trial runs to the end
        proc = project.stage("tune")
        assert proc.returncode == 0, proc.stderr
        best = json.loads((project.root / "results/diabetes/best_params.json").read_text())["mlp"]
        study = optuna.load_study(study_name="diabetes-cpu-torch", storage=f"sqlite:///{project.root}/mlruns/optuna.db")
        mine = [t for t in study.trials if t.user_attrs.get("config_hash") == best["config_hash"]]
        assert len(mine) == 8 and len({t.number for t in mine}) == 8  # none lost, none duplicated
        assert best["trials"] == {"complete": 8, "pruned": 0, "fail": 0}
        tune = project.runs(filter_string="tags.stage = 'tune'")[0]
        trials = project.runs(filter_string=f"tags.stage = 'trial' and tags.`mlflow.parentRunId` = '{tune.info.run_id}'")
        assert sorted(int(r.data.tags["trial"]) for r in trials) == sorted(t.number for t in mine)
        assert len({r.data.tags["pid"] for r in trials}) == 4  # really four processes
        assert all(r.info.status == "FINISHED" for r in trials)
    finally:
        project.set_params(original)


def test_secrets_never_reach_the_store_or_the_logs(tmp_path):
    secrets = {"KAGGLE_USERNAME": "user-3f9a1c", "KAGGLE_KEY": "kagglekey-7d2e9b41", "MLFLOW_TRACKING_PASSWORD": "mlpw-51c0ffee"}
    project = make_project(tmp_path / "project")
    project.env.update(secrets)
    ps = project.params()
    ps["diabetes"]["data"]["source"] = "path"
    ps["diabetes"]["data"]["path"] = str(REPO / "tests" / "fixtures" / "diabetes.csv")
    project.set_params(ps)
    proc = project.run(sys.executable, "-m", "dvc", "repro", "evaluate@diabetes")
    blobs = [proc.stdout, proc.stderr]
    for path in (project.root / "mlruns").rglob("*"):
        if path.is_file():
            blobs.append(path.read_bytes().decode("latin-1"))
    for path in (project.root / "results").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".csv"):
            blobs.append(path.read_text())
    assert len(blobs) > 5
    for name, value in secrets.items():
        assert not any(value in b for b in blobs), f"{name} leaked"
    assert os.environ.get("KAGGLE_KEY") != secrets["KAGGLE_KEY"]
