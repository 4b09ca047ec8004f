"""PyTorch engine: data lives on the device for the whole run; one host sync per epoch."""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import progress
from ..checkpoint import Checkpoint
from ..config import TrainParams
from ..devices import Runtime
from ..errors import TrainingError
from ..io import Prepared, atomic_file
from ..tasks import Task
from ..timing import IntervalPlan, Stopwatch, calls_to_last
from . import BenchResult, FitResult, OnEpoch, oom_message

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EVAL_BATCH = 4096  # a workload with large samples sets meta['eval_batch_size']


def setup(runtime: Runtime) -> None:
    if runtime.cpu_threads:
        torch.set_num_threads(runtime.cpu_threads)
    if runtime.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device.index)
    # cuDNN autotuning picks kernels by timing: fast, but not reproducible run to run
    torch.backends.cudnn.benchmark = not runtime.deterministic
    torch.backends.cudnn.deterministic = runtime.deterministic
    # the call imports Inductor (seconds of a stage's start-up): made only where it changes the setting
    if torch.are_deterministic_algorithms_enabled() != runtime.deterministic or torch.is_deterministic_algorithms_warn_only_enabled():
        torch.use_deterministic_algorithms(runtime.deterministic, warn_only=False)


def determinism_flags() -> dict[str, str]:
    return {
        "torch.use_deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()),
        "cudnn.deterministic": str(torch.backends.cudnn.deterministic),
        "cudnn.benchmark": str(torch.backends.cudnn.benchmark),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", "unset"),
    }


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


