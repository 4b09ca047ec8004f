"""The tuning vocabulary that tuning, population tuning and the benchmark share: a study's name, storage,
search space and the hash of everything that shapes a trial's result."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from . import claims
from .config import Config, SearchSpec, WorkloadParams, as_dict, get_path
from .devices import Runtime
from .errors import ConfigError
from .io import Prepared
from .workloads import Workload

AS_WRITTEN = "as in params.yaml"  # where hyperparameters came from when no study has a completed trial


def study_name(workload: str, variant: str | None, runtime: Runtime) -> str:
    """`diabetes-cpu-torch`; a workload comparing several models adds the variant: `rnn-gru-cuda-torch`."""
    return "-".join(p for p in (workload, variant, runtime.device.label, runtime.framework) if p)


def trial_name(s: Study, number: int, prefix: str = "trial") -> str:
    """'trial-3-cpu-torch': distinct from the same number of another device's or framework's study."""
    tags = s.runtime.tags()
    return "-".join(p for p in (f"{prefix}-{number}", tags["device"], tags["framework"], s.variant if s.several else None) if p)


def storage_url(storage: str, root: Path) -> str:
    """Relative SQLite paths are relative to the project root, wherever the stage runs."""
    prefix = "sqlite:///"
    if storage.startswith(prefix) and not storage[len(prefix) :].startswith("/"):
        path = root / storage[len(prefix) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"{prefix}{path}"
    return storage


def mask_secrets(url: str) -> str:
    """postgresql://user:pass@host/db -> postgresql://user:***@host/db"""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def suggest(trial: optuna.Trial, key: str, spec: SearchSpec) -> Any:
    if spec.choices is not None:
        return trial.suggest_categorical(key, spec.choices)
    ints = all(isinstance(v, int) for v in (spec.low, spec.high)) and (spec.step is None or float(spec.step).is_integer())
    if ints:
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(key, spec.low, spec.high, log=spec.log, step=spec.step)


def config_hash(params: WorkloadParams, runtime: Runtime, prepared: Prepared) -> str:
    key = {
        "params": as_dict(params),
        "runtime": runtime.tags() | {"seed": runtime.seed},
        "data": prepared.meta,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Study:
    """One variant's study plus what its trials need."""

    cfg: Config
    wl: Workload
    variant: str
    several: bool
    params: WorkloadParams
    runtime: Runtime
    prepared: Prepared
    task: Any
    name: str
    config_hash: str
    optuna: optuna.Study


def open_study(cfg: Config, wl: Workload, variant: str, params: WorkloadParams, runtime: Runtime,
               prepared: Prepared, root: Path) -> Study:  # fmt: skip
    for key in params.search:
        try:
            get_path(params, key)
        except AttributeError:
            raise ConfigError(f"params.yaml: {wl.name}.search.{key}: no such parameter in '{wl.name}'") from None
    several = len(wl.variants(cfg.params(wl.name))) > 1
    task = wl.task(prepared.meta)
    name = study_name(wl.name, variant if several else None, runtime)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=claims.storage(storage_url(cfg.tune.storage, root)),
        load_if_exists=True,
        direction=task.direction,
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=optuna.pruners.MedianPruner(n_warmup_steps=cfg.tune.prune_warmup_epochs),
    )
    return Study(cfg, wl, variant, several, params, runtime, prepared, task, name,
                 config_hash(params, runtime, prepared), study)  # fmt: skip


def strategy_for(wl: Workload, params: WorkloadParams, runtime: Runtime) -> str:
    """`auto` tunes populations wherever the model stacks (torch), on the CPU too: a step of a small model is
    mostly Python and dispatch, which a population pays once for all its members (tune@diabetes on 2 cores:
    25.5 s one by one, 12.4 s as populations, the same best trial)."""
    if params.tune.strategy != "auto":
        return params.tune.strategy
    return "population" if runtime.framework == "torch" and wl.stacks(params) else "sequential"
