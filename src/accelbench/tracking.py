"""One MLflow run per stage call: tags, params, buffered metrics, artifacts, honest end status."""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import requests
from mlflow.entities import Metric, RunTag
from mlflow.store.artifact.artifact_repo import ArtifactRepository
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from . import devices
from .errors import AccelbenchError, Interrupted, TrackingError
from .project import hardware_file, project_root
from .summary import setting_label

RUNS_STARTED = 0  # lets the CLI tell a failure before any run began from one inside a run


def tracking_uri(root: Path | None = None) -> str:
    root = root or project_root()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


SERVER_CHECK_TIMEOUT_S = 5.0


def server_address(uri: str) -> str:
    """scheme://host:port/path of a tracking URI, without any user:password@ it may hold."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


@functools.cache  # once per process: a tuning stage opens a run per trial
def check_server(uri: str) -> None:
    """One cheap request before a stage logs: a wrong URL or bad credentials fail now, in one line.

    Left alone, MLflow's client retries an unreachable server for minutes and then raises a traceback.
    Local stores (sqlite:, file:, a path) need no check.
    """
    if not uri.startswith(("http://", "https://")):
        return
    where = f"MLFLOW_TRACKING_URI={server_address(uri)}"
    try:
        resp = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                            max_retries=0, timeout=SERVER_CHECK_TIMEOUT_S, raise_on_status=False,
                            params={"max_results": 1})  # fmt: skip
    except (requests.RequestException, mlflow.exceptions.MlflowException) as exc:
        raise TrackingError(f"{where}: no MLflow tracking server answered ({_reason(exc)}); "
                            "is the server running and the URL right?") from None  # fmt: skip
    if resp.status_code == 401:
        raise TrackingError(f"{where}: the server rejected the credentials (HTTP 401); "
                            "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")  # fmt: skip
    if resp.status_code == 403:
        raise TrackingError(f"{where}: the server denied this user access (HTTP 403); ask its admin for a permission")
    if resp.status_code != 200 or "application/json" not in resp.headers.get("Content-Type", ""):
        raise TrackingError(f"{where}: answered HTTP {resp.status_code} to an MLflow API request; "
                            "is this an MLflow tracking server (and the right path)?")  # fmt: skip


@contextlib.contextmanager
def server_errors_in_one_line() -> Iterator[None]:
    """A client error left after MLflow's own retries (the server went away mid-stage) becomes a TrackingError:
    the CLI prints it in one line with exit code 2, not a traceback."""
    try:
        yield
    except (mlflow.exceptions.MlflowException, requests.RequestException) as exc:
        raise TrackingError(f"MLflow tracking failed at {server_address(tracking_uri())}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """The innermost cause in a few words ('Connection refused', 'timed out'), never a URL with credentials."""
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (text or type(exc).__name__)[:200]


@functools.cache  # a tuning stage opens a run per trial: one `git` process per stage, not per trial
def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


ARTIFACTS = "mlruns/artifacts"  # the local store's artifacts, relative to the project root


def use_experiment(workload: str) -> str:
    """Point MLflow at the project store and the workload's experiment; return its id."""
    root = project_root()
    uri = tracking_uri(root)
    check_server(uri)  # a stage's first contact with MLflow, before it writes anything
    # where MLflow looks first (set_tracking_uri sets it too, and first builds the trace exporter it would use
    # for that URI: 0.15 s of OpenTelemetry imports per stage for traces we never write)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    local = uri.startswith("sqlite:")
    if local:
        (root / "mlruns").mkdir(exist_ok=True)
    exp = mlflow.get_experiment_by_name(workload)
    if exp is None:
        # created at the absolute path (MLflow makes any local one absolute), made relative below: a run another
        # process starts in between still writes its artifacts to the right place
        location = (root / ARTIFACTS / workload).as_uri() if local else None
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # another worker created it first
            mlflow.create_experiment(workload, artifact_location=location)
        exp = mlflow.get_experiment_by_name(workload)
    if local and exp.artifact_location != f"{ARTIFACTS}/{workload}":
        _make_artifacts_relative(uri, exp.experiment_id, exp.artifact_location, workload)
    return exp.experiment_id


