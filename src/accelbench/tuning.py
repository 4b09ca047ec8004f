"""Optuna study per (workload, device, framework): a parent MLflow run, one nested run per trial.

The study is named `<workload>-<device>-<framework>` and lives in `tune.storage`, so several
processes or hosts can share it. Trials carry a hash of everything that shapes their result;
a rerun with the same hash only adds the trials still missing from `n_trials`.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna

from . import claims, devices, preload, progress
from .cli import main
from .config import Config, WorkloadParams, as_dict, with_overrides
from .devices import Runtime
from .engines import get_engine
from .errors import AccelbenchError, TrainingError
from .io import Prepared, load_prepared
from .project import prepared_dir
from .runtime import on_device, runtime_for
from .study import Study, mask_secrets, open_study, strategy_for, suggest, trial_name
from .tracking import record_failure, run_name, stage_run
from .workloads import Workload


def objective_for(s: Study, parent_run_id: str, deadline: float = float("inf")):
    """`deadline` (time.monotonic): tune.timeout_s bounds the study, so a trial still training then stops at its
    next epoch end, as pruned, rather than running on for minutes past it."""
    engine = get_engine(s.runtime.framework)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("config_hash", s.config_hash)
        overrides = {k: suggest(trial, k, spec) for k, spec in s.params.search.items()}
        trial_params = with_overrides(s.params, overrides)
        devices.seed_everything(s.cfg.seed, s.runtime.framework)
        tags = {"study": s.name, "trial": str(trial.number), "variant": s.variant}
        pruned: optuna.TrialPruned | None = None
        with stage_run(s.wl.name, "trial", s.runtime.tags(), overrides, name=trial_name(s, trial.number),
                       parent_run_id=parent_run_id, tags=tags) as run:  # fmt: skip

            def on_epoch(epoch: int, row: dict[str, float]) -> None:
                run.log_metrics(row, step=epoch)
                trial.report(row.get(s.task.objective, float("nan")), epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch + 1}")
                if time.monotonic() > deadline:
                    raise optuna.TrialPruned(f"tune.timeout_s ({s.cfg.tune.timeout_s} s) reached at epoch {epoch + 1}")

            trial_inputs, _ = s.wl.precompute(trial_params, s.prepared, s.runtime)
            model = s.wl.build_model(s.runtime.framework, trial_params, s.prepared.meta)
            try:
                result = engine.fit(model, s.task, trial_inputs, trial_params.train, s.runtime, on_epoch, f"trial {trial.number}")
            except optuna.TrialPruned as exc:
                pruned = exc
                run.set_tags({"optuna.state": "PRUNED", "pruned": str(exc)})
            except TrainingError as exc:  # out of memory, a NaN loss: the trial fails, the study goes on
                trial.set_user_attr("fail_reason", str(exc))
                run.set_tags({"optuna.state": "FAIL"})
                raise
            else:
                run.log_metrics(result.summary())
                run.set_tags({"optuna.state": "COMPLETE"})
        if pruned:
            raise pruned
        return result.history[-1][s.task.objective]

    return objective


def optimize(s: Study, n_trials: int, parent_run_id: str, desc: str | None = None) -> None:
    """Up to `n_trials` of the study in this process; `desc` names its progress (a worker's carries its pid)."""
    if n_trials > 0 and strategy_for(s.wl, s.params, s.runtime) == "population":
        from . import population  # imports torch: only a population study pays for it

        population.optimize(s, n_trials, parent_run_id)
    elif n_trials > 0:
        deadline = time.monotonic() + s.cfg.tune.timeout_s
        objective = objective_for(s, parent_run_id, deadline)
        with progress.bar(n_trials, desc or f"tune {s.name}", "trial") as bar:
            # at most this process's share, and never past n_trials in the whole study (other hosts included)
            for _ in range(n_trials):
                if time.monotonic() > deadline or not claims.run_one(
                    s.optuna, s.config_hash, s.cfg.tune.n_trials, objective, catch=(TrainingError,)
                ):
                    break
                bar.set_postfix_str(_trial_line(s))
                bar.update(1)


def _trial_line(s: Study) -> str:
    """'last: pruned; best val/roc_auc 0.812 (trial 3)': what the bar or the log line says after each trial."""
    last = s.optuna.get_trials(deepcopy=False)[-1]
    complete = [t for t in s.optuna.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.user_attrs.get("config_hash") == s.config_hash]  # fmt: skip
    if not complete:
        return f"last: {last.state.name.lower()}; no trial complete yet"
    pick = max if s.task.direction == "maximize" else min
    t = pick(complete, key=lambda t: t.value)
    return f"last: {last.state.name.lower()}; best {s.task.objective} {t.value:.4g} (trial {t.number})"


def shares(total: int, workers: int) -> list[int]:
    """Split the missing trials exactly: no worker runs more than its share, none are lost."""
    workers = max(1, min(workers, total)) if total else 1
    return [total // workers + (i < total % workers) for i in range(workers)]


def run_study(
    cfg: Config, wl: Workload, variant: str, params: WorkloadParams, runtime: Runtime, prepared: Prepared, root: Path
) -> dict[str, Any]:
    """Run the missing trials for one variant (in `<workload>.tune.workers` processes, else `tune.workers`), then
    return the best trial."""
    s = open_study(cfg, wl, variant, params, runtime, prepared, root)
    states = optuna.trial.TrialState
    done = _matching(s.optuna, s.config_hash, (states.COMPLETE, states.PRUNED))
    remaining = max(0, cfg.tune.n_trials - len(done))
    strategy = strategy_for(wl, params, runtime)
    workers = _workers(params.tune.workers or cfg.tune.workers, strategy, s.name)
    tune_params = {
        "tune.n_trials": cfg.tune.n_trials,
        "tune.workers": workers,
        "tune.strategy": strategy,
        "tune.timeout_s": cfg.tune.timeout_s,
        "tune.storage": mask_secrets(cfg.tune.storage),
        "tune.objective": s.task.objective,
        "tune.direction": s.task.direction,
        **{f"search.{k}": json.dumps(as_dict(v)) for k, v in params.search.items()},
    }
    run_tags = {"study": s.name, "config_hash": s.config_hash, "variant": variant}
    tune_name = run_name("tune", runtime.tags(), variant if s.several else None)
    with stage_run(wl.name, "tune", runtime.tags(), tune_params, name=tune_name, tags=run_tags) as parent:
        mine, *others = shares(remaining, workers)
        procs = [_spawn_worker(wl.name, runtime.framework, variant, n, parent.run_id, root) for n in others]
        try:
            optimize(s, mine, parent.run_id)
        finally:
            errors = [_wait(w) for w in procs]
        if any(errors):
            raise AccelbenchError(next(e for e in errors if e))
        complete = _matching(s.optuna, s.config_hash, (states.COMPLETE,))
        counts = {st.name.lower(): len(_matching(s.optuna, s.config_hash, (st,))) for st in (states.COMPLETE, states.PRUNED, states.FAIL)}
        parent.log_metrics({f"trials/{k}": v for k, v in counts.items()})
        if not complete:
            best: dict[str, Any] = {"params": {}, "value": None, "trial": None, "note": "no trial completed; defaults used"}
        else:
            pick = max if s.task.direction == "maximize" else min
            t = pick(complete, key=lambda t: t.value)
            best = {"params": t.params, "value": t.value, "trial": t.number}
            parent.log_metrics({"best/" + s.task.objective: t.value})
            parent.log_params({f"best.{k}": v for k, v in t.params.items()})
        best.update(study=s.name, objective=s.task.objective, direction=s.task.direction, trials=counts, config_hash=s.config_hash)
        return best


def _workers(asked: int, strategy: str, name: str) -> int:
    """The processes a study runs in: a population's trials already train together, as one stacked model in one
    process, and more processes would only split the stack."""
    if strategy == "population" and asked > 1:
        progress.note(f"{name}: a population study runs in one process; tune.workers ({asked}) applies to sequential studies")
        return 1
    return asked


def _spawn_worker(workload: str, framework: str, variant: str, n: int, parent_run_id: str,
                  root: Path) -> tuple[subprocess.Popen, progress.Drain]:  # fmt: skip
    """A worker process, warm as the stage is, its progress lines echoed on the stage's stderr as they come."""
    cmd = preload.child_command("tune", workload, framework, variant, str(n), parent_run_id)
    proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "DVC_ROOT": str(root)}, stderr=subprocess.PIPE,
                            text=True, errors="replace")  # fmt: skip
    return proc, progress.Drain(proc.stderr)


