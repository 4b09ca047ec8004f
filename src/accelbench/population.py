"""Population tuning: many small models of one shape trained at once as one stacked, vmapped model.

A GPU loses to the CPU on one tiny MLP because the MLP cannot fill it; a population of hundreds can.
Trials that share every shape-changing hyperparameter (hidden sizes, batch size, epochs) are stacked with
`torch.func.stack_module_state`; learning rate, weight decay and dropout vary per model. AdamW is batched
here with the same arithmetic as `torch.optim.AdamW`, so a population member follows the same trajectory
as the same trial trained alone (given the same initialisation, batch order and dropout masks).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import mlflow
import numpy as np
import optuna
import torch
from mlflow.entities import Metric, Param
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from .config import with_overrides
from .devices import Runtime, seed_everything
from .engines.torch import GraphedSteps, _side_stream, _to_device, loss_function  # the single model's splits and loss
from .errors import ConfigError
from .io import Prepared
from .models.layers import RateDropout  # the rate stacked populations vary per member
from .study import Study, suggest, trial_name
from .tasks import Task
from .timing import Stopwatch
from .tracking import base_tags, use_experiment

# Hyperparameters that may differ between members of one stacked population.
PER_MEMBER = ("train.lr", "train.weight_decay", "model.dropout")
# Dropout layers whose rate is a Python float: a stacked population would run every member at the first's rate.
FIXED_RATE_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass
class PopulationResult:
    """Per member (index = position in the population): the epoch curves of the objective and losses."""

    curves: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (epochs, N)
    alive: torch.Tensor | None = None  # (N,) bool: False once pruned
    fit_s: float = 0.0
    model_steps: int = 0
    cuda_graphs: bool = False  # each epoch replayed as one captured CUDA graph


def batched_auc(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ROC AUC of each row of `scores` (N, n) against binary `y` (n,), on the device (Mann-Whitney U)."""
    ordered = scores.sort(dim=1).values
    # tied scores share their average rank, as sklearn's roc_auc_score counts them
    below = torch.searchsorted(ordered, scores.contiguous(), right=False)
    upto = torch.searchsorted(ordered, scores.contiguous(), right=True)
    ranks = (below + upto + 1).to(torch.float64) / 2
    pos = y.to(torch.float64)  # a mask by multiplication: boolean indexing would sync with the host
    n_pos, n_neg = pos.sum(), (1 - pos).sum()
    u = (ranks * pos).sum(dim=1) - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).float()


@dataclass
class Population:
    """Models of one architecture trained as one, each with its own learning rate and weight decay and, when
    `dropout` is given, its own RateDropout rate (`models` may then be one model N times)."""

    models: list[nn.Module]
    lr: list[float]
    weight_decay: list[float]
    dropout: list[float] | None = None


def fit_population(
    population: Population,
    task: Task,
    prepared: Prepared,
    epochs: int,
    batch_size: int,
    runtime: Runtime,
    on_epoch: Callable[[int, dict[str, torch.Tensor], torch.Tensor], torch.Tensor] | None = None,
) -> PopulationResult:
    """Train `population` as one stacked model. `on_epoch(epoch, metrics, alive) -> alive` sees (N,) tensors
    (train/loss, val/loss, val scores) and may prune members; pruned members stop moving."""
    with _cpu_threads(runtime):
        return _fit_population(population, task, prepared, epochs, batch_size, runtime, on_epoch)