def _make_artifacts_relative(uri: str, experiment_id: str, location: str, workload: str) -> None:
    """Store the experiment's artifact location, and its runs', relative to the project root.

    Absolute, they break when the project is moved or copied: the UI and clients look in the old place.
    Relative, MLflow resolves them against the working directory, which the stages (DVC runs them in the root),
    `make ui` and the tests share; the stages' own writes resolve them against the root (artifact_repository),
    since a queued or temp experiment runs in a copy of the workspace. Rewriting an absolute prefix whenever the
    project turns up elsewhere would instead leave a copy reading the original's files until a stage ran there.
    MLflow has no call to change a location: one UPDATE of its experiments and runs tables. Only a location of
    ours is rewritten (a file: URI ending in mlruns/artifacts/<workload>), wherever the project lay then."""
    import sqlalchemy  # here: a tracking server's stages never load it

    relative = f"{ARTIFACTS}/{workload}"
    if urlsplit(location).scheme != "file" or not location.endswith(f"/{relative}"):
        return
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.begin() as db:
            db.execute(sqlalchemy.text("UPDATE experiments SET artifact_location = :new WHERE experiment_id = :id"),
                       {"new": relative, "id": int(experiment_id)})  # fmt: skip
            db.execute(sqlalchemy.text("UPDATE runs SET artifact_uri = :new || substr(artifact_uri, :cut) "
                                       "WHERE experiment_id = :id AND substr(artifact_uri, 1, :cut - 1) = :old"),
                       {"new": relative, "cut": len(location) + 1, "id": int(experiment_id), "old": location})  # fmt: skip
    finally:
        engine.dispose()


def artifact_repository(artifact_uri: str) -> ArtifactRepository:
    """Where a run's artifacts go: a relative URI (the local store's) under the project root, whatever this
    process's working directory; any other as MLflow's client resolves it (a server's mlflow-artifacts:)."""
    if not urlsplit(artifact_uri).scheme and not Path(artifact_uri).is_absolute():
        artifact_uri = str(project_root() / artifact_uri)
    return get_artifact_repository(artifact_uri, tracking_uri=mlflow.get_tracking_uri())


def reap_orphans(experiment_id: str) -> None:
    """Runs still RUNNING whose process is gone (SIGKILL, OOM killer) are marked KILLED.

    A killed process cannot end its own run; left alone, the store would claim it is still training.
    Only runs of this host and this checkout are ours to judge: a pid means nothing on another machine,
    and another clone on this host may be a different machine's stand-in or a colleague's live run.
    """
    client = mlflow.MlflowClient()
    host, checkout = socket.gethostname(), str(project_root())
    for run in client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.host = '{host}'"):
        if run.data.tags.get("checkout") != checkout:  # compared here: a path may hold quotes a filter cannot
            continue
        pid = int(run.data.tags.get("pid", "0"))
        if pid and not _alive(pid):
            client.set_tag(run.info.run_id, "failure_reason", f"process {pid} died without ending its run (SIGKILL or crash)")
            client.set_terminated(run.info.run_id, "KILLED")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def base_tags(workload: str, stage: str, runtime_tags: dict[str, str]) -> dict[str, str]:
    root = project_root()
    hw = devices.recorded_hardware(hardware_file(root))
    return {
        "host": socket.gethostname(),
        "checkout": str(root),  # with host and pid: whose run this is, for reap_orphans
        "pid": str(os.getpid()),
        "workload": workload,
        "stage": stage,
        **runtime_tags,
        "git_commit": git_commit(root),
        **({"dvc_exp": os.environ["DVC_EXP_NAME"]} if os.environ.get("DVC_EXP_NAME") else {}),  # none in plain dvc repro
        "hardware": devices.fingerprint(hw),
        "hw.cpu": hw["cpu"]["model"],
        "hw.cores": str(hw["cpu"]["logical_cores"]),
        "hw.gpus": ", ".join(g["name"] for g in hw["gpus"]) or "none",
        "hw.cuda": str(hw["cuda"]),
        "hw.cudnn": str(hw["cudnn"]),
        "hw.driver": hw["gpus"][0]["driver"] if hw["gpus"] else "none",
    }


