"""Run on a CUDA host (`make gpu-test`); skipped elsewhere. The real pipeline on the GPU, read back from MLflow."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import FIXTURES, make_project

pytestmark = pytest.mark.gpu


def test_diabetes_pipeline_on_cuda_records_the_gpu(tmp_path):
    import torch

    project = make_project(tmp_path / "project", ["diabetes"])
    project.update("diabetes.data.source", "path")
    project.update("diabetes.data.path", str(FIXTURES / "diabetes.csv"))
    project.update("device", "cuda")
    project.run(sys.executable, "-m", "dvc", "repro")
    train = project.runs(filter_string="tags.stage = 'train'")[0]
    tags, metrics = train.data.tags, train.data.metrics
    assert train.info.status == "FINISHED" and train.info.run_name == "train-cuda-torch"
    assert tags["device"] == "cuda" and tags["device_name"] == torch.cuda.get_device_name(0)
    assert tags["hw.cuda"] == str(torch.version.cuda) and tags["hw.cudnn"] == str(torch.backends.cudnn.version())
    assert metrics["mem/peak_gpu_mb"] > 0
    assert any(k.startswith("system/gpu_") for k in metrics), sorted(metrics)
    hw = json.loads((project.root / "results/hardware.json").read_text())
    assert hw["gpus"] and hw["gpus"][0]["name"] == torch.cuda.get_device_name(0)
    best = json.loads((project.root / "results/diabetes/best_params.json").read_text())["mlp"]
    assert best["study"] == "diabetes-cuda-torch"


@pytest.fixture(scope="module")
def gpu_prepared(tmp_path_factory):
    """diabetes and stock prepared by the real stages from the Kaggle-format fixtures."""
    project = make_project(tmp_path_factory.mktemp("graphs") / "project", ["diabetes", "stock"])
    project.update("diabetes.data.source", "path")
    project.update("diabetes.data.path", str(FIXTURES / "diabetes.csv"))
    project.update("stock.data.source", "path")
    project.update("stock.data.path", str(FIXTURES / "stock" / "Google_Stock_Price_Train.csv"))
    project.run(sys.executable, "-m", "dvc", "repro", "prepare@diabetes", "prepare@stock")
    return project


@pytest.mark.parametrize("workload, overrides", [
    ("diabetes", {"model.dropout": 0.0, "train.epochs": 6}),
    ("stock", {"model.dropout": 0.0, "model.layers": 2, "train.epochs": 3}),
])  # fmt: skip
def test_cuda_graphs_train_like_eager(gpu_prepared, workload, overrides):
    """The whole epoch replayed from one CUDA graph (ragged last batch included) ends where eager training
    does: same losses and validation metric, within float rounding (dropout off: graphs draw other numbers)."""
    from accelbench.config import load_config, with_overrides
    from accelbench.devices import Runtime, resolve, seed_everything
    from accelbench.engines import torch as engine
    from accelbench.io import load_prepared
    from accelbench.workloads import get_workload

    wl = get_workload(workload)
    params = with_overrides(load_config(gpu_prepared.root / "params.yaml").params(workload), overrides)
    prepared = load_prepared(gpu_prepared.root / "data" / "prepared" / workload)
    assert len(prepared.splits["train"]["y"]) % params.train.batch_size != 0  # a ragged last batch is covered
    results = {}
    for graphs in (False, True):
        runtime = Runtime(resolve("cuda", "torch"), "torch", cuda_graphs=graphs)
        engine.setup(runtime)
        seed_everything(42, "torch")
        model = wl.build_model("torch", params, prepared.meta)
        results[graphs] = engine.fit(model, wl.task(prepared.meta), prepared, params.train, runtime)
    eager, graphed = results[False], results[True]
    assert (eager.cuda_graphs, graphed.cuda_graphs) == ("off", "on")
    for row_e, row_g in zip(eager.history, graphed.history):
        assert row_g["train/loss"] == pytest.approx(row_e["train/loss"], rel=1e-4, abs=1e-6)
    metric = wl.task(prepared.meta).objective
    assert graphed.history[-1][metric] == pytest.approx(eager.history[-1][metric], rel=1e-3, abs=1e-5)