@contextlib.contextmanager
def _cpu_threads(runtime: Runtime):
    """On the CPU, with `cpu_threads` unset, a population steps in one intra-op thread. Its ops are small
    (a few hundred KB) yet above PyTorch's parallel grain, so each opens an OpenMP region that costs more
    than it saves, and stalls whenever another process holds one of its cores. An explicit `cpu_threads`
    is obeyed."""
    if runtime.device.type != "cpu" or runtime.cpu_threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_population(population, task, prepared, epochs, batch_size, runtime, on_epoch) -> PopulationResult:
    dev = runtime.device.torch
    sw = Stopwatch(torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None))
    tr = _to_device(prepared.splits["train"], task, dev)
    va = _to_device(prepared.splits["val"], task, dev)
    stacked = _StackedSteps(population, task, tr, va, prepared.meta.get("inputs", ["x"]), batch_size, dev)
    # On a GPU a step of small models is launch-bound: after one eager epoch, the whole epoch (steps and
    # validation) is captured as one CUDA graph and replayed, as cuda_graphs does for one model.
    graphs = runtime.cuda_graphs and runtime.device.type == "cuda"
    graphed: GraphedSteps | None = None
    gen = torch.Generator(device=dev).manual_seed(runtime.seed)
    n_models, n = len(population.models), len(tr["y"])
    alive = torch.ones(n_models, dtype=torch.bool, device=dev)
    steps_per_epoch, alive_count = -(-n // batch_size), n_models
    curves: dict[str, list[torch.Tensor]] = {}
    result = PopulationResult()
    t0 = sw.start()
    for epoch in range(epochs):
        perm = torch.randperm(n, device=dev, generator=gen)  # the batch order a single trial would see
        if graphed:
            metrics = {k: v.clone() for k, v in graphed(perm).items()}  # the next replay overwrites them
        else:
            with _side_stream(graphs):
                metrics = stacked.epoch(perm)
            if graphs:
                graphed = GraphedSteps(stacked.epoch, n, dev)
        for k, v in metrics.items():
            curves.setdefault(k, []).append(v)
        result.model_steps += alive_count * steps_per_epoch
        if on_epoch:
            now = on_epoch(epoch, metrics, alive)
            if now is not alive:  # a report: pruned members stop moving
                alive, alive_count = now, int(now.sum())
                stacked.keep_moving(alive)
    result.fit_s = sw.stop("fit", t0)
    result.curves = {k: torch.stack(v) for k, v in curves.items()}
    result.alive = alive
    result.cuda_graphs = graphs
    return result


class _StackedSteps:
    """The population as one model vmapped over its members' stacked parameters. `epoch(order)` trains every
    member on the batches of the index order `order`, then scores each on the validation split: all on the
    device, no host sync, so that a CUDA graph can capture it whole."""

    def __init__(self, population: Population, task: Task, tr: dict[str, torch.Tensor], va: dict[str, torch.Tensor],
                 inputs: list[str], batch_size: int, dev: str) -> None:  # fmt: skip
        self.task, self.tr, self.va, self.inputs, self.batch_size = task, tr, va, inputs, batch_size
        self.flat, self.params, self.buffers = _stacked(population.models, population.dropout, dev)
        self.base = copy.deepcopy(population.models[0]).to("meta")
        self.loss_fn = loss_function(task)  # the single-model engine's loss: same arithmetic, same targets
        shared = (None,) * (1 + len(inputs))  # batch and targets are the same for every member
        self.step_fn = vmap(grad_and_value(self._member_loss), in_dims=(0, 0, *shared), randomness="different")
        self.forward = vmap(self._member_forward, in_dims=(0, 0, *shared[1:]))
        self.lr = torch.tensor(population.lr, device=dev, dtype=torch.float32)
        self.wd = torch.tensor(population.weight_decay, device=dev, dtype=torch.float32)
        self.lr_alive = self.lr.clone()  # read by every step; a pruned member's lr is 0 from then on
        self.adam = _BatchedAdamW(self.flat)

    def _member_forward(self, p, b, *x):
        return functional_call(self.base, (p, b), x)

    def _member_loss(self, p, b, y, *x):
        return self.loss_fn(self._member_forward(p, b, *x), y)

    def epoch(self, order: torch.Tensor) -> dict[str, torch.Tensor]:
        tr, n, n_models, bs = self.tr, len(self.tr["y"]), len(self.lr), self.batch_size
        self.base.train()
        loss_sum = torch.zeros(n_models, device=self.lr.device)
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            g, loss = self.step_fn(self.params, self.buffers, tr["y"][idx], *(tr[k][idx] for k in self.inputs))
            self.adam.step(self.flat, torch.cat([g[k].reshape(n_models, -1) for k in self.params], dim=1), self.lr_alive, self.wd)
            loss_sum += loss.detach() * len(idx)
        self.base.eval()
        with torch.no_grad():
            logits = self.forward(self.params, self.buffers, *(self.va[k] for k in self.inputs))
            return {"train/loss": loss_sum / n, **_val_metrics(self.task, logits, self.va["y"], self.loss_fn)}

    def keep_moving(self, alive: torch.Tensor) -> None:
        """Only the `alive` members take steps from now on (the others' learning rate becomes 0)."""
        self.lr_alive.copy_(self.lr * alive)


def _stacked(models: list[nn.Module], dropout: list[float] | None, dev: str):
    """Every member's parameters as one row of a (members, parameters) tensor, and per-name views into it:
    the optimiser updates the one flat tensor in a handful of kernels instead of a handful per parameter.
    Stacked where the models are, then moved in one copy per tensor (not one per member and tensor)."""
    params, buffers = stack_module_state(models)
    if dropout is not None:
        rates = torch.tensor(dropout, dtype=torch.float32)
        buffers.update({f"{name}.p": rates for name, m in models[0].named_modules() if isinstance(m, RateDropout)})
    buffers = {k: v.to(dev) for k, v in buffers.items()}
    flat = torch.cat([p.detach().reshape(len(models), -1) for p in params.values()], dim=1).to(dev)
    views, start = {}, 0
    for k, p in params.items():
        size = p[0].numel()
        views[k] = flat[:, start : start + size].view(p.shape)
        start += size
    return flat, views, buffers


class _BatchedAdamW:
    """torch.optim.AdamW's update on (members, parameters), each member with its own lr and weight decay.
    The step count lives on the device, so a replayed CUDA graph advances it (AdamW's capturable)."""

    def __init__(self, flat: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.m, self.v = torch.zeros_like(flat), torch.zeros_like(flat)
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps
        self.t = torch.zeros((), dtype=torch.float64, device=flat.device)  # float64: AdamW's Python-float corrections

    @torch.no_grad()
    def step(self, flat: torch.Tensor, grads: torch.Tensor, lr: torch.Tensor, wd: torch.Tensor) -> None:
        self.t += 1
        bc1, bc2_sqrt = 1 - self.beta1**self.t, (1 - self.beta2**self.t).sqrt()
        flat.mul_(1 - (lr * wd)[:, None])
        self.m.lerp_(grads, 1 - self.beta1)
        self.v.mul_(self.beta2).addcmul_(grads, grads, value=1 - self.beta2)
        denom = (self.v.sqrt() / bc2_sqrt).add_(self.eps)
        flat.sub_((lr / bc1)[:, None] * self.m / denom)


def _val_metrics(task: Task, logits: torch.Tensor, y: torch.Tensor, loss_fn) -> dict[str, torch.Tensor]:
    """Validation scores of every member at once, on the device: no host round trip per member."""
    out = {"val/loss": vmap(lambda o: loss_fn(o, y))(logits)}
    flat = logits.reshape(logits.shape[0], -1).float()
    if task.kind == "binary":
        out["val/roc_auc"] = batched_auc(flat, y)
        out["val/accuracy"] = ((flat > 0).float() == y).float().mean(dim=1)
    elif task.kind == "multiclass":
        out["val/accuracy"] = (logits.argmax(dim=-1) == y).float().mean(dim=1)
    return out


@dataclass
class TuneStats:
    """Where a population tuning run's time went (seconds), for the benchmark stage."""

    fit_s: float = 0.0  # training the populations, device synchronised
    log_s: float = 0.0  # writing the nested MLflow runs
    groups: int = 0  # stacked models trained


def optimize(s: Study, n_trials: int, parent_run_id: str) -> TuneStats:
    """Ask Optuna for up to `tune.population` trials at a time, train each shape group as one population,
    report intermediate values for pruning and tell every result."""
    where = f"params.yaml: {s.wl.name}.tune.strategy"
    if s.runtime.framework != "torch":
        raise ConfigError(f"{where}: population tuning needs framework torch")
    if s.wl.population_model(s.params, s.prepared, s.runtime) is None:
        raise ConfigError(f"{where}: workload '{s.wl.name}' has no model that stacks into a population; use sequential")
    stats = TuneStats()
    done = 0
    while done < n_trials:
        size = min(s.params.tune.population, n_trials - done)
        groups: dict[tuple, list] = {}
        for _ in range(size):  # each suggest scans the study's trials: asked one by one, it scans half as many
            trial = _ask(s.optuna)
            trial.set_user_attr("config_hash", s.config_hash)
            overrides = {k: suggest(trial, k, spec) for k, spec in s.params.search.items()}
            shape_key = tuple(sorted((k, str(v)) for k, v in overrides.items() if k not in PER_MEMBER))
            groups.setdefault(shape_key, []).append((trial, overrides))
        for members in groups.values():
            _train_group(s, members, parent_run_id, stats)
        done += size
    return stats


def _ask(study: optuna.Study) -> optuna.Trial:
    # The storage beats for trials run by Study.optimize (claims.py), and says so on every ask. A population's
    # trials need no beat: its missing trials are counted from the complete and pruned ones, so a killed
    # population's trials run again.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        return study.ask()


def _train_group(s: Study, members, parent_run_id: str, stats: TuneStats) -> None:
    # Members differ only in PER_MEMBER values: one model built from the seed is where each of them would start
    # alone; its RateDropout layers then take each member's model.dropout.
    params = with_overrides(s.params, members[0][1])
    build, inputs = s.wl.population_model(params, s.prepared, s.runtime)
    seed_everything(s.cfg.seed, "torch")
    model = build(params)
    if any(isinstance(m, FIXED_RATE_DROPOUT) for m in model.modules()):
        raise ConfigError(f"workload '{s.wl.name}': its population model uses nn.Dropout, whose rate cannot vary "
                          "per member; build it with models.layers.RateDropout")  # fmt: skip

    def per_member(key: str) -> list[float]:
        return [float(overrides.get(key, functools.reduce(getattr, key.split("."), params))) for _, overrides in members]

    train = params.train
    every = max(1, s.params.tune.report_every)
    pruned_at: dict[int, int] = {}

    def on_epoch(epoch: int, metrics: dict[str, torch.Tensor], alive: torch.Tensor) -> torch.Tensor:
        if (epoch + 1) % every and epoch + 1 != train.epochs:
            return alive
        values = metrics[s.task.objective].tolist()  # one host sync per report, not per member
        keep = alive.tolist()
        for i, (trial, _) in enumerate(members):
            if keep[i]:
                trial.report(values[i], epoch)
                if trial.should_prune():
                    keep[i], pruned_at[i] = False, epoch + 1
        return torch.tensor(keep, device=alive.device)

    population = Population([model] * len(members), per_member("train.lr"), per_member("train.weight_decay"),
                            per_member("model.dropout"))  # fmt: skip
    result = fit_population(population, s.task, inputs, train.epochs, train.batch_size, s.runtime, on_epoch)
    curves = {k: v.cpu().numpy() for k, v in result.curves.items()}
    finals = curves[s.task.objective][-1]
    for i, (trial, overrides) in enumerate(members):
        if i in pruned_at:
            s.optuna.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif not np.isfinite(finals[i]) or not np.isfinite(curves["train/loss"][-1, i]):
            s.optuna.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            s.optuna.tell(trial, float(finals[i]))
    t0 = time.perf_counter()
    _log_trials(s, members, curves, pruned_at, parent_run_id, result, every)
    stats.log_s += time.perf_counter() - t0
    stats.fit_s += result.fit_s
    stats.groups += 1


def _log_trials(s, members, curves, pruned_at, parent_run_id: str, result: PopulationResult, every: int) -> None:
    """One nested MLflow run per trial, written in bulk: a round trip per trial, not per metric. Its curves
    hold the epochs reported to Optuna (every `report_every` and the last): writing every epoch of a large
    study's trials costs many times the training."""
    client = mlflow.MlflowClient()
    experiment_id = use_experiment(s.wl.name)
    common = {**base_tags(s.wl.name, "trial", s.runtime.tags()), "mlflow.parentRunId": parent_run_id,
              "study": s.name, "variant": s.variant, "tune.strategy": "population",
              "population.size": str(len(members)), "population.fit_s": f"{result.fit_s:.3f}",
              "population.cuda_graphs": str(result.cuda_graphs).lower(), "population.curve_every": str(every)}  # fmt: skip
    now = int(time.time() * 1000)
    total = curves["train/loss"].shape[0]
    reported = [e for e in range(total) if (e + 1) % every == 0 or e + 1 == total]
    for i, (trial, overrides) in enumerate(members):
        epochs = [e for e in reported if e < pruned_at.get(i, total)]
        state = "PRUNED" if i in pruned_at else "COMPLETE"
        tags = {**common, "trial": str(trial.number), "optuna.state": state}
        run = client.create_run(experiment_id, start_time=now - int(1000 * result.fit_s),  # the population's training
                                run_name=trial_name(s, trial.number, "population-trial"), tags=tags)  # fmt: skip
        metrics = [Metric(k, float(v[e, i]), now, e) for k, v in curves.items() for e in epochs if np.isfinite(v[e, i])]
        params = [Param(k, str(v)) for k, v in overrides.items()]
        for j in range(0, max(len(metrics), 1), 1000):  # the store's batch limit; create_run named the run
            client.log_batch(run.info.run_id, metrics=metrics[j : j + 1000], params=params if j == 0 else [])
        client.set_terminated(run.info.run_id, "FINISHED", end_time=now)
