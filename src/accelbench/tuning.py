"""Optuna study per (workload, device, framework): a parent MLflow run, one nested run per trial.

The study is named `<workload>-<device>-<framework>` and lives in `tune.storage`, so several
processes or hosts can share it. Trials carry a hash of everything that shapes their result;
a rerun with the same hash only adds the trials still missing from `n_trials`.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import optuna

from . import devices
from .config import Config, SearchSpec, WorkloadParams, as_dict, get_path, with_overrides
from .devices import Runtime
from .engines import get_engine
from .errors import ConfigError, TrainingError
from .io import Prepared
from .tracking import run_name, stage_run
from .workloads import Workload


def study_name(workload: str, variant: str | None, runtime: Runtime) -> str:
    """`diabetes-cpu-torch`; a workload comparing several models adds the variant: `rnn-gru-cuda-torch`."""
    return "-".join(p for p in (workload, variant, runtime.device.label, runtime.framework) if p)


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


def run_study(
    cfg: Config, wl: Workload, variant: str, params: WorkloadParams, runtime: Runtime, prepared: Prepared, root: Path
) -> dict[str, Any]:
    """Run the missing trials for one variant, then return the best trial's params (dotted keys) and value."""
    several = len(wl.variants(cfg.params(wl.name))) > 1
    for key in params.search:
        try:
            get_path(params, key)
        except AttributeError:
            raise ConfigError(f"params.yaml: {wl.name}.search.{key}: no such parameter in '{wl.name}'") from None
    task = wl.task(prepared.meta)
    engine = get_engine(runtime.framework)
    name = study_name(wl.name, variant if several else None, runtime)
    h = config_hash(params, runtime, prepared)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=storage_url(cfg.tune.storage, root),
        load_if_exists=True,
        direction=task.direction,
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=optuna.pruners.MedianPruner(n_warmup_steps=cfg.tune.prune_warmup_epochs),
    )
    done = _matching(study, h, (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    remaining = max(0, cfg.tune.n_trials - len(done))
    tune_params = {
        "tune.n_trials": cfg.tune.n_trials,
        "tune.timeout_s": cfg.tune.timeout_s,
        "tune.storage": mask_secrets(cfg.tune.storage),
        "tune.objective": task.objective,
        "tune.direction": task.direction,
        **{f"search.{k}": json.dumps(as_dict(v)) for k, v in params.search.items()},
    }
    run_tags = {"study": name, "config_hash": h, "variant": variant}
    tune_name = run_name("tune", runtime.tags(), variant if several else None)
    with stage_run(wl.name, "tune", runtime.tags(), tune_params, name=tune_name, tags=run_tags) as parent:

        def objective(trial: optuna.Trial) -> float:
            trial.set_user_attr("config_hash", h)
            overrides = {k: suggest(trial, k, spec) for k, spec in params.search.items()}
            trial_params = with_overrides(params, overrides)
            devices.seed_everything(cfg.seed, runtime.framework)
            tags = {"study": name, "trial": str(trial.number), "variant": variant}
            pruned: optuna.TrialPruned | None = None
            with stage_run(wl.name, "trial", runtime.tags(), overrides, name=f"trial-{trial.number}",
                           nested=True, tags=tags) as run:  # fmt: skip

                def on_epoch(epoch: int, row: dict[str, float]) -> None:
                    run.log_metrics(row, step=epoch)
                    trial.report(row.get(task.objective, float("nan")), epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at epoch {epoch + 1}")

                model = wl.build_model(runtime.framework, trial_params, prepared.meta)
                try:
                    result = engine.fit(model, task, prepared, trial_params.train, runtime, on_epoch, f"trial {trial.number}")
                except optuna.TrialPruned as exc:
                    pruned = exc
                    run.set_tags({"optuna.state": "PRUNED", "pruned": str(exc)})
                else:
                    run.log_metrics(result.summary())
                    run.set_tags({"optuna.state": "COMPLETE"})
            if pruned:
                raise pruned
            return result.history[-1][task.objective]

        if remaining:
            study.optimize(objective, n_trials=remaining, timeout=cfg.tune.timeout_s, catch=(TrainingError,),
                           show_progress_bar=False)  # fmt: skip
        states = optuna.trial.TrialState
        complete = _matching(study, h, (states.COMPLETE,))
        counts = {s.name.lower(): len(_matching(study, h, (s,))) for s in (states.COMPLETE, states.PRUNED, states.FAIL)}
        parent.log_metrics({f"trials/{k}": v for k, v in counts.items()})
        if not complete:
            best: dict[str, Any] = {"params": {}, "value": None, "trial": None, "note": "no trial completed; defaults used"}
        else:
            pick = max if task.direction == "maximize" else min
            t = pick(complete, key=lambda t: t.value)
            best = {"params": t.params, "value": t.value, "trial": t.number}
            parent.log_metrics({"best/" + task.objective: t.value})
            parent.log_params({f"best.{k}": v for k, v in t.params.items()})
        best.update(study=name, objective=task.objective, direction=task.direction, trials=counts, config_hash=h)
        return best


def _matching(study: optuna.Study, h: str, states) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=states) if t.user_attrs.get("config_hash") == h]
