"""Warm stages (preload.py): a stage forked from a process that has imported its framework (or, for the data stages,
pandas and the rest), MLflow and scikit-learn behaves as the stage process itself would: the same results, output,
exit codes and signals."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import HEAVY

from accelbench import stage_times
from accelbench.io import load_prepared
from accelbench.preload import _framework, answering


@pytest.fixture(scope="module")
def warm(prepared_project):
    """The prepared project with a warm torch process already answering for its environment."""
    prepared_project.run(sys.executable, "-m", "accelbench.preload", "start", "torch")
    return prepared_project


def last_record(project, stage: str) -> dict:
    return [r for r in stage_times.latest(project.root / stage_times.LOG) if r["stage"] == stage][-1]


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_a_warm_stage_gives_what_the_stage_process_gives(warm, framework):
    project = warm
    original = project.params()
    project.update("framework", framework)
    project.run(sys.executable, "-m", "accelbench.preload", "start", framework)
    try:
        warm_proc, warm_record, warm_metrics, warm_run = train_and_read(project)
        cold_proc, cold_record, cold_metrics, cold_run = train_and_read(project, ACCELBENCH_PRELOAD="0")
    finally:
        project.set_params(original)
    assert (warm_record["warm"], cold_record["warm"]) == (True, False)
    assert "accelbench train diabetes: done in" in warm_proc.stderr and "diabetes: verdict:" in warm_proc.stdout
    for key in ("val/loss", "val/roc_auc", "train/loss"):  # the same seed, the same numbers
        assert warm_metrics["mlp"][key] == cold_metrics["mlp"][key], key
    assert warm_proc.stdout == cold_proc.stdout  # the verdict line: the same evaluation
    assert warm_run.data.tags["framework"] == cold_run.data.tags["framework"] == framework
    assert warm_run.data.metrics["val/loss"] == cold_run.data.metrics["val/loss"]  # both trained every epoch


def train_and_read(project, **env: str):
    """Train from the start (no checkpoint to resume): the stage's output, stage_times record, train.json and run."""
    shutil.rmtree(project.root / "checkpoints", ignore_errors=True)
    t0 = time.monotonic()
    proc = project.run(sys.executable, "stages/train.py", "diabetes", **env)
    elapsed = time.monotonic() - t0
    record = last_record(project, "train")
    # the wall time counts from the stage process's start, not the fork, and never exceeds what its parent saw
    assert record["work_s"] < record["wall_s"] <= elapsed + 0.02
    metrics = json.loads((project.root / "results/diabetes/train.json").read_text())
    run = [r for r in project.runs() if r.info.run_name.startswith("train-")][0]
    assert run.info.status == "FINISHED"
    return proc, record, metrics, run


def test_a_warm_stage_fails_with_the_stage_processes_line_and_code(warm):
    project = warm
    meta = project.root / "data/prepared/diabetes/meta.json"
    saved = meta.read_text()
    meta.write_text("{not json")
    try:
        proc = project.stage("tune")
    finally:
        meta.write_text(saved)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "meta.json" in errors[0], proc.stderr