def _place(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Move the model; with channels_last, 4-D weights go NHWC (tensor cores prefer it) and a model
    that wants its input so reads the layout off its weights."""
    model.to(runtime.device.torch)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _data_parallel(model: nn.Module, runtime: Runtime) -> nn.Module:
    """DistributedDataParallel around the placed model when a process group is up (torchrun); else the model."""
    if not runtime.process_group:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def _shard(perm: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """This rank's share of the epoch's permutation (the same on every rank: one seed), interleaved so that
    step i of all ranks together covers the single-process batch i. Padded by wrapping, like
    DistributedSampler, so that every rank takes as many steps (DDP's all-reduces must pair up)."""
    world = runtime.world_size
    if world == 1:
        return perm
    pad = (-len(perm)) % world
    if pad:
        perm = torch.cat([perm, perm[:pad]])
    return perm[runtime.rank :: world]


def _all_ranks(t: torch.Tensor, runtime: Runtime, op: str = "SUM") -> torch.Tensor:
    if runtime.process_group:
        import torch.distributed as dist

        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t


def _time_batches(sw: Stopwatch, arrays: dict[str, torch.Tensor], keys: list[str], bs: int, gen: torch.Generator) -> float:
    """One epoch of what the loop does to get its batches (shuffle, gather), without the model:
    the data side of the step time, timed apart so that it cannot hide inside the compute."""
    n = len(arrays["y"])
    t0 = sw.start()
    perm = torch.randperm(n, device=arrays["y"].device, generator=gen)
    for i in range(0, n, bs):
        idx = perm[i : i + bs]
        for k in keys:
            arrays[k][idx]
    return sw.stop("data", t0)


def _to_device(arrays: dict[str, np.ndarray], task: Task, device: str) -> dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    out["y"] = out["y"].long() if task.kind == "multiclass" else out["y"].float()
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def loss_function(task: Task):
    if task.kind == "binary":
        return lambda out, y: nn.functional.binary_cross_entropy_with_logits(out.reshape(-1).float(), y)
    if task.kind == "multiclass":
        return lambda out, y: nn.functional.cross_entropy(out.float(), y)
    return lambda out, y: nn.functional.mse_loss(out.float(), y.view_as(out))


def graph_blocker(runtime: Runtime) -> str | None:
    """Why the training steps cannot be captured as a CUDA graph here, or None when they can.
    Each reason makes cuda_graphs a recorded no-op (the steps run eagerly), never a silent one."""
    if runtime.device.type != "cuda":
        return "not a CUDA device"
    if runtime.precision == "fp16":
        return "fp16's GradScaler reads its overflow flag on the host every step"
    if runtime.process_group:
        return "DistributedDataParallel's gradient all-reduce runs from autograd hooks outside the captured stream"
    return None


def graphs_state(runtime: Runtime) -> str:
    """on | off | n/a: <reason>, for tags and records."""
    if not runtime.cuda_graphs:
        return "off"
    blocker = graph_blocker(runtime)
    return f"n/a: {blocker}" if blocker else "on"


def _optimizer(model: nn.Module, train: TrainParams, runtime: Runtime, graphed: bool) -> torch.optim.Optimizer:
    # capturable keeps AdamW's step count on the device, so that a replayed graph advances it. foreach (the
    # default) launches about ten kernels a step, each over all parameters; fused launches one, which is what
    # a small recurrent model's graphed step waits on (H100, rnn LSTM at b32: 0.290 -> 0.243 ms a step).
    # But the fused kernel gives each 64k-element chunk of a tensor to one thread block, so a large tensor is
    # walked by a few SMs; compiled, inductor writes one kernel that spreads every element over the GPU
    # (H100, graphed b32: sentiment, whose embedding is 98k elements, 0.220 -> 0.196 ms; rnn LSTM 0.194 both)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, capturable=graphed,
                            fused=(runtime.fused_optimizer and not runtime.compile) or None)  # fmt: skip
    if runtime.compile:
        opt.step = torch.compile(opt.step)
    return opt


def _compiled(model: nn.Module, runtime: Runtime) -> nn.Module:
    """torch.compile for static shapes, with dynamo's caches emptied first: each fit and each timed batch size
    compiles for its own shapes, and each shape a fit meets (the full batch, the epoch's ragged last one) gets
    its own graph during the first, eager epoch. By default dynamo recompiles for dynamic shapes on the second
    shape it sees:
    - its kernels are slower (H100, guava at 224 with every option on, after b32 and b256 in the same
      benchmark process: b1024 ran 83.1k img/s, and 105.2k compiled afresh);
    - under CUDA graphs, in a process that had run other fits before (as tune runs its trials), its capture
      failed in 3 of 3 runs (H100, guava at 224, b256 with a ragged batch of 164, every option on: "operation
      failed due to a previous error during capture"); compiled static, the same fit captured in 3 of 3;
    and past its recompile limit dynamo falls back to eager without a word. Epoch times were the same either
    way (H100, guava b256 compiled: 11-14 ms)."""
    if not runtime.compile:
        return model
    torch.compiler.reset()
    return torch.compile(model, dynamic=False, mode=runtime.compile_mode)


def _make_step(step_model, opt, scaler, loss_fn, runtime: Runtime):
    """One optimiser step on a batch; returns the batch's mean loss, still on the device."""

    def step(batch: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        with _autocast(runtime):
            loss = loss_fn(step_model(*batch), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    return step


def _run_order(step, arrays, inputs, order, bs: int, loss_sum: torch.Tensor) -> None:
    """Training steps over the sample indices `order`, `bs` at a time (the last batch may be short);
    each batch's summed loss is added to `loss_sum` on the device: no sync per step."""
    for i in range(0, len(order), bs):
        idx = order[i : i + bs]
        loss_sum += step([arrays[k][idx] for k in inputs], arrays["y"][idx]) * len(idx)


class GraphedSteps:
    """`run(order)`, training steps over an index vector of fixed length, captured once as one CUDA graph
    and replayed: one launch for the whole run instead of several per layer and step, and no Python
    between kernels (what small models wait on). A replay reads its indices from a static device buffer;
    the batch gather, forward, backward and optimiser step are all inside the graph. A replay overwrites
    the tensors `run` returned: the caller copies what it keeps."""

    def __init__(self, run: Callable[[torch.Tensor], Any], n: int, device: str) -> None:
        self.order = torch.zeros(n, dtype=torch.long, device=device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = run(self.order)

    def __call__(self, order: torch.Tensor) -> Any:
        self.order.copy_(order)
        self.graph.replay()
        return self.out


@contextlib.contextmanager
def _side_stream(active: bool):
    """Eager warm-up steps before a capture run on a side stream, as torch.cuda.graph asks."""
    if not active:
        yield
        return
    side, main = torch.cuda.Stream(), torch.cuda.current_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)


def fit(
    model: nn.Module,
    task: Task,
    prepared: Prepared,
    train: TrainParams,
    runtime: Runtime,
    on_epoch: OnEpoch | None = None,
    desc: str = "train",
    checkpoint: Checkpoint | None = None,
) -> FitResult:
    try:
        return _fit(model, task, prepared, train, runtime, on_epoch, desc, checkpoint)
    except torch.OutOfMemoryError as exc:
        raise TrainingError(oom_message(str(exc), train.batch_size, runtime)) from None


def _fit(model, task, prepared, train, runtime, on_epoch, desc, checkpoint) -> FitResult:
    dev = runtime.device.torch
    inputs = prepared.meta.get("inputs", ["x"])
    sw = Stopwatch(_sync(runtime))
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_fit = sw.start()
    tr = _to_device(prepared.splits["train"], task, dev)
    va = _to_device(prepared.splits["val"], task, dev)
    to_device_s = sw.stop("to_device", t_fit)
    _place(model, runtime)
    wrapped = _data_parallel(model, runtime)
    step_model = _compiled(wrapped, runtime)
    # DDP's forward may broadcast buffers (a collective): rank 0 alone validates on the bare module
    eval_model = model if runtime.process_group else step_model
    graphs_applied = graphs_state(runtime)
    graphs = graphs_applied == "on"
    opt = _optimizer(model, train, runtime, graphs)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    step = _make_step(step_model, opt, scaler, loss_function(task), runtime)
    gen = torch.Generator(device=dev).manual_seed(runtime.seed)  # the same permutation on every rank
    n, bs = len(tr["y"]), train.batch_size // runtime.world_size  # train.batch_size is the global batch
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = FitResult(n_train=n, to_device_s=to_device_s, n_params=n_params, cuda_graphs=graphs_applied)
    y_val = prepared.splits["val"]["y"]
    start = _resume(checkpoint, model, opt, scaler, gen, result, dev)

    def run(order: torch.Tensor) -> torch.Tensor:
        loss_sum = torch.zeros((), device=dev)
        _run_order(step, tr, inputs, order, bs, loss_sum)
        return loss_sum

    graphed: GraphedSteps | None = None
    for epoch in progress.track(range(start, train.epochs), train.epochs, desc, "epoch", initial=start):
        model.train()
        t0 = sw.start()
        perm = _shard(torch.randperm(n, device=dev, generator=gen), runtime)
        if graphed:  # the whole epoch, ragged last batch included, in one replay
            loss_sum = graphed(perm)
        else:
            with _side_stream(graphs):  # with graphs, the first epoch is the eager warm-up before capture
                loss_sum = run(perm)
        result.epoch_s.append(sw.stop("epoch", t0))
        train_loss = (_all_ranks(loss_sum, runtime) / (len(perm) * runtime.world_size)).item()  # the one host sync
        if graphs and graphed is None:  # captured outside the epoch's clock; the fit's clock includes it
            graphed = GraphedSteps(run, len(perm), dev)
        if not math.isfinite(train_loss):
            raise TrainingError(
                f"training loss became {train_loss} at epoch {epoch + 1} "
                f"(lr={train.lr}, batch_size={bs}, precision={runtime.precision}); lower the learning rate"
            )
        row = {"train/loss": train_loss}
        if runtime.is_main:  # the weights are the same on every rank: one validation is enough
            logits = _predict(eval_model, va, inputs, runtime, prepared.meta.get("eval_batch_size", EVAL_BATCH))
            row.update(task.metrics(y_val, logits, "val"))
        row["time/this_epoch_s"] = result.epoch_s[-1]
        result.history.append(row)
        if checkpoint and runtime.is_main and checkpoint.due(epoch + 1, train.epochs):
            _save(checkpoint, epoch + 1, model, opt, scaler, gen, result)
        if on_epoch:
            on_epoch(epoch, row)
    result.fit_s = sw.stop("fit", t_fit)
    result.data_epoch_s = _time_batches(sw, tr, [*inputs, "y"], bs, gen)
    if runtime.device.type == "cuda":
        result.peak_gpu_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    return result


def _ckpt_file(checkpoint: Checkpoint) -> Path:
    return checkpoint.path.with_suffix(".pt")


def _save(checkpoint: Checkpoint, epoch: int, model, opt, scaler, gen, result: FitResult) -> None:
    state = {
        "params_hash": checkpoint.params_hash,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "batch_rng": gen.get_state(),  # the next epoch's permutation
        "torch_rng": torch.get_rng_state(),  # dropout
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": result.history,
        "epoch_s": result.epoch_s,
    }
    with atomic_file(_ckpt_file(checkpoint)) as tmp:  # a kill mid-write leaves the previous checkpoint intact
        torch.save(state, tmp)


def _resume(checkpoint: Checkpoint | None, model, opt, scaler, gen, result: FitResult, dev: str) -> int:
    """Restore from a checkpoint written with the same params; return the epoch to continue from."""
    if checkpoint is None or not _ckpt_file(checkpoint).is_file():
        return 0
    state = torch.load(_ckpt_file(checkpoint), map_location="cpu", weights_only=True)
    if state["params_hash"] != checkpoint.params_hash:
        return 0  # written for other params: start fresh (it is overwritten at the first save)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    gen.set_state(state["batch_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    result.history, result.epoch_s = list(state["history"]), list(state["epoch_s"])
    result.resumed_from = state["epoch"]
    return state["epoch"]


def bench(
    model: nn.Module,
    task: Task,
    prepared: Prepared,
    train: TrainParams,
    runtime: Runtime,
    batch_size: int,
    steps: int,
    warmup: int,
    repeats: int,
    synthetic: bool = False,
    energy=None,
    utilisation=None,
    min_repeat_s: float = 0.0,
    intervals: IntervalPlan | None = None,
) -> BenchResult:
    """Time `repeats` x `steps` training steps after `warmup` steps.

    `batch_size` is the global batch: with a process group each rank draws its share and the step is DDP's.
    Batches are drawn with replacement from the device-resident training split, so any batch size works;
    `synthetic` reuses one pre-gathered batch: the compute-only ceiling that the real loop is compared with.
    With cuda_graphs, the warm-up runs eagerly, then one repeat's `steps` steps are captured as one graph
    and each repeat is one replay. A timed repeat runs its steps (or replays) again, as often as one untimed
    repeat says it takes to last `min_repeat_s`; the result's `steps` is the steps a timed repeat ran.
    `utilisation` (devices.UtilisationSampler) samples the GPU during the timed repeats, and during further
    untimed ones while its window is still too short to read (over the last interval only: the earlier ones
    are paused while the other device's process takes its turn). `intervals` splits the repeats into intervals,
    each after the first re-warmed by one untimed step (one replay under CUDA graphs), its hooks run at each interval's edges.
    """
    dev = runtime.device.torch
    inputs = prepared.meta.get("inputs", ["x"])
    sw = Stopwatch(_sync(runtime))
    t0 = sw.start()
    tr = _to_device(prepared.splits["train"], task, dev)
    to_device_s = sw.stop("to_device", t0)
    _place(model, runtime).train()
    wrapped = _data_parallel(model, runtime)
    step_model = _compiled(wrapped, runtime)
    graphs_applied = graphs_state(runtime)
    graphs = graphs_applied == "on"
    opt = _optimizer(model, train, runtime, graphs)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    step = _make_step(step_model, opt, scaler, loss_function(task), runtime)
    gen = torch.Generator(device=dev).manual_seed(runtime.seed + runtime.rank)  # each rank its share of the batch
    n = len(tr["y"])
    batch_size //= runtime.world_size

    def draw(count: int) -> torch.Tensor:
        return torch.randint(0, n, (count,), device=dev, generator=gen)

    fixed = draw(batch_size)
    fixed_batch = ([tr[k][fixed] for k in inputs], tr["y"][fixed])

    def run(order: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=dev)
        if synthetic:
            for _ in range(len(order) // batch_size):
                total += step(*fixed_batch)
        else:
            _run_order(step, tr, inputs, order, batch_size, total)
        return total

    def eager(count: int) -> None:
        run(draw(count * batch_size))

    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = sw.start()
    with _side_stream(graphs):
        eager(max(warmup, 1))  # compilation, cuDNN autotuning and allocator growth happen here
    repeat = lambda: eager(steps)  # noqa: E731
    if graphs:
        graphed = GraphedSteps(run, steps * batch_size, dev)
        repeat = lambda: graphed(draw(steps * batch_size))  # noqa: E731
        repeat()  # the first replay uploads the graph
    warmup_s = sw.stop("warmup", t0)
    calls = _calls_per_repeat(repeat, sw, min_repeat_s, runtime)
    plan = intervals or IntervalPlan([repeats])
    rewarm = repeat if graphs else (lambda: eager(1))  # one step (one replay) after the other device's turn
    repeat_s, energy_j = _timed_intervals(plan, lambda: [repeat() for _ in range(calls)], rewarm, sw, energy, utilisation)
    while utilisation and utilisation.wants_more():
        repeat()
        _sync(runtime)()
    util = utilisation.stop() if utilisation else None
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if runtime.device.type == "cuda" else None
    if runtime.process_group:  # the group's throughput is set by its slowest rank
        repeat_s = _all_ranks(torch.tensor(repeat_s, device=dev, dtype=torch.float64), runtime, "MAX").tolist()
    return BenchResult(batch_size * runtime.world_size, steps * calls, repeat_s, warmup_s, to_device_s,
                       energy_j if energy else None, peak, util, graphs_applied, plan.interval_of())  # fmt: skip


def _timed_intervals(plan: IntervalPlan, timed: Callable[[], Any], rewarm: Callable[[], Any], sw: Stopwatch, energy,
                     utilisation) -> tuple[list[float], list[float]]:  # fmt: skip
    """Each interval's repeats of `timed`, the interval's hooks at its edges; GPU utilisation over the last one
    (the earlier ones are paused while another device's process takes its turn). Seconds and joules per repeat."""
    repeat_s, energy_j = [], []
    for k, count in enumerate(plan.counts):
        if k:  # caches, clocks and the allocator come back after the other device's turn
            rewarm()
            sw.sync()  # the re-warm is finished before the interval's readings begin
        if utilisation and k == len(plan.counts) - 1:
            utilisation.start()
        plan.begin()
        for _ in range(count):
            e0 = energy() if energy else None
            t0 = sw.start()
            timed()
            repeat_s.append(sw.stop("repeat", t0))
            if energy:
                energy_j.append(energy() - e0)
        plan.end()
    return repeat_s, energy_j


def _calls_per_repeat(repeat: Callable[[], Any], sw: Stopwatch, min_repeat_s: float, runtime: Runtime) -> int:
    if min_repeat_s <= 0:
        return 1
    t0 = sw.start()
    repeat()
    calls = calls_to_last(min_repeat_s, sw.stop("calibrate", t0))
    if runtime.process_group:  # every rank must run the same steps: its collectives pair up
        calls = int(_all_ranks(torch.tensor(calls, device=runtime.device.torch), runtime, "MAX").item())
    return calls


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
    _place(model, runtime)
    return _predict(model, _to_device(arrays, task, runtime.device.torch), inputs, runtime, batch)


def save(model: nn.Module, folder: Path) -> Path:
    path = Path(folder) / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def load(folder: Path, model: nn.Module, runtime: Runtime) -> nn.Module:
    state: dict[str, Any] = torch.load(Path(folder) / "model.pt", map_location=runtime.device.torch, weights_only=True)
    model.load_state_dict(state)
    return _place(model, runtime)
