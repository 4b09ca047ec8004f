"""The typed shape of params.yaml and the parser that checks it.

Global keys are fields of `Config`; every other top-level key must be a workload
name, whose section is parsed into that workload's own `Params` dataclass (project.load_config
looks them up). Unknown keys and wrong types are rejected with the dotted path of the offending key.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

Device = str  # cpu | cuda | cuda:N | auto, validated in devices.resolve
Framework = Literal["torch", "tensorflow"]
Precision = Literal["fp32", "bf16", "fp16"]
CompileMode = Literal["default", "max-autotune-no-cudagraphs"]  # torch.compile's modes that leave CUDA graphs to cuda_graphs


@dataclass(frozen=True)
class SearchSpec:
    """One Optuna dimension: a float/int range or a list of choices."""

    low: int | float | None = None  # ints on both ends make an integer range (suggest_int)
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Any] | None = None

    def __post_init__(self) -> None:
        has_range = self.low is not None and self.high is not None
        if (self.choices is None) == (not has_range):
            raise ValueError("give either low and high, or choices")
        if has_range and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")


@dataclass(frozen=True)
class TrainParams:
    """What every engine reads; a workload may subclass it to add fields."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass(frozen=True)
class DataParams:
    source: Literal["bundled", "path", "kaggle"] = "bundled"
    path: str | None = None


@dataclass(frozen=True)
class BenchTarget:
    """Time to target quality: `metric` (default: the task's objective) reaching `value`; null value = skip."""

    metric: str | None = None
    value: float | None = None
    # the GPU's goal against the same host's CPU (report's goals table): GPU/CPU samples/s at least this
    gpu_speedup_goal: float | None = None
    goal_batch: Literal["tuned", "default", "best"] = "tuned"  # each side's tuned batch, the default one, or its best record
    gpu_util_goal_pct: float | None = None  # NVML utilisation during the GPU's timed steps at least this


@dataclass(frozen=True)
class WorkloadTune:
    """How this workload is tuned: one trial at a time, or populations trained as one stacked model."""

    # auto: population where the model stacks, on any device (study.strategy_for decides), else sequential
    strategy: Literal["auto", "sequential", "population"] = "auto"
    population: int = 256  # trials asked from Optuna and trained together (torch only)
    report_every: int = 10  # epochs between intermediate values reported for pruning
    workers: int | None = None  # processes for a sequential study; None: the global tune.workers


@dataclass(frozen=True)
class WorkloadParams:
    """Shape shared by all workload sections; each workload subclasses the parts."""

    framework: Framework | None = None  # None: the global `framework`; a torch-only workload says torch
    data: DataParams = field(default_factory=DataParams)
    train: TrainParams = field(default_factory=TrainParams)
    search: dict[str, SearchSpec] = field(default_factory=dict)
    tune: WorkloadTune = field(default_factory=WorkloadTune)
    benchmark: BenchTarget = field(default_factory=BenchTarget)


@dataclass(frozen=True)
class TuneConfig:
    n_trials: int = 10
    timeout_s: float | None = 300
    storage: str = "sqlite:///mlruns/optuna.db"
    prune_warmup_epochs: int = 5
    workers: int = 1  # processes on this host sharing the study; other hosts may point at the same storage


@dataclass(frozen=True)
class PopulationBench:
    """Population against sequential tuning, timed on each benchmark device for workloads whose models stack."""

    trials: int = 16  # trials tuned as populations (Optuna ask/train/tell, pruning off)
    sequential_trials: int = 2  # trials tuned one by one: their rate, and the budget of the best-objective comparison
    epochs: int | None = 5  # every trial's epochs (train.epochs leaves the search); null: the workload's train.epochs
    cpu_trials: int | None = None  # the CPU's population when smaller (its rate steadies on fewer); null: trials

    def __post_init__(self) -> None:
        if min(self.trials, self.sequential_trials, self.epochs or 1, self.cpu_trials or 1) < 1:
            raise ValueError("expected trials, sequential_trials, epochs and cpu_trials >= 1 (epochs, cpu_trials: or null)")


