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
