"""PyTorch engine: data lives on the device for the whole run; one host sync per epoch."""
from __future__ import annotations

import contextlib
import importlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import progress
from ..checkpoint import Checkpoint
from ..config import TrainParams
from ..devices import Runtime, UtilisationSampler
from ..errors import TrainingError
from ..io import Prepared, atomic_file
from ..tasks import Task
from ..timing import IntervalPlan, Stopwatch, calls_to_last, long_step_count
from . import BenchResult, BenchSpec, FitResult, OnEpoch, oom_message

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
    # Every torch.optim optimizer imports torch._dynamo (its constructor and each step), compiled or not. Here that
    # import is the stage's fixed cost, as stage_times reports it, not part of the first trial's or epoch's time.
    importlib.import_module("torch._dynamo")


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
    # a small model's graphed step waits on. But the fused kernel gives each 64k-element chunk of a tensor to
    # one thread block, so a large tensor (an embedding) is walked by a few SMs; compiled, inductor writes one
    # kernel that spreads every element over the GPU, so a compiled run compiles the step instead of fusing it.
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
    - its dynamic-shape kernels are slower than kernels compiled afresh for the one shape;
    - under CUDA graphs, in a process that had run other fits before (as tune runs its trials), its capture
      can fail ("operation failed due to a previous error during capture") where the same fit compiled for
      static shapes captures;
    and past its recompile limit dynamo falls back to eager without a word. The extra graph for the ragged
    last batch costs compile time in the first epoch only, not epoch time."""
    if not runtime.compile:
        return model
    torch.compiler.reset()
    return torch.compile(model, dynamic=False, mode=runtime.compile_mode)


@dataclass
class _Stepper:
    """What trains a placed model: the model the steps run (DDP-wrapped, compiled, as the runtime asks), its
    optimiser and loss scaler, and `step`, one optimiser step on a batch."""

    step_model: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]
    cuda_graphs: str  # graphs_state: on | off | n/a: <why the steps run eagerly>

    @property
    def graphs(self) -> bool:
        return self.cuda_graphs == "on"


def _stepper(model: nn.Module, task: Task, train: TrainParams, runtime: Runtime) -> _Stepper:
    """Place the model, wrap and compile it as the runtime asks, and build its optimiser step."""
    _place(model, runtime)
    step_model = _compiled(_data_parallel(model, runtime), runtime)
    cuda_graphs = graphs_state(runtime)
    opt = _optimizer(model, train, runtime, cuda_graphs == "on")
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    return _Stepper(step_model, opt, scaler, _make_step(step_model, opt, scaler, loss_function(task), runtime), cuda_graphs)


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
    stepper = _stepper(model, task, train, runtime)
    # DDP's forward may broadcast buffers (a collective): rank 0 alone validates on the bare module
    eval_model = model if runtime.process_group else stepper.step_model
    gen = torch.Generator(device=dev).manual_seed(runtime.seed)  # the same permutation on every rank
    bs = train.batch_size // runtime.world_size  # train.batch_size is the global batch
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = FitResult(n_train=len(tr["y"]), to_device_s=to_device_s, n_params=n_params, cuda_graphs=stepper.cuda_graphs)
    y_val = prepared.splits["val"]["y"]
    start = _resume(checkpoint, model, stepper.opt, stepper.scaler, gen, result, dev)
    train_epoch = _ShuffledEpochs(stepper.step, tr, inputs, bs, gen, stepper.graphs, runtime)
    for epoch in progress.track(range(start, train.epochs), train.epochs, desc, "epoch", initial=start):
        model.train()
        epoch_s, train_loss = train_epoch(sw)
        result.epoch_s.append(epoch_s)
        _check_finite(train_loss, epoch, train, bs, runtime)
        row = {"train/loss": train_loss}
        if runtime.is_main:  # the weights are the same on every rank: one validation is enough
            logits = _predict(eval_model, va, inputs, runtime, prepared.meta.get("eval_batch_size", EVAL_BATCH))
            row.update(task.metrics(y_val, logits, "val"))
        row["time/this_epoch_s"] = epoch_s
        result.history.append(row)
        if checkpoint and runtime.is_main and checkpoint.due(epoch + 1, train.epochs):
            _save(checkpoint, epoch + 1, model, stepper.opt, stepper.scaler, gen, result)
        if on_epoch:
            on_epoch(epoch, row)
    result.fit_s = sw.stop("fit", t_fit)
    result.data_epoch_s = _time_batches(sw, tr, [*inputs, "y"], bs, gen)
    if runtime.device.type == "cuda":
        result.peak_gpu_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    return result


class _ShuffledEpochs:
    """Each call trains one epoch over a fresh permutation of the training split (this rank's shard of it) and
    returns the epoch's seconds and mean loss. With CUDA graphs the first epoch runs eagerly, the warm-up
    before the capture, and each later one is one replay of the whole epoch, ragged last batch included."""

    def __init__(self, step, tr: dict[str, torch.Tensor], inputs: list[str], batch_size: int, gen: torch.Generator,
                 graphs: bool, runtime: Runtime) -> None:  # fmt: skip
        self.step, self.tr, self.inputs, self.batch_size, self.gen = step, tr, inputs, batch_size, gen
        self.graphs, self.runtime = graphs, runtime
        self.graphed: GraphedSteps | None = None

    def _run(self, order: torch.Tensor) -> torch.Tensor:
        loss_sum = torch.zeros((), device=self.runtime.device.torch)
        _run_order(self.step, self.tr, self.inputs, order, self.batch_size, loss_sum)
        return loss_sum

    def __call__(self, sw: Stopwatch) -> tuple[float, float]:
        dev, runtime = self.runtime.device.torch, self.runtime
        t0 = sw.start()
        perm = _shard(torch.randperm(len(self.tr["y"]), device=dev, generator=self.gen), runtime)
        if self.graphed:
            loss_sum = self.graphed(perm)
        else:
            with _side_stream(self.graphs):
                loss_sum = self._run(perm)
        epoch_s = sw.stop("epoch", t0)
        train_loss = (_all_ranks(loss_sum, runtime) / (len(perm) * runtime.world_size)).item()  # the one host sync
        if self.graphs and self.graphed is None:  # captured outside the epoch's clock; the fit's clock includes it
            self.graphed = GraphedSteps(self._run, len(perm), dev)
        return epoch_s, train_loss


def _check_finite(train_loss: float, epoch: int, train: TrainParams, batch_size: int, runtime: Runtime) -> None:
    if not math.isfinite(train_loss):
        raise TrainingError(
            f"training loss became {train_loss} at epoch {epoch + 1} "
            f"(lr={train.lr}, batch_size={batch_size}, precision={runtime.precision}); lower the learning rate"
        )


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


def bench(model: nn.Module, task: Task, prepared: Prepared, train: TrainParams, runtime: Runtime, spec: BenchSpec) -> BenchResult:
    """Time `spec.repeats` x `spec.steps` training steps after `spec.warmup` steps.

    `spec.batch_size` is the global batch: with a process group each rank draws its share and the step is DDP's.
    With cuda_graphs, the warm-up runs eagerly, then one repeat's steps are captured as one graph and each
    repeat is one replay. A timed repeat lasts at least `spec.min_repeat_s` (`_sized_repeat`); the result's
    `steps` is the steps a timed repeat ran.
    `spec.utilisation` samples the GPU over the last interval's timed repeats, and further untimed ones while it
    has too few readings, all before the interval's end hook hands the turn to the other device's process. Each
    interval after the first is re-warmed by one untimed step (one replay under CUDA graphs), its hooks run at
    its edges.
    """
    dev = runtime.device.torch
    sw = Stopwatch(_sync(runtime))
    t0 = sw.start()
    tr = _to_device(prepared.splits["train"], task, dev)
    to_device_s = sw.stop("to_device", t0)
    model.train()
    stepper = _stepper(model, task, train, runtime)
    gen = torch.Generator(device=dev).manual_seed(runtime.seed + runtime.rank)  # each rank its share of the batch
    per_rank = spec.batch_size // runtime.world_size
    drawn = _DrawnBatches(stepper.step, tr, prepared.meta.get("inputs", ["x"]), per_rank, spec.synthetic, gen)
    repeat, rewarm, warmup_s = _warm_up(drawn, spec, stepper.graphs, sw, runtime)
    timed, steps = _sized_repeat(repeat, drawn, stepper.graphs, sw, spec, runtime)
    plan = spec.plan()
    repeat_s, energy_j, util = _timed_intervals(plan, timed, rewarm, sw, spec.energy, spec.utilisation,
                                                lambda: (repeat(), sw.sync()))  # fmt: skip
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if runtime.device.type == "cuda" else None
    if runtime.process_group:  # the group's throughput is set by its slowest rank
        repeat_s = _all_ranks(torch.tensor(repeat_s, device=dev, dtype=torch.float64), runtime, "MAX").tolist()
    return BenchResult(per_rank * runtime.world_size, steps, repeat_s, warmup_s, to_device_s,
                       energy_j if spec.energy else None, peak, util, stepper.cuda_graphs, plan.interval_of())  # fmt: skip


class _DrawnBatches:
    """Training steps on batches drawn with replacement from the device-resident training split, so that any
    batch size works; `synthetic` steps on one batch gathered up front, over and over: the compute-only
    ceiling that the real loop is compared with."""

    def __init__(self, step, tr: dict[str, torch.Tensor], inputs: list[str], batch_size: int, synthetic: bool,
                 gen: torch.Generator) -> None:  # fmt: skip
        self.step, self.tr, self.inputs, self.batch_size, self.synthetic, self.gen = step, tr, inputs, batch_size, synthetic, gen
        fixed = self.draw(batch_size)  # drawn in the real loop too, so that both see the same draws after it
        self.fixed_batch = ([tr[k][fixed] for k in inputs], tr["y"][fixed])

    def draw(self, count: int) -> torch.Tensor:
        y = self.tr["y"]
        return torch.randint(0, len(y), (count,), device=y.device, generator=self.gen)

    def run(self, order: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=self.tr["y"].device)
        if self.synthetic:
            for _ in range(len(order) // self.batch_size):
                total += self.step(*self.fixed_batch)
        else:
            _run_order(self.step, self.tr, self.inputs, order, self.batch_size, total)
        return total

    def eager(self, steps: int) -> None:
        self.run(self.draw(steps * self.batch_size))


def _warm_up(drawn: _DrawnBatches, spec: BenchSpec, graphs: bool, sw: Stopwatch, runtime: Runtime):
    """The untimed warm-up steps, then with CUDA graphs one repeat's steps captured and replayed once.
    Returns one timed repeat, the re-warm before each later interval, and the warm-up's seconds."""
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device.torch)
    t0 = sw.start()
    with _side_stream(graphs):
        drawn.eager(max(spec.warmup, 1))  # compilation, cuDNN autotuning and allocator growth happen here
    repeat = lambda: drawn.eager(spec.steps)  # noqa: E731
    rewarm = lambda: drawn.eager(1)  # noqa: E731  (one step after the other device's turn)
    if graphs:
        graphed = GraphedSteps(drawn.run, spec.steps * drawn.batch_size, runtime.device.torch)
        repeat = rewarm = lambda: graphed(drawn.draw(spec.steps * drawn.batch_size))  # noqa: E731  (one replay re-warms)
        repeat()  # the first replay uploads the graph
    return repeat, rewarm, sw.stop("warmup", t0)


