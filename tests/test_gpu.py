"""Run on a CUDA host (`make gpu-test`); skipped elsewhere. The real pipeline on the GPU, read back from MLflow."""
from __future__ import annotations

import json
import re
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


def test_out_of_memory_fails_its_tuning_trial_and_the_study_goes_on(tmp_path):
    """guava at 512 px with one 2,048-channel block saves 1.36 GB a training image for the backward pass (the
    conv's, batch norm's and pooling's outputs at 256 x 256 x 2,048 in fp32, pooling's indices; summed with
    saved_tensors_hooks). A batch sized to half again the GPU's memory asks for more than that GPU has, a batch
    of 2 does not: a fixed batch would fit the next, larger GPU."""
    import math

    import optuna
    import torch

    big = math.ceil(1.5 * torch.cuda.get_device_properties(0).total_memory / 1.3e9)
    project = make_project(tmp_path / "project", ["guava"])
    project.update("device", "cuda")
    project.update("guava.data.count", math.ceil(big / 0.7) + 6)  # 70% of the images train
    project.update("guava.prepare.image_size", 512)
    project.update("guava.model.channels", [2048])
    project.update("guava.train.epochs", 1)
    project.update("guava.search", {"train.batch_size": {"choices": [2, big]}})
    project.update("tune.n_trials", 4)
    project.update("tune.prune_warmup_epochs", 100)
    project.run(sys.executable, "-m", "dvc", "repro", "tune@guava")
    best = json.loads((project.root / "results/guava/best_params.json").read_text())["cnn"]
    study = optuna.load_study(study_name="guava-cuda-torch", storage=f"sqlite:///{project.root}/mlruns/optuna.db")
    assert len(study.trials) == 4  # as asked: the failure did not stop the study
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert failed and complete, [(t.params, t.state) for t in study.trials]
    assert all(t.params["train.batch_size"] == big for t in failed)
    for t in failed:
        reason = t.user_attrs["fail_reason"]
        assert reason.startswith("out of memory on ") and f"batch_size={big}" in reason, reason
        assert re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", reason), reason  # the memory asked for
    assert best["trials"]["fail"] == len(failed) and best["params"]["train.batch_size"] == 2
    runs = {int(r.data.tags["trial"]): r for r in project.runs("guava", "tags.stage = 'trial'")}
    for t in failed:
        assert runs[t.number].info.status == "FAILED"
        assert runs[t.number].data.tags["failure_reason"] == t.user_attrs["fail_reason"]


