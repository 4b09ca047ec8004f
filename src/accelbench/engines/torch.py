"""PyTorch engine: data lives on the device for the whole run; one host sync per epoch."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import trange

from ..config import TrainParams
from ..devices import Runtime
from ..errors import TrainingError
from ..io import Prepared
from ..tasks import Task
from ..timing import Stopwatch
from . import FitResult, OnEpoch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EVAL_BATCH = 4096  # a workload with large samples sets meta['eval_batch_size']


def setup(runtime: Runtime) -> None:
    if runtime.cpu_threads:
        torch.set_num_threads(runtime.cpu_threads)
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device.index)
        torch.backends.cudnn.benchmark = True


def threads() -> int:
    return torch.get_num_threads()


def _autocast(runtime: Runtime) -> contextlib.AbstractContextManager:
    if runtime.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(runtime.device.type, dtype=_DTYPES[runtime.precision])


def _sync(runtime: Runtime):
    if runtime.device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _to_device(arrays: dict[str, np.ndarray], task: Task, device: str) -> dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    out["y"] = out["y"].long() if task.kind == "multiclass" else out["y"].float()
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def _loss(task: Task):
    if task.kind == "binary":
        return lambda out, y: nn.functional.binary_cross_entropy_with_logits(out.reshape(-1).float(), y)
    if task.kind == "multiclass":
        return lambda out, y: nn.functional.cross_entropy(out.float(), y)
    return lambda out, y: nn.functional.mse_loss(out.float(), y.view_as(out))


def fit(
    model: nn.Module,
    task: Task,
    prepared: Prepared,
    train: TrainParams,
    runtime: Runtime,
    on_epoch: OnEpoch | None = None,
    desc: str = "train",
) -> FitResult:
    dev = runtime.device.torch
    inputs = prepared.meta.get("inputs", ["x"])
    sw = Stopwatch(_sync(runtime))
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_fit = sw.start()
    tr = _to_device(prepared.splits["train"], task, dev)
    va = _to_device(prepared.splits["val"], task, dev)
    to_device_s = sw.stop("to_device", t_fit)
    model.to(dev)
    step_model = torch.compile(model) if runtime.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    loss_fn = _loss(task)
    gen = torch.Generator(device=dev).manual_seed(runtime.seed)
    n, bs = len(tr["y"]), train.batch_size
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = FitResult(n_train=n, to_device_s=to_device_s, n_params=n_params)
    y_val = prepared.splits["val"]["y"]
    for epoch in trange(train.epochs, desc=desc, unit="epoch", leave=False, disable=None):
        model.train()
        t0 = sw.start()
        perm = torch.randperm(n, device=dev, generator=gen)
        loss_sum = torch.zeros((), device=dev)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            with _autocast(runtime):
                loss = loss_fn(step_model(*(tr[k][idx] for k in inputs)), tr["y"][idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach() * len(idx)  # stays on the device: no sync per step
        result.epoch_s.append(sw.stop("epoch", t0))
        train_loss = (loss_sum / n).item()  # the one host sync of the epoch
        if not math.isfinite(train_loss):
            raise TrainingError(
                f"training loss became {train_loss} at epoch {epoch + 1} "
                f"(lr={train.lr}, batch_size={bs}, precision={runtime.precision}); lower the learning rate"
            )
        logits = _predict(step_model, va, inputs, runtime, prepared.meta.get("eval_batch_size", EVAL_BATCH))
        row = {"train/loss": train_loss, **task.metrics(y_val, logits, "val")}
        row["time/this_epoch_s"] = result.epoch_s[-1]
        result.history.append(row)
        if on_epoch:
            on_epoch(epoch, row)
    result.fit_s = sw.stop("fit", t_fit)
    if runtime.device.type == "cuda":
        result.peak_gpu_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    return result


def _predict(
    model: nn.Module, arrays: dict[str, torch.Tensor], inputs: list[str], runtime: Runtime, batch: int = EVAL_BATCH
) -> np.ndarray:
    model.eval()
    n = len(arrays[inputs[0]])
    outs = []
    with torch.inference_mode(), _autocast(runtime):
        for i in range(0, n, batch):
            outs.append(model(*(arrays[k][i : i + batch] for k in inputs)).float())
    return torch.cat(outs).cpu().numpy()


def predict(
    model: nn.Module, task: Task, arrays: dict[str, np.ndarray], inputs: list[str], runtime: Runtime, batch: int = EVAL_BATCH
) -> np.ndarray:
    model.to(runtime.device.torch)
    return _predict(model, _to_device(arrays, task, runtime.device.torch), inputs, runtime, batch)


def save(model: nn.Module, folder: Path) -> Path:
    path = Path(folder) / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def load(folder: Path, model: nn.Module, runtime: Runtime) -> nn.Module:
    state: dict[str, Any] = torch.load(Path(folder) / "model.pt", map_location=runtime.device.torch, weights_only=True)
    model.load_state_dict(state)
    return model.to(runtime.device.torch)