@dataclass(frozen=True)
class BenchmarkConfig:
    devices: list[str] = field(default_factory=lambda: ["cpu"])  # cpu, cuda, cuda:N; auto = every device present
    frameworks: list[Framework] = field(default_factory=lambda: ["torch"])
    batch_sizes: list[int] = field(default_factory=lambda: [32, 256])  # the default and tuned batches are added
    steps: int = 10  # training steps per timed repeat (min_repeat_s lengthens a short one, or shortens a long one)
    warmup_steps: int = 5
    repeats: int = 5
    intervals: int = 5  # the repeats split into this many re-warmed intervals, CPU and GPU interleaved
    min_repeat_s: float = 0.0  # a timed repeat lasts at least this long (steps again, or fewer long ones); 0: steps once
    cpu_threads: int | None = None  # null: the global cpu_threads, else one per physical core on the CPU
    compute_ceiling: bool = True  # also time one device-resident batch reused: the compute-only ceiling
    scaling: list[int] | None = None  # data-parallel rank counts timed; null: 1, 2, 4 ... distributed.gpus when > 1
    gpu_util_min_s: float = 0.5  # NVML utilisation: untimed repeats continue until it is this long and holds 3 samples
    # on each CUDA device at the tuned batch: the baseline, each option alone, all together (torch)
    ablation: list[str] = field(default_factory=list)  # e.g. [precision=bf16, channels_last=true, compile=true, cuda_graphs=true]
    ablation_epochs: int | None = None  # epochs of the quality run beside each setting; null: the workload's train.epochs
    ablation_devices: list[Literal["cpu", "cuda"]] = field(default_factory=lambda: ["cuda"])  # device types it runs on
    population: PopulationBench | None = field(default_factory=PopulationBench)  # null: not measured

    def __post_init__(self) -> None:
        ablation_options(self.ablation)
        if not 1 <= self.intervals <= self.repeats:
            raise ValueError(f"intervals: {self.intervals} must be from 1 to repeats ({self.repeats}): "
                             "each interval times at least one repeat")  # fmt: skip


ABLATION_VALUES = {"precision": ("fp32", "bf16", "fp16"), "channels_last": (True, False), "compile": (True, False),
                   "compile_mode": typing.get_args(CompileMode), "cuda_graphs": (True, False),
                   "fused_optimizer": (True, False)}  # fmt: skip


def ablation_options(entries: list[str]) -> dict[str, dict[str, Any]]:
    """'precision=bf16' -> {'precision=bf16': {'precision': 'bf16'}}; ValueError naming a bad entry. A compile mode
    other than the default compiles too: alone, it is compile in that mode."""
    out = {}
    for entry in entries:
        key, _, raw = entry.partition("=")
        value = {"true": True, "false": False}.get(raw.strip().lower(), raw.strip())
        if key.strip() not in ABLATION_VALUES or value not in ABLATION_VALUES[key.strip()]:
            allowed = ", ".join(f"{k}={'|'.join(str(v).lower() for v in vs)}" for k, vs in ABLATION_VALUES.items())
            raise ValueError(f"ablation: '{entry}' is not one of {allowed}")
        out[entry] = {key.strip(): value}
        if key.strip() == "compile_mode" and value != "default":
            out[entry]["compile"] = True
    return out