def run_name(stage: str, runtime_tags: dict[str, str], variant: str | None = None) -> str:
    """`train-cuda-torch`; a workload comparing several models adds the variant: `train-cuda-torch-gru`."""
    return "-".join(p for p in (stage, runtime_tags.get("device"), runtime_tags.get("framework"), variant) if p)


class Tracker:
    """Thin handle on the active run; metrics are buffered and sent in batches.

    One SQLite round trip per metric per epoch would cost more than a small model's epoch.
    """

    FLUSH_EVERY_S = 5.0

    def __init__(self, run_id: str, artifact_uri: str):
        self.run_id = run_id
        self._artifacts = artifact_repository(artifact_uri)
        self.client = mlflow.MlflowClient()
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        self.last_step = -1  # an interrupted run records the epoch it reached

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        if step is not None:
            self.last_step = max(self.last_step, step)
        self._buffer.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None)
        if time.monotonic() - self._last_flush > self.FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 1000):  # the store's batch limit
            self.client.log_batch(self.run_id, metrics=self._buffer[i : i + 1000])
        self._buffer.clear()
        self._last_flush = time.monotonic()

    def log_params(self, params: dict[str, Any]) -> None:
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()}, run_id=self.run_id)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])  # one round trip

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._artifacts.log_artifact(str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self._artifacts.log_artifacts(str(folder), artifact_path)


@dataclass(frozen=True)
class RunOptions:
    """How a stage's run is opened beyond its workload, stage and runtime tags."""

    name: str | None = None  # default `<stage>-<device>-<framework>`
    nested: bool = False
    parent_run_id: str | None = None  # a tuning worker's trials nest under the tune stage's run
    system_metrics: bool = False
    tags: dict[str, str] | None = None
    start_ms: int | None = None  # when the work began, for a run logged after it: its duration spans the work


@contextlib.contextmanager
def stage_run(workload: str, stage: str, runtime_tags: dict[str, str], params: dict[str, Any] | None = None,
              **options: Any) -> Iterator[Tracker]:  # fmt: skip
    """Start a run named `<stage>-<device>-<framework>`; end it FINISHED, FAILED or KILLED with the reason.
    `options` are RunOptions' fields."""
    opts = RunOptions(**options)
    with server_errors_in_one_line():
        tracker = _start(workload, stage, runtime_tags, opts)
        with _ended(tracker, params, opts.system_metrics):
            yield tracker


def _start(workload: str, stage: str, runtime_tags: dict[str, str], opts: RunOptions) -> Tracker:
    name, nested, parent_run_id, system_metrics, tags, start_ms = (
        opts.name, opts.nested, opts.parent_run_id, opts.system_metrics, opts.tags, opts.start_ms)
    experiment_id = use_experiment(workload)
    if not parent_run_id and not nested:
        reap_orphans(experiment_id)
    if system_metrics:
        # sample four times a second so that runs of a second still get a curve
        mlflow.set_system_metrics_sampling_interval(0.25)
        mlflow.set_system_metrics_samples_before_logging(1)
    all_tags = {**base_tags(workload, stage, runtime_tags), **(tags or {})}
    global RUNS_STARTED
    RUNS_STARTED += 1
    if parent_run_id:  # a tuning worker process has no active parent run of its own: name it
        nested = mlflow.active_run() is not None
    if start_ms is not None:  # the fluent API cannot backdate a run: create it, then make it the active one
        created = mlflow.MlflowClient().create_run(experiment_id, start_time=start_ms, tags=all_tags,
                                                   run_name=name or run_name(stage, runtime_tags))  # fmt: skip
        run = mlflow.start_run(run_id=created.info.run_id, log_system_metrics=system_metrics)
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=name or run_name(stage, runtime_tags),
            nested=nested,
            parent_run_id=parent_run_id,
            tags=all_tags,
            log_system_metrics=system_metrics,
        )
    return Tracker(run.info.run_id, run.info.artifact_uri)


