"""Runs that survive: SIGKILL and resume, SIGTERM, determinism, parallel tuning workers and hosts, secrets."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest

from conftest import REPO, make_project
from servers import postgres_missing, postgres_server


def _sigint_default() -> None:
    # a job started in the background of a script (as a CI runner may start the tests) inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: the stage is started as a foreground one would be
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def train_popen(project):
    return subprocess.Popen([sys.executable, "stages/train.py", "diabetes"], cwd=project.root, env=project.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_default)  # fmt: skip


def wait_for_checkpoint(project, proc, min_epoch: int, timeout: float = 300, framework: str = "torch") -> int:
    """Poll the checkpoint until it holds at least `min_epoch` epochs; return the epoch seen."""
    import torch

    path = project.root / ("checkpoints/diabetes/mlp-torch.pt" if framework == "torch" else "checkpoints/diabetes/mlp-tensorflow.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.is_file():
            # the atomic rename means a half-written file is never seen: a read error here fails the test
            epoch = torch.load(path, weights_only=True)["epoch"] if framework == "torch" else json.loads(path.read_text())["epoch"]
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


@pytest.mark.parametrize("framework, epochs, kill_after", [("torch", 40, 10), ("tensorflow", 8, 4)])
def test_sigkill_then_restart_gives_the_uninterrupted_result(long_training, framework, epochs, kill_after):
    project = long_training
    project.update("framework", framework)
    project.update("diabetes.train.epochs", epochs)
    t0 = time.monotonic()
    assert project.stage("train").returncode == 0
    uninterrupted_s = time.monotonic() - t0
    reference = json.loads((project.root / "results/diabetes/train.json").read_text())["mlp"]
    subprocess.run(["rm", "-rf", str(project.root / "checkpoints"), str(project.root / "models")], check=True)
    (project.root / "results/diabetes/train.json").unlink()

    t0 = time.monotonic()
    proc = train_popen(project)
    killed_at = wait_for_checkpoint(project, proc, min_epoch=kill_after, framework=framework)
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
    assert killed_at < epochs  # it really was cut short
    runs = project.runs(filter_string="tags.stage = 'train'")
    assert int(runs[0].data.tags["resumed_from_epoch"]) >= killed_at
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert killed and "died without ending its run" in killed[0].data.tags["failure_reason"]  # no RUNNING lie
    print(f"\n{framework}: uninterrupted {uninterrupted_s:.1f}s; killed after {first_s:.1f}s at epoch >= {killed_at}; "
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
    project.update("diabetes.train.epochs", 2000)  # the signal ends it; 40 epochs (~1 s) could end before it came
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
    assert run.data.tags["cudnn.benchmark"] == "False" and run.data.tags["cudnn.deterministic"] == "True"
    assert run.data.tags["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")  # set before CUDA starts: cuBLAS honours it


def test_four_tuning_workers_share_one_sqlite_study(prepared_project):
    project = prepared_project
    original = project.params()
    try:
        project.update("diabetes.tune.workers", 4)  # this workload's own count (the global tune.workers stays 1)
        project.update("tune.n_trials", 8)
        project.update("tune.prune_warmup_epochs", 100)  # no pruning: every trial runs to the end
        env = {**project.env, "ACCELBENCH_PROGRESS_S": "0"}  # a progress line after every trial
        proc = subprocess.run([sys.executable, "stages/tune.py", "diabetes"], cwd=project.root, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        # each worker's progress reaches the stage's output: a line per trial of each of the three workers
        workers = re.findall(r"^accelbench tune diabetes-cpu-torch \(worker, pid (\d+)\): trial \d/\d", proc.stderr, re.M)
        assert len(workers) == 6 and len(set(workers)) == 3, proc.stderr
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


CLAIMING_PROCESS = """
import sys, time, optuna
from accelbench import claims
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="s", storage=claims.storage(sys.argv[1]))
while claims.run_one(study, "h", int(sys.argv[2]), lambda t: (time.sleep(0.005), t.suggest_float("x", 0, 1))[1]):
    pass