def test_deterministic_flags_are_set_and_recorded_on_cuda(tmp_path):
    project = make_project(tmp_path / "project", ["diabetes"])
    project.update("diabetes.data.source", "path")
    project.update("diabetes.data.path", str(FIXTURES / "diabetes.csv"))
    project.update("device", "cuda")
    project.update("deterministic", True)
    project.run(sys.executable, "-m", "dvc", "repro", "train@diabetes")
    tags = project.runs(filter_string="tags.stage = 'train'")[0].data.tags
    assert tags["deterministic"] == "true" and tags["device"] == "cuda"
    assert tags["torch.use_deterministic_algorithms"] == "True"
    assert tags["cudnn.deterministic"] == "True" and tags["cudnn.benchmark"] == "False"
    assert tags["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    first = json.loads((project.root / "results/diabetes/train.json").read_text())["mlp"]
    project.run(sys.executable, "-m", "dvc", "repro", "--force", "train@diabetes")
    second = json.loads((project.root / "results/diabetes/train.json").read_text())["mlp"]
    assert {k: v for k, v in first.items() if k.startswith(("train/", "val/"))} == {
        k: v for k, v in second.items() if k.startswith(("train/", "val/"))
    }  # the same seed on the GPU: the same numbers


@pytest.fixture(scope="module")
def gpu_prepared(tmp_path_factory):
    """diabetes, stock and sentiment prepared by the real stages from the Kaggle-format fixtures."""
    project = make_project(tmp_path_factory.mktemp("graphs") / "project", ["diabetes", "stock", "sentiment"])
    project.update("diabetes.data.source", "path")
    project.update("diabetes.data.path", str(FIXTURES / "diabetes.csv"))
    project.update("stock.data.source", "path")
    project.update("stock.data.path", str(FIXTURES / "stock" / "Google_Stock_Price_Train.csv"))
    project.update("sentiment.data.source", "path")
    project.update("sentiment.data.path", str(FIXTURES / "sentiment" / "twitter_entity.csv"))
    project.run(sys.executable, "-m", "dvc", "repro", "prepare@diabetes", "prepare@stock", "prepare@sentiment")
    return project


@pytest.mark.parametrize("workload, overrides", [
    ("diabetes", {"model.dropout": 0.0, "train.epochs": 6}),
    ("stock", {"model.dropout": 0.0, "model.layers": 2, "train.epochs": 3}),
    ("sentiment", {"model.dropout": 0.0, "train.epochs": 2, "train.batch_size": 48}),
])  # fmt: skip
def test_cuda_graphs_train_like_eager(gpu_prepared, workload, overrides):
    """The whole epoch replayed from one CUDA graph (ragged last batch included) ends where eager training
    does: same losses and validation metric, within float rounding (dropout off: graphs draw other numbers)."""
    from accelbench.config import with_overrides
    from accelbench.project import load_config
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
        runtime = Runtime(resolve("cuda", "torch"), "torch", cuda_graphs=graphs, fused_optimizer=graphs)  # capturable + fused
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


def test_population_replayed_as_cuda_graphs_trains_like_eager(gpu_prepared):
    """A population's epochs replayed from one CUDA graph end where eager population training does (dropout
    off: graphs draw other random numbers), within float rounding."""
    import torch

    from accelbench.config import with_overrides
    from accelbench.project import load_config
    from accelbench.devices import Runtime, resolve, seed_everything
    from accelbench.io import load_prepared
    from accelbench.population import Population, fit_population
    from accelbench.workloads import get_workload

    wl = get_workload("diabetes")
    params = with_overrides(load_config(gpu_prepared.root / "params.yaml").params("diabetes"), {"model.dropout": 0.0})
    prepared = load_prepared(gpu_prepared.root / "data" / "prepared" / "diabetes")
    task = wl.task(prepared.meta)
    lrs, wds = [1e-3, 3e-3, 1e-2, 2e-2], [0.0, 0.01, 0.001, 0.0]
    curves = {}
    for name, graphs in {"eager": False, "graphs": True}.items():
        runtime = Runtime(resolve("cuda", "torch"), "torch", seed=42, cuda_graphs=graphs)
        build, inputs = wl.population_model(params, prepared, runtime)
        models = []
        for _ in lrs:
            seed_everything(42, "torch")
            models.append(build(params))
        result = fit_population(Population(models, lrs, wds), task, inputs, 5, 32, runtime)
        assert result.cuda_graphs == (name == "graphs")
        curves[name] = {k: v.cpu() for k, v in result.curves.items()}
    for k in ("train/loss", "val/loss", "val/roc_auc"):
        torch.testing.assert_close(curves["graphs"][k], curves["eager"][k], rtol=1e-5, atol=1e-6)


def test_gpu_utilisation_is_read_in_the_gpus_own_turn(gpu_prepared):
    """A graph-replayed MLP keeps the GPU busy. Its utilisation is read from NVML's samples before the interval's
    end hook, where the CPU's process would take its turn (here a 1.5 s sleep, the GPU idle meanwhile): the
    readings see the work, not the idle turn, whose samples would read 0%."""
    import time

    from accelbench.devices import Runtime, resolve, utilisation_sampler
    from accelbench.engines import BenchSpec
    from accelbench.engines import torch as engine
    from accelbench.io import load_prepared
    from accelbench.project import load_config
    from accelbench.timing import IntervalPlan
    from accelbench.workloads import get_workload

    wl = get_workload("diabetes")
    params = load_config(gpu_prepared.root / "params.yaml").params("diabetes")
    prepared = load_prepared(gpu_prepared.root / "data" / "prepared" / "diabetes")
    runtime = Runtime(resolve("cuda", "torch"), "torch", cuda_graphs=True)
    engine.setup(runtime)
    sampler = utilisation_sampler(runtime.device, min_s=0.5)
    assert sampler is not None, "NVML's utilisation samples are not readable on this GPU"
    turns = []
    other_turn = lambda: (turns.append(time.perf_counter()), time.sleep(1.5))  # noqa: E731
    spec = BenchSpec(256, 10, 3, 3, min_repeat_s=0.05, intervals=IntervalPlan([1, 1, 1], end=other_turn), utilisation=sampler)
    result = engine.bench(wl.build_model("torch", params, prepared.meta), wl.task(prepared.meta), prepared, params.train,
                          runtime, spec)  # fmt: skip
    assert len(turns) == 3 and result.cuda_graphs == "on"
    assert len(result.gpu_util_pct) >= 3
    assert min(result.gpu_util_pct) >= 50, result.gpu_util_pct


@pytest.mark.parametrize("space_to_depth", [True, False])
def test_guava_stem_on_cuda_matches_the_cpu(monkeypatch, space_to_depth):
    """On CUDA in channels_last the stem runs in 8-channel multiples (cuDNN's NHWC tensor-core kernels): over 2x2
    pixel blocks (12 channels padded to 16) or on RGB padded to 8. The logits and the stem's weight gradient are
    the CPU's, and the parameters keep their 3 input channels."""
    import copy
    import dataclasses

    import torch

    from accelbench.devices import Device, Runtime
    from accelbench.engines.torch import _place
    from accelbench.models import cnn_fast
    from accelbench.workloads import guava

    padded = []
    original = cnn_fast.pad_channels
    monkeypatch.setattr(cnn_fast, "pad_channels", lambda *a: padded.append(a[0].shape) or original(*a))
    meta = {"classes": list(guava.CLASSES), "channel_mean": [120.0] * 3, "channel_std": [60.0] * 3}
    params = guava.Params()
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, space_to_depth_stem=space_to_depth))
    torch.manual_seed(0)
    cpu = guava.WORKLOAD.build_model("torch", params, meta).eval()  # eval: no augmentation, BN's running stats
    gpu = _place(copy.deepcopy(cpu), Runtime(Device("cuda"), "torch", channels_last=True))
    x = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full fp32 convs, to compare with the CPU
    logits = {"cpu": cpu(x), "cuda": gpu(x.cuda())}
    for out in logits.values():
        out.square().sum().backward()
    # the CUDA forward alone: the CPU stem is a plain conv
    assert padded == [torch.Size([8, 12, 33, 33]) if space_to_depth else torch.Size([8, 3, 64, 64])]
    assert gpu.features[0].weight.shape == cpu.features[0].weight.shape == (8, 3, 3, 3)
    torch.testing.assert_close(logits["cuda"].cpu(), logits["cpu"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.features[0].weight.grad.cpu(), cpu.features[0].weight.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (37, 53)])