def _timed_intervals(plan: IntervalPlan, timed: Callable[[], Any], rewarm: Callable[[], Any], sw: Stopwatch, energy,
                     utilisation: UtilisationSampler | None,
                     untimed: Callable[[], Any]) -> tuple[list[float], list[float], list[float] | None]:  # fmt: skip
    """Each interval's repeats of `timed`, the interval's hooks at its edges. GPU utilisation over the last one:
    sampled from its start, with `untimed` repeats after the timed ones while the sampler has too few readings,
    and read before the end hook hands the turn to another device's process (the GPU idles meanwhile).
    Seconds and joules per repeat, and the utilisation readings (None without a sampler)."""
    repeat_s, energy_j, util = [], [], None
    for k, count in enumerate(plan.counts):
        last = k == len(plan.counts) - 1
        if k:  # caches, clocks and the allocator come back after the other device's turn
            rewarm()
            sw.sync()  # the re-warm is finished before the interval's readings begin
        if utilisation and last:
            utilisation.start()
        plan.begin()
        for _ in range(count):
            e0 = energy() if energy else None
            t0 = sw.start()
            timed()
            repeat_s.append(sw.stop("repeat", t0))
            if energy:
                energy_j.append(energy() - e0)
        if utilisation and last:
            while utilisation.wants_more():
                untimed()
            util = utilisation.stop()
        plan.end()
    return repeat_s, energy_j, util


