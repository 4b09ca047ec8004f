"""Exactly `n_trials` per study, however many processes and hosts share its storage.

Each process claims a trial before running it: under a lock held in the storage itself (an advisory lock on
PostgreSQL, GET_LOCK on MySQL, a file lock beside a SQLite file), it counts the study's live and finished
trials of the same config and, while fewer than `n_trials`, enqueues one labelled with the config hash;
it keeps the lock until Optuna has popped that trial, so no two processes pop the same one.
Claims are trials in the storage, so a second host sees them; failed trials do not count (a rerun retries
them), and trials of a killed process are failed by Optuna's heartbeat once stale, freeing their claim.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from sqlalchemy import text

HEARTBEAT_S = 30  # a RUNNING trial whose process stopped beating for GRACE_S is failed and its claim freed
GRACE_S = 120
CLAIMED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.WAITING,
)


def storage(url: str) -> optuna.storages.RDBStorage:
    # several processes share one SQLite file: wait for the write lock instead of failing at once
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # heartbeats have been 'experimental' since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def run_one(study: optuna.Study, config_hash: str, n_trials: int, objective: Callable[[optuna.Trial], float],
            catch: tuple[type[Exception], ...] = ()) -> bool:  # fmt: skip
    """Claim one trial for this config and run it (Optuna's optimize, one trial); False, running nothing, where
    the study already holds `n_trials` of it. The lock is held until Optuna has popped the trial (its ask):
    SQLite has no row locks, so two processes popping at once could both take one waiting trial and both run
    it, and the second to finish would fail ("Cannot tell a COMPLETE trial")."""
    with contextlib.ExitStack() as held:
        held.enter_context(_lock(study))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        claimed = [t for t in study.get_trials(deepcopy=False, states=CLAIMED) if t.user_attrs.get("config_hash") == config_hash]
        if len(claimed) >= n_trials:
            return False
        study.enqueue_trial({}, user_attrs={"config_hash": config_hash})

        def popped_then_run(trial: optuna.Trial) -> float:
            held.close()  # Optuna calls the objective once it has popped the trial
            return objective(trial)

        study.optimize(popped_then_run, n_trials=1, catch=catch)
        return True


@contextlib.contextmanager
def _lock(study: optuna.Study) -> Iterator[None]:
    store = getattr(study._storage, "_backend", study._storage)  # create_study wraps the RDBStorage in a cache
    url = str(getattr(store, "url", ""))
    key = int.from_bytes(hashlib.sha256(study.study_name.encode()).digest()[:8], "big", signed=True)
    if url.startswith("sqlite:///"):
        with open(Path(url[len("sqlite:///") :]).with_suffix(".claims.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
    elif url.startswith("postgresql"):
        with store.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    elif url.startswith("mysql"):
        with store.engine.connect() as conn:
            conn.execute(text("SELECT GET_LOCK(:k, 600)"), {"k": f"accelbench-{key}"})
            try:
                yield
            finally:
                conn.execute(text("SELECT RELEASE_LOCK(:k)"), {"k": f"accelbench-{key}"})
    else:  # an in-memory or other storage: one process, nothing to race with
        yield