def test_guava_fused_augmentation_is_the_reference(monkeypatch, size):
    """The Triton kernel computes the torch reference (warp, jitter, normalisation) for the same draws: maps within
    the image and beyond its borders (reflected), parts switched off, fp32 and bf16 out; and a training forward on
    CUDA runs it unless `fused_augment` is off."""
    import dataclasses

    import torch

    from accelbench.models import augment, augment_cuda
    from accelbench.workloads import guava

    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, *size, 3), dtype=torch.uint8, device="cuda")
    mean, std = torch.tensor([110.0, 120.0, 90.0], device="cuda"), torch.tensor([50.0, 60.0, 55.0], device="cuda")
    theta, factors = augment.draw_augmentation(16, guava.Augment(), "cuda")
    for th, fa in [(theta, factors), (theta * 1.5, factors), (None, factors), (theta, None), (None, None)]:
        want = (augment.augment_reference(x.permute(0, 3, 1, 2).float(), th, fa) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        got = augment_cuda.augment_normalize(x, th, fa, mean, std, torch.float32)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
        half = augment_cuda.augment_normalize(x, th, fa, mean, std, torch.bfloat16)
        torch.testing.assert_close(half.float(), want, rtol=2**-8, atol=1e-3)

    calls = []
    monkeypatch.setattr(augment_cuda, "augment_normalize", lambda *a: calls.append(a[5]) or a[0].permute(0, 3, 1, 2).float())
    meta = {"classes": list(guava.CLASSES), "channel_mean": [120.0] * 3, "channel_std": [60.0] * 3}
    for fused in (True, False):
        params = guava.Params()
        params = dataclasses.replace(params, model=dataclasses.replace(params.model, fused_augment=fused))
        model = guava.WORKLOAD.build_model("torch", params, meta).cuda().train()
        with torch.autocast("cuda", torch.bfloat16):
            model(x)
    assert calls == [torch.bfloat16]


@pytest.mark.parametrize("size", [(64, 64), (37, 53)])
def test_guava_kernel_writes_the_stems_blocks(monkeypatch, size):
    """With the block stem in channels_last, the kernel writes the stem's input as `space_to_depth` and
    `pad_channels` lay it out (bit for bit, fp32 and bf16), and a training step through it is the step through
    the pass that lays it out: the same logits and stem gradient for the same draws."""
    import torch

    from accelbench.devices import Device, Runtime
    from accelbench.engines.torch import _place
    from accelbench.models import augment, augment_cuda, cnn_fast
    from accelbench.workloads import guava

    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, *size, 3), dtype=torch.uint8, device="cuda")
    mean, std = torch.tensor([110.0, 120.0, 90.0], device="cuda"), torch.tensor([50.0, 60.0, 55.0], device="cuda")
    theta, factors = augment.draw_augmentation(16, guava.Augment(), "cuda")
    weight = torch.zeros(8, 3, 3, 3, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        pixels = augment_cuda.augment_normalize(x, theta, factors, mean, std, dtype)
        blocks = augment_cuda.augment_normalize(x, theta, factors, mean, std, dtype, blocks=True)
        want = cnn_fast.pad_channels(*cnn_fast.space_to_depth(pixels, weight), 8)[0]
        assert blocks.shape == want.shape and blocks.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(blocks, want, rtol=0, atol=0)

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    meta = {"classes": list(guava.CLASSES), "channel_mean": [120.0] * 3, "channel_std": [60.0] * 3}
    model = _place(guava.WORKLOAD.build_model("torch", guava.Params(), meta), Runtime(Device("cuda"), "torch", channels_last=True))
    model.head[2].p = 0.0  # dropout off: the two steps draw nothing but the augmentation
    calls, original = [], augment_cuda.augment_normalize
    monkeypatch.setattr(augment_cuda, "augment_normalize", lambda *a: calls.append(a[6]) or original(*a))
    results = []
    for writes_blocks in (True, False):
        if not writes_blocks:
            monkeypatch.setattr(type(model), "writes_blocks", lambda self, x: False)
        model.zero_grad()
        torch.manual_seed(1)
        logits = model.train()(x)
        logits.square().sum().backward()
        results.append((logits.detach(), model.features[0].weight.grad.clone()))
    assert calls == [True, False]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)