def _sized_repeat(repeat: Callable[[], Any], drawn: _DrawnBatches, graphs: bool, sw: Stopwatch, spec: BenchSpec,
                  runtime: Runtime) -> tuple[Callable[[], Any], int]:  # fmt: skip
    """One timed repeat that lasts at least `spec.min_repeat_s`, and the steps it runs. Short steps: the repeat's
    `spec.steps` run again as often as one untimed repeat says it takes. Long steps (a large batch on a CPU): the
    single steps of `long_step_count`, sized by one step; a CUDA graph replays all its steps."""
    if spec.min_repeat_s <= 0:
        return repeat, spec.steps
    if not graphs and not runtime.process_group:  # every rank must run the same steps: its collectives pair up
        t0 = sw.start()
        drawn.eager(1)
        if steps := long_step_count(spec.min_repeat_s, spec.steps, sw.stop("calibrate", t0)):
            return (lambda: drawn.eager(steps)), steps
    t0 = sw.start()
    repeat()
    calls = calls_to_last(spec.min_repeat_s, sw.stop("calibrate", t0))
    if runtime.process_group:
        calls = int(_all_ranks(torch.tensor(calls, device=runtime.device.torch), runtime, "MAX").item())
    return (lambda: [repeat() for _ in range(calls)]), spec.steps * calls


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