@dataclass(frozen=True)
class DistributedConfig:
    """Data-parallel training: torchrun + DistributedDataParallel (torch), MirroredStrategy (TensorFlow)."""

    gpus: int = 1  # processes (torch) or replicas (TF) per node; device=cpu: that many CPU ranks (gloo)
    nodes: int = 1
    node_rank: int = 0  # this host's index, 0 on the host that serves the rendezvous
    rdzv_endpoint: str | None = None  # host:port of node 0; needed when nodes > 1
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on cuda, gloo on cpu
    global_batch: bool = True  # true: train.batch_size is split across ranks; false: it is each rank's batch
    lr_scaling: Literal["none", "linear", "sqrt"] = "linear"  # in (global batch / train.batch_size)

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.nodes < 1:
            raise ValueError("gpus and nodes must be at least 1")
        if not 0 <= self.node_rank < self.nodes:
            raise ValueError(f"node_rank ({self.node_rank}) must be in [0, nodes)")
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nodes > 1 needs rdzv_endpoint (host:port of node 0)")

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes


@dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: int = 10  # 0 = never; a restarted train stage with the same params resumes from it


@dataclass(frozen=True)
class Config:
    workloads: list[str]
    device: Device = "cpu"
    framework: Framework = "torch"
    seed: int = 42
    precision: Precision = "fp32"
    compile: bool = False  # torch: the model and AdamW's step (one generated kernel, in place of fused_optimizer's)
    compile_mode: CompileMode = "default"  # torch: the model's; max-autotune-no-cudagraphs times Triton templates against cuDNN/cuBLAS
    channels_last: bool = False  # torch: NHWC memory layout for 4-D (image) models
    cuda_graphs: bool = False  # torch on CUDA: capture the training steps once, replay them (no per-kernel launches)
    fused_optimizer: bool = False  # torch: AdamW's fused kernel, one launch for every parameter, instead of foreach
    cpu_threads: int | None = None
    deterministic: bool = False
    study: str = "quick"  # the named size in `studies` whose overrides apply (project.load_config applies them)
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    sections: dict[str, WorkloadParams] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode '{self.compile_mode}' needs compile: true (without it nothing is compiled)")

    def params(self, workload: str) -> WorkloadParams:
        return self.sections[workload]


def parse(tp: Any, value: Any, where: str, sep: str = ".") -> Any:
    """Build `tp` from plain YAML data, checking keys and types recursively."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ConfigError(f"{where}{sep}{unknown[0]}: unknown key (expected one of {names})")
        kwargs = {k: parse(hints[k], v, f"{where}{sep}{k}") for k, v in value.items()}
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse(arg, value, where, sep)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: unexpected value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [parse(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): parse(args[1], v, f"{where}{sep}{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def with_overrides(params: WorkloadParams, overrides: dict[str, Any]) -> WorkloadParams:
    """Return a copy of `params` with dotted keys ('train.lr') replaced, type-checked."""
    for dotted, value in overrides.items():
        params = _replace_path(params, dotted.split("."), value, dotted)
    return params


def _replace_path(obj: Any, parts: list[str], value: Any, dotted: str) -> Any:
    head, rest = parts[0], parts[1:]
    if not dataclasses.is_dataclass(obj) or head not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"'{dotted}': no such parameter")
    if rest:
        new = _replace_path(getattr(obj, head), rest, value, dotted)
    else:
        new = parse(typing.get_type_hints(type(obj))[head], value, dotted)
    return dataclasses.replace(obj, **{head: new})


def get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def as_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}: the form MLflow params take."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def with_study(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """`raw` with the dotted overrides of `studies[study]` applied: one params.yaml holds the quick CPU study
    and the GPU-sized one, and `-S study=gpu` picks the other."""
    name = raw.get("study", "quick")
    studies = raw.get("studies") or {"quick": {}}
    if name not in studies:
        raise ConfigError(f"{path}: study: '{name}' is not one of the names under studies ({sorted(studies)})")
    raw = copy.deepcopy(raw)
    for dotted, value in (studies[name] or {}).items():
        *parents, leaf = str(dotted).split(".")
        node = raw
        for i, key in enumerate(parents):
            if not isinstance(node.get(key), dict):
                raise ConfigError(f"{path}: studies: {name}: {dotted}: no section '{'.'.join(parents[: i + 1])}' to set it in")
            node = node[key]
        node[leaf] = value
    return raw