def test_compiled_steps_capture_with_a_ragged_last_batch(tmp_path):
    """compile + CUDA graphs at batches whose epochs end ragged (guava at 224: 420 training images, last batches
    of 4 and 164), fit after fit in one process as the tune stage runs its trials: each shape is compiled for
    itself in the eager first epoch, and every capture holds. (The capture failure seen with dynamo's default
    dynamic-shape recompile came after a longer sequence of fits; this test passed under both on the H100.)"""
    import math

    from accelbench.config import with_overrides
    from accelbench.project import load_config
    from accelbench.devices import Runtime, resolve, seed_everything
    from accelbench.engines import torch as engine
    from accelbench.io import load_prepared
    from accelbench.workloads import get_workload

    project = make_project(tmp_path / "project", ["guava"])
    project.update("guava.prepare.image_size", 224)
    project.run(sys.executable, "-m", "dvc", "repro", "prepare@guava")
    wl = get_workload("guava")
    prepared = load_prepared(project.root / "data" / "prepared" / "guava")
    runtime = Runtime(resolve("cuda", "torch"), "torch", precision="bf16", channels_last=True, compile=True,
                      cuda_graphs=True, fused_optimizer=True)  # fmt: skip
    engine.setup(runtime)
    for batch in (32, 32, 256):
        params = with_overrides(load_config(project.root / "params.yaml").params("guava"), {"train.epochs": 3, "train.batch_size": batch})
        assert len(prepared.splits["train"]["y"]) % batch != 0
        seed_everything(42, "torch")
        result = engine.fit(wl.build_model("torch", params, prepared.meta), wl.task(prepared.meta), prepared, params.train, runtime)
        assert result.cuda_graphs == "on" and len(result.history) == 3
        assert all(math.isfinite(row["train/loss"]) for row in result.history)