@contextlib.contextmanager
def _ended(tracker: Tracker, params: dict[str, Any] | None, system_metrics: bool) -> Iterator[None]:
    try:
        if params:
            tracker.log_params(params)
        yield
        tracker.flush()
        if system_metrics:
            _await_first_system_sample(tracker)
    except (KeyboardInterrupt, Interrupted) as exc:
        tracker.set_tags({"epoch_reached": str(tracker.last_step + 1)})
        _end(tracker, "KILLED", f"interrupted: {exc or 'SIGINT'} after {tracker.last_step + 1} epoch(s)")
        raise
    except BaseException as exc:
        _end(tracker, "FAILED", str(exc) if isinstance(exc, AccelbenchError) else f"{type(exc).__name__}: {exc}")
        raise
    else:
        mlflow.end_run("FINISHED")


def log_benchmark_run(workload: str, runtime_tags: dict[str, str], name: str, tags: dict[str, str], rec: dict[str, Any],
                      series: dict[str, list[float]] | None = None) -> None:  # fmt: skip
    """One benchmark record as its own run (stage=benchmark): `tags`, what varies as params, its `bench/` metrics
    (None left out; samples/s also under the training runs' name) and each `series` metric at steps 0..n-1 (e.g.
    one value per timed repeat); the run spans the measurement (`rec["start_ms"]`); the run id goes into `rec`."""
    every = {**runtime_tags, **tags}
    params = {k: every[k] for k in BENCH_PARAMS if every.get(k) not in (None, "")}
    params["setting"] = every.get("setting") or setting_label(lambda k: str(every.get(k, "")))
    with stage_run(workload, "benchmark", runtime_tags, params, name=name, tags=tags, start_ms=rec.get("start_ms")) as run:
        for metric, values in (series or {}).items():
            for i, value in enumerate(values):
                run.log_metrics({metric: value}, step=i)
        metrics = {k: v for k, v in rec.items() if k.startswith("bench/") and v is not None}
        if "bench/samples_per_s" in metrics:
            metrics[THROUGHPUT] = metrics["bench/samples_per_s"]
        run.log_metrics(metrics)
        rec["run_id"] = run.run_id


# What a benchmark run varies, as params: MLflow's parallel-coordinates and scatter plots draw params only.
BENCH_PARAMS = ("kind", "variant", "device", "framework", "batch_size", "precision", "world_size")
THROUGHPUT = "throughput/samples_per_s"  # the training runs' name: the compare view lines both kinds up


class SilentTracker:
    """What ranks other than 0 of a data-parallel run log to: nothing; rank 0's run speaks for the group."""

    run_id = None
    last_step = -1

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        pass


@contextlib.contextmanager
def main_rank_run(is_main: bool, *args: Any, **kwargs: Any) -> Iterator[Tracker | SilentTracker]:
    """`stage_run` on rank 0 of a data-parallel run (or a single process), a SilentTracker elsewhere."""
    if not is_main:
        yield SilentTracker()
        return
    with stage_run(*args, **kwargs) as tracker:
        yield tracker


def _await_first_system_sample(tracker: Tracker, timeout_s: float = 3.0) -> None:
    """A run shorter than the sampler's first interval would end with no system metrics: wait for one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(k.startswith("system/") for k in tracker.client.get_run(tracker.run_id).data.metrics):
            return
        time.sleep(0.1)


def _end(tracker: Tracker, status: str, reason: str) -> None:
    try:
        tracker.flush()  # keep the curve up to the failure: it shows where it went wrong
        tracker.set_tags({"failure_reason": reason[:5000]})
    finally:
        mlflow.end_run(status)


def record_failure(workload: str, stage: str, exc: AccelbenchError) -> None:
    """cli.main's on_failure for stages that log runs: an error before the stage's run began (bad params) still
    leaves a FAILED trace. Runs that began end themselves; ranks other than 0 leave theirs to rank 0."""
    if RUNS_STARTED or getattr(exc, "recorded", False) or os.environ.get("RANK", "0") != "0":
        return
    if isinstance(exc, TrackingError):  # the server is what failed: there is nowhere to record it
        return
    record_failed_run(workload, stage, str(exc))


def record_failed_run(workload: str, stage: str, reason: str) -> None:
    """For failures before a stage could start its run (bad params): still leave a FAILED trace."""
    with contextlib.suppress(BaseException):
        with stage_run(workload, stage, {"device": "n/a", "framework": "n/a"}, name=f"{stage}-invalid"):
            raise AccelbenchError(reason)
