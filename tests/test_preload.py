"""Warm torch stages (preload.py): a stage forked from a process that has imported torch, MLflow and scikit-learn
behaves as the stage process itself would: the same results, output, exit codes and signals."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from accelbench import stage_times
from accelbench.preload import _framework, answering


@pytest.fixture(scope="module")
def warm(prepared_project):
    """The prepared project with a warm process already answering for its environment."""
    prepared_project.run(sys.executable, "-m", "accelbench.preload", "start")
    return prepared_project


def last_record(project, stage: str) -> dict:
    return [r for r in stage_times.latest(project.root / stage_times.LOG) if r["stage"] == stage][-1]


def test_a_warm_stage_gives_what_the_stage_process_gives(warm):
    project = warm
    shutil.rmtree(project.root / "checkpoints", ignore_errors=True)  # each run trains from the start: no resuming
    t0 = time.monotonic()
    proc = project.stage("train")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    warm_record = last_record(project, "train")
    warm_metrics = json.loads((project.root / "results/diabetes/train.json").read_text())
    assert warm_record["warm"] is True
    # the wall time counts from the stage process's start, not the fork, and it never exceeds what its parent saw
    assert warm_record["work_s"] < warm_record["wall_s"] <= elapsed + 0.02
    assert "accelbench train diabetes: done in" in proc.stderr and "diabetes: verdict:" in proc.stdout

    shutil.rmtree(project.root / "checkpoints")
    cold = project.run(sys.executable, "stages/train.py", "diabetes", ACCELBENCH_PRELOAD="0")
    assert last_record(project, "train")["warm"] is False
    cold_metrics = json.loads((project.root / "results/diabetes/train.json").read_text())
    for key in ("val/loss", "val/roc_auc", "train/loss"):  # the same seed, the same numbers
        assert warm_metrics["mlp"][key] == cold_metrics["mlp"][key], key
    assert proc.stdout == cold.stdout  # the verdict line: the same evaluation
    runs = [r for r in project.runs() if r.info.run_name.startswith("train-")]
    assert [r.info.status for r in runs[:2]] == ["FINISHED", "FINISHED"]
    assert runs[0].data.metrics["val/loss"] == runs[1].data.metrics["val/loss"]  # both trained every epoch


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


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGKILL, -9)], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_to_the_stage_process_reaches_the_warm_child(long_train, sig, code):
    """SIGTERM is passed on (the stage ends its run as KILLED and exits 143); SIGKILL cannot be, so the
    supervisor kills the child: no stage goes on training for a process that is gone."""
    project = long_train
    client = subprocess.Popen([sys.executable, "stages/train.py", "diabetes"], cwd=project.root, env=project.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    child = stage_child(client, project.root)
    time.sleep(1.0)
    client.send_signal(sig)
    _, err = client.communicate(timeout=60)
    assert client.returncode == code, err
    child.wait(timeout=10)  # gone, either way
    if sig == signal.SIGTERM:
        assert "interrupted (signal 15)" in err
        assert project.runs(filter_string="attributes.status = 'KILLED'")


def test_the_warm_process_is_asked_only_for_torch_stages(tmp_path, monkeypatch):
    """The framework as the study leaves it: a TensorFlow stage must not run where torch is loaded."""
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


def test_the_hardware_stage_starts_the_warm_process_for_the_torch_stages(project):
    """DVC runs hardware first: the warm process imports while the data stages run, and the first torch stage
    finds it answering. Not for a project whose every workload trains with TensorFlow."""
    project.env["MPLBACKEND"] = "Agg"  # an import-time variable: this test's own warm process, not the suite's
    path = Path(project.run(sys.executable, "-c", "from accelbench import preload; print(preload.socket_path())").stdout.strip())
    if answering(path):  # left by an earlier run of this test
        os.kill(int(path.with_suffix(".lock").read_text()), signal.SIGTERM)
        while answering(path):
            time.sleep(0.1)
    project.update("framework", "tensorflow")
    project.update("workloads", ["diabetes", "stock"])
    project.run(sys.executable, "stages/hardware.py")
    time.sleep(1.0)
    assert not answering(path)
    project.update("workloads", ["diabetes", "quantum"])  # quantum trains with torch whatever the global says
    project.run(sys.executable, "stages/hardware.py")
    deadline = time.monotonic() + 120
    while not answering(path):
        assert time.monotonic() < deadline, "the warm process never answered"
        time.sleep(0.2)