def stage_child(client: subprocess.Popen, root) -> psutil.Process:
    """The warm child serving this stage process: forked from the server, working in the project's directory."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for p in psutil.process_iter(["cmdline", "cwd"]):
            if "accelbench.preload" in " ".join(p.info["cmdline"] or []) and p.info["cwd"] == str(root):
                return p
        assert client.poll() is None, client.communicate()
        time.sleep(0.1)
    raise AssertionError("no warm child")


@pytest.fixture
def long_train(warm):
    original = warm.params()
    warm.update("diabetes.train.epochs", 5000)
    yield warm
    warm.set_params(original)


def start_training(project, **popen) -> subprocess.Popen:
    env = {**project.env, "ACCELBENCH_PROGRESS_S": "0"}  # a line per epoch
    return subprocess.Popen([sys.executable, "stages/train.py", "diabetes"], cwd=project.root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)  # fmt: skip


def until_an_epoch(client: subprocess.Popen) -> list[str]:
    """The stage's lines up to its first epoch's: training, under its open run (a loaded host takes seconds)."""
    seen = []
    for line in client.stderr:
        seen.append(line)
        if ": epoch " in line:
            break
    return seen


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGKILL, -9)], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_to_the_stage_process_reaches_the_warm_child(long_train, sig, code):
    """SIGTERM is passed on (the stage ends its run as KILLED and exits 143); SIGKILL cannot be, so the
    supervisor kills the child: no stage goes on training for a process that is gone."""
    project = long_train
    client = start_training(project)
    child = stage_child(client, project.root)
    seen = until_an_epoch(client)
    client.send_signal(sig)
    _, rest = client.communicate(timeout=60)
    err = "".join(seen) + rest
    assert client.returncode == code, err
    child.wait(timeout=10)  # gone, either way
    if sig == signal.SIGTERM:
        assert "interrupted (signal 15)" in err
        assert project.runs(filter_string="attributes.status = 'KILLED'")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pins the stage to one CPU of several")
def test_a_warm_stage_runs_on_the_stage_processs_cpus(long_train):
    """taskset, or a scheduler's cpuset, confines a warm stage as it would the stage's own interpreter: the forked
    child takes the stage process's CPUs, and torch's default threads shrink to them (one here, as `taskset -c 0
    python` gets), where the warm process has them all."""
    project = long_train
    project.update("cpu_threads", None)  # the framework's default, derived from the CPUs a process may use
    one = sorted(os.sched_getaffinity(0))[:1]
    client = start_training(project, preexec_fn=lambda: os.sched_setaffinity(0, one))
    child = stage_child(client, project.root)
    seen = until_an_epoch(client)
    cpus = child.cpu_affinity()
    client.send_signal(signal.SIGTERM)
    err = "".join(seen) + client.communicate(timeout=60)[1]
    assert client.returncode == 143 and cpus == one, err
    latest = project.runs(filter_string="attributes.status = 'KILLED'")[0]  # newest first
    assert latest.data.tags["cpu_threads"] == "1"


def test_each_stage_asks_the_warm_process_of_its_framework_as_the_study_leaves_it(tmp_path, monkeypatch):
    """A TensorFlow stage must not run where torch is loaded: the framework, read cheaply, follows the study."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    params = {"study": "quick", "studies": {"quick": {}, "tf": {"stock.framework": "tensorflow"}},
              "framework": "torch", "stock": {"framework": None}, "rnn": {"framework": "tensorflow"}}  # fmt: skip
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    assert [_framework(w) for w in ("stock", "rnn", "diabetes")] == ["torch", "tensorflow", "torch"]
    params["study"] = "tf"
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    assert _framework("stock") == "tensorflow"
    (tmp_path / "params.yaml").write_text("{broken")
    assert _framework("stock") is None


def warm_paths(project) -> dict[str, Path]:
    code = "from accelbench import preload; print(preload.socket_path('torch'), preload.socket_path('tensorflow'))"
    return dict(zip(("torch", "tensorflow"), map(Path, project.run(sys.executable, "-c", code).stdout.split())))


def wait_answering(path: Path) -> None:
    deadline = time.monotonic() + 120
    while not answering(path):
        assert time.monotonic() < deadline, f"no warm process answered at {path}"
        time.sleep(0.2)


def test_the_hardware_stage_starts_the_warm_process_each_listed_framework_needs(project):
    """DVC runs hardware first: the warm processes import while the data stages run, and the first training stage
    finds its own answering: one for torch, one for TensorFlow, and none that no listed workload trains with."""
    project.env["MPLBACKEND"] = "Agg"  # an import-time variable: this test's own warm processes, not the suite's
    paths = warm_paths(project)
    for path in paths.values():  # left by an earlier run of this test
        if answering(path):
            os.kill(int(path.with_suffix(".lock").read_text()), signal.SIGTERM)
            while answering(path):
                time.sleep(0.1)
    project.update("workloads", ["diabetes", "quantum"])
    project.run(sys.executable, "stages/hardware.py")
    wait_answering(paths["torch"])
    time.sleep(1.0)
    assert not answering(paths["tensorflow"])
    os.kill(int(paths["torch"].with_suffix(".lock").read_text()), signal.SIGTERM)
    project.update("framework", "tensorflow")
    project.update("workloads", ["diabetes", "stock"])
    project.run(sys.executable, "stages/hardware.py")
    wait_answering(paths["tensorflow"])
    assert not answering(paths["torch"])


def test_the_data_stages_warm_process_loads_no_framework_and_no_store():
    """ingest, eda, prepare and summary fork from their own warm process: what it imports, they would have loaded."""
    code = ("import importlib, sys; from accelbench.preload import PRELOADED\n"
            "[importlib.import_module(m) for m in PRELOADED['data']]\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")  # fmt: skip
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert {"pandas", "accelbench"} <= loaded  # the probe sees what is loaded
    assert loaded.isdisjoint(HEAVY), loaded & set(HEAVY)


def test_a_warm_data_stage_prepares_what_the_stage_process_prepares(warm):
    project = warm
    project.run(sys.executable, "-m", "accelbench.preload", "start", "data")
    prepared = {}
    for flag in ("1", "0"):
        project.run(sys.executable, "stages/prepare.py", "diabetes", ACCELBENCH_PRELOAD=flag)
        assert last_record(project, "prepare")["warm"] is (flag == "1")
        prepared[flag] = load_prepared(project.root / "data/prepared/diabetes")
    assert prepared["1"].meta == prepared["0"].meta
    for split, arrays in prepared["0"].splits.items():
        for name, array in arrays.items():
            assert np.array_equal(prepared["1"].splits[split][name], array), (split, name)
