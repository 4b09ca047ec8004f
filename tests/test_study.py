"""The named study sizes: `study: gpu` resolves and runs end to end (here on the CPU, shrunk); tuning honours
tune.timeout_s inside a trial; `tune.strategy: auto` picks populations wherever the model stacks."""
from __future__ import annotations

import json
import sys
import time

import yaml

from conftest import REPO, make_project
from accelbench.config import with_overrides
from accelbench.devices import Device, Runtime
from accelbench.project import load_config
from accelbench.study import strategy_for
from accelbench.workloads import available, get_workload

# The GPU study's keys that size the work, shrunk so that the same keys run on 2 cores in seconds.
TINY_GPU = {
    "device": "cpu", "benchmark.devices": ["cpu"], "benchmark.ablation_devices": ["cpu"],
    "benchmark.batch_sizes": [32], "benchmark.population": {"trials": 4, "sequential_trials": 1, "epochs": 1, "cpu_trials": None},
    "guava.data.count": 60, "guava.prepare.image_size": 32, "sentiment.data.max_rows": 400,
    "quantum.benchmark.circuits.images": 4, "quantum.benchmark.circuits.cpu_images": None,
}  # fmt: skip


def test_every_study_resolves_for_every_workload(tmp_path):
    """The real params.yaml, unshrunk: each study's overrides must pass the checks on top of the real base."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(params["studies"]) >= {"quick", "gpu"}
    path = tmp_path / "params.yaml"
    for name in params["studies"]:
        path.write_text(yaml.safe_dump({**params, "study": name}, sort_keys=False))
        cfg = load_config(path)
        assert cfg.study == name and set(cfg.sections) >= set(available())
    gpu = load_config(path)  # the last one: sizes come from the study, not the base
    assert gpu.device == "cuda" and gpu.benchmark.devices == ["cpu", "cuda"]
    assert gpu.params("guava").prepare.image_size == 224 and gpu.params("sentiment").data.max_rows is None


def test_the_gpu_study_runs_on_the_cpu_at_a_tiny_size(tmp_path):
    project = make_project(tmp_path / "project", ["diabetes"])
    params = project.params()
    gpu = params["studies"]["gpu"]
    unsized = set(gpu) - set(TINY_GPU)
    params["studies"]["gpu"] = {**gpu, **{k: v for k, v in TINY_GPU.items() if k in gpu}}
    project.set_params(params)
    project.run("git", "commit", "-qam", "tiny gpu study")
    out = project.run(sys.executable, "-m", "dvc", "exp", "run", "-S", "study=gpu").stdout
    assert "Running stage 'benchmark@diabetes'" in out and "Running stage 'report'" in out
    records = json.loads((project.root / "results/diabetes/benchmark.json").read_text())["records"]
    kinds = {r["kind"] for r in records}
    assert {"throughput", "ablation"} <= kinds, kinds  # the study's ablation ran: each device at its best
    settings = {r.get("setting") for r in records if r["kind"] == "ablation"}
    assert len(settings) >= 3, settings
    run = project.runs("diabetes", "tags.stage = 'train'")[0]
    assert run.data.tags.get("study") == "gpu"
    assert unsized <= set(gpu)  # the study's other keys (ablation list...) ran as written


def test_a_trial_stops_at_the_tuning_timeout(tmp_path):
    project = make_project(tmp_path / "project", ["diabetes"])
    project.update("tune.timeout_s", 2)
    project.update("tune.n_trials", 3)
    project.update("diabetes.train.epochs", 100000)  # hours of epochs without the deadline
    project.run(sys.executable, "-m", "dvc", "repro", "prepare@diabetes")
    t0 = time.monotonic()
    proc = project.stage("tune")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    trials = project.runs("diabetes", "tags.stage = 'trial'")
    assert len(trials) == 1 and "tune.timeout_s (2.0 s) reached at epoch" in trials[0].data.tags["pruned"]


def test_auto_strategy_tunes_populations_where_the_model_stacks_on_any_device():
    cfg = load_config("params.yaml")
    cpu, cuda = Device("cpu"), Device("cuda", 0, "H200")
    for name in available():
        params, wl = cfg.params(name), get_workload(name)
        assert params.tune.strategy == "auto"
        expected = "population" if name in {"diabetes", "quantum"} else "sequential"
        assert strategy_for(wl, params, Runtime(cpu, "torch", "fp32", False, 0)) == expected, name
        assert strategy_for(wl, params, Runtime(cuda, "torch", "fp32", False, 0)) == expected, name
        assert strategy_for(wl, params, Runtime(cuda, "tensorflow", "fp32", False, 0)) == "sequential"
    trainable = with_overrides(cfg.params("quantum"), {"model.quanv.mode": "trainable"})  # circuits learn: no stack
    assert strategy_for(get_workload("quantum"), trainable, Runtime(cpu, "torch", "fp32", False, 0)) == "sequential"
