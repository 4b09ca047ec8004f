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


def test_guava_ddp_on_one_gpu_through_torchrun_and_its_scaling_point(tmp_path):
    """World size 1 through torchrun on cuda: NCCL group, DDP-wrapped model, rank 0 logs; then the 1-rank
    scaling point (`benchmark.scaling: [1]`) that a multi-GPU host's efficiency is measured against."""
    import socket

    import torch

    from accelbench.distributed import MULTICAST_OFF

    project = make_project(tmp_path / "project", ["guava"])
    project.env.update(MULTICAST_OFF)
    project.update("device", "cuda")
    project.run(sys.executable, "-m", "dvc", "repro", "prepare@guava")
    project.run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "stages/train.py", "guava")
    runs = project.runs("guava", "tags.stage = 'train'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    tags = runs[0].data.tags
    assert (tags["world_size"], tags["dist.backend"]) == ("1", "nccl")
    assert tags["dist.devices"] == f"0:{socket.gethostname()}/cuda:0 {torch.cuda.get_device_name(0)}"
    assert runs[0].data.metrics["val/accuracy"] > 0 and (project.root / "models/guava/cnn/model.pt").is_file()

    project.update("benchmark.devices", [])
    project.update("benchmark.scaling", [1])
    proc = project.stage("benchmark", "guava")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((project.root / "results/guava/benchmark.json").read_text())["records"]
    assert len(records) == 1 and records[0]["kind"] == "scaling" and records[0]["dist.backend"] == "nccl"
    assert records[0]["bench/scaling_efficiency"] == 1.0 and records[0]["bench/samples_per_s"] > 0