"""


def test_processes_claiming_at_once_run_each_trial_once(tmp_path):
    """Six processes claim and run trials of one SQLite study as fast as they can: each trial is popped by one
    process (two popping one waiting trial both ran it, and the second failed on 'Cannot tell a COMPLETE trial')."""
    from accelbench import claims

    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="s", storage=claims.storage(url))
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMING_PROCESS, url, "40"], stderr=subprocess.PIPE, text=True)
             for _ in range(6)]  # fmt: skip
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, next(e for e in errors if e)[-2000:]
    states = [t.state for t in optuna.load_study(study_name="s", storage=url).trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 40


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(prepared_project):
    """A real failure (a learning rate that blows the loss up: TrainingError, the path an out-of-memory
    error takes too) fails its trial in Optuna and in MLflow with the reason; the other trials run."""
    project = prepared_project
    original = project.params()
    try:
        project.update("tune.n_trials", 4)
        project.update("tune.prune_warmup_epochs", 100)
        project.update("tune.storage", "sqlite:///mlruns/failing.db")  # a fresh study: lr becomes a categorical
        project.update("diabetes.search", {"train.lr": {"choices": [1.0e-3, 1.0e+30]}})
        proc = project.stage("tune")
        assert proc.returncode == 0, proc.stderr
        best = json.loads((project.root / "results/diabetes/best_params.json").read_text())["mlp"]
        study = optuna.load_study(study_name="diabetes-cpu-torch", storage=f"sqlite:///{project.root}/mlruns/failing.db")
        mine = [t for t in study.trials if t.user_attrs.get("config_hash") == best["config_hash"]]
        failed = [t for t in mine if t.state == optuna.trial.TrialState.FAIL]
        assert len(mine) == 4 and failed and len(failed) < 4, [(t.params, t.state) for t in mine]
        assert all(t.params["train.lr"] == 1e30 for t in failed)
        assert all("training loss became" in t.user_attrs["fail_reason"] and "lr=1e+30" in t.user_attrs["fail_reason"] for t in failed)
        assert best["trials"] == {"complete": 4 - len(failed), "pruned": 0, "fail": len(failed)}
        assert best["params"]["train.lr"] == 1e-3
        tune = project.runs(filter_string="tags.stage = 'tune'")[0]
        runs = {int(r.data.tags["trial"]): r for r in project.runs(
            filter_string=f"tags.stage = 'trial' and tags.`mlflow.parentRunId` = '{tune.info.run_id}'")}  # fmt: skip
        assert sorted(runs) == sorted(t.number for t in mine)
        for t in mine:
            run = runs[t.number]
            if t in failed:
                assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == t.user_attrs["fail_reason"]
            else:
                assert run.info.status == "FINISHED"
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
    proc = project.run(sys.executable, "-m", "dvc", "repro", "train@diabetes")
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


PASSWORD = "pg-s3cret-9e1b"  # planted: it must reach no MLflow record and no log


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway server (tests/servers.py) with one login and database for the studies."""
    if why := postgres_missing():
        pytest.skip(why)
    with postgres_server() as pg:
        yield pg.database("studies", "tuner", PASSWORD)


def test_two_hosts_share_one_postgres_study(prepared_project, postgres_url):
    """Two tune stages at once (two 'hosts', the first with two worker processes) on one PostgreSQL study:
    exactly n_trials trials in the whole study, none lost or duplicated, each with its nested MLflow run."""
    project = prepared_project
    original = project.params()
    try:
        project.update("tune.storage", postgres_url)
        project.update("tune.n_trials", 4)
        project.update("tune.prune_warmup_epochs", 100)  # no pruning: every trial runs to the end
        optuna.storages.RDBStorage(postgres_url).engine.dispose()  # the schema, created once as on a shared server
        hosts = []
        for workers in (2, 1):
            project.update("tune.workers", workers)  # read at start-up: each host keeps its own value
            hosts.append(subprocess.Popen([sys.executable, "stages/tune.py", "diabetes"], cwd=project.root, env=project.env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
            if workers == 2:  # the second host joins a study under way, so the first holds trials of its own
                _wait_for_a_trial(postgres_url)
        logs = [p.communicate(timeout=600) for p in hosts]
        for p, (out, err) in zip(hosts, logs):
            assert p.returncode == 0, err[-3000:]

        study = optuna.load_study(study_name="diabetes-cpu-torch", storage=postgres_url)
        trials = study.get_trials(deepcopy=False)
        assert sorted(t.number for t in trials) == list(range(4))  # none lost, none duplicated, none extra
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
        assert len({t.user_attrs["config_hash"] for t in trials}) == 1

        tunes = project.runs(filter_string="tags.stage = 'tune'")[:2]
        assert {r.data.params["tune.storage"] for r in tunes} == {postgres_url.replace(PASSWORD, "***")}
        runs = [r for tune in tunes for r in project.runs(
            filter_string=f"tags.stage = 'trial' and tags.`mlflow.parentRunId` = '{tune.info.run_id}'")]  # fmt: skip
        assert sorted(int(r.data.tags["trial"]) for r in runs) == list(range(4))  # one nested run per trial
        assert all(r.info.status == "FINISHED" for r in runs)
        assert len({r.data.tags["pid"] for r in runs}) >= 2  # shared: each of the first host's processes runs 2 at most

        blobs = [text for pair in logs for text in pair]
        blobs += [p.read_bytes().decode("latin-1") for p in (project.root / "mlruns").rglob("*") if p.is_file()]
        blobs += [p.read_text() for p in (project.root / "results").rglob("*.json")]
        assert not [b[:200] for b in blobs if PASSWORD in b]
    finally:
        project.set_params(original)


def _wait_for_a_trial(url: str, timeout: float = 300) -> None:
    storage = optuna.storages.RDBStorage(url)  # one engine: a new one per poll would leak server connections
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if optuna.load_study(study_name="diabetes-cpu-torch", storage=storage).get_trials(deepcopy=False):
                storage.engine.dispose()
                return
        except KeyError:  # the first host has not created the study yet
            pass
        time.sleep(0.2)
    raise AssertionError("the first host started no trial")