def _wait(worker: tuple[subprocess.Popen, progress.Drain]) -> str | None:
    proc, drain = worker
    proc.wait()
    err = drain.text()
    if proc.returncode == 0:
        return None
    return progress.last_error(err) or f"tuning worker exited {proc.returncode}: {err.strip()[-2000:]}"


def worker(cfg: Config, wl: Workload, root: Path, framework: str, variant: str, n_trials: str, parent_run_id: str) -> None:
    """A tuning worker process: its share of one variant's trials in the stage's framework, nested under the
    tune stage's run."""
    runtime = runtime_for(on_device(cfg, wl, cfg.device, framework, cfg.cpu_threads), wl)
    prepared = load_prepared(prepared_dir(root, wl.name))
    params = with_overrides(cfg.params(wl.name), wl.variants(cfg.params(wl.name))[variant])
    s = open_study(cfg, wl, variant, params, runtime, prepared, root)
    optimize(s, int(n_trials), parent_run_id, desc=f"tune {s.name} (worker, pid {os.getpid()})")


def _matching(study: optuna.Study, h: str, states) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=states) if t.user_attrs.get("config_hash") == h]


def worker_main() -> None:
    """`python -m accelbench.preload child tune <workload> <framework> <variant> <n_trials> <parent_run_id>` (warm),
    or `python -m accelbench.tuning` with the same arguments."""
    main("tune", worker, extra_args=("framework", "variant", "n_trials", "parent_run_id"), on_failure=record_failure)


if __name__ == "__main__":
    worker_main()
