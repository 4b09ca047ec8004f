"""A team's set-up for real: one `mlflow server` (basic-auth app, database backend, proxied artifacts), two clones
of the project standing for two machines, a third clone that builds the report from the server alone.

The two machines differ the way real ones do, in what the hardware fingerprint reads: the laptop's stages run
pinned to one core (usable_cores 1), the GPU box's on all of them. The GPU box's GPU-side benchmark records are
the one thing faked (no GPU here): copies of its own CPU records, logged through the server as a GPU would log.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import optuna
import pytest
import requests

from conftest import Project, error_lines, make_project
from accelbench import tracking
from servers import MlflowServer, postgres_missing, postgres_server

TEAM_PASSWORD = "team-pw-7c41e9d2a0"  # planted: the clients' tracking password
ADMIN_PASSWORD = "admin-pw-0b5f93c1e7"  # planted: the auth app's admin, known to the server only
DB_PASSWORD = "db-pw-4e8a2d61f3"  # planted: the databases' logins
SECRETS = (TEAM_PASSWORD, ADMIN_PASSWORD, DB_PASSWORD)
TRIALS = 4  # shared by four tuning workers: two tune stages on each machine

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two machines are told apart by usable cores: needs 2")


@dataclass
class Machine:
    project: Project
    cpus: set[int]

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *args], cwd=self.project.root, env={**self.project.env, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: os.sched_setaffinity(0, self.cpus))  # fmt: skip


@dataclass
class Team:
    server: MlflowServer
    laptop: Machine
    gpubox: Machine
    reporter: Machine
    dumps: list  # callables returning each database's content as text
    logs: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    def wait(self, *procs: subprocess.Popen, ok: bool = True, timeout: float = 600) -> list[subprocess.CompletedProcess]:
        done = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            self.logs += [out, err]
            assert not ok or p.returncode == 0, f"{p.args} exited {p.returncode}\n{err[-3000:]}"
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return done

    def stage(self, machine: Machine, stage: str, **kw) -> subprocess.Popen:
        return machine.popen(f"stages/{stage}.py", "diabetes", **kw)

    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=self.server.url)

    def runs(self, filter_string: str = "") -> list:
        with as_team():
            exp = self.client().get_experiment_by_name("diabetes")
            return self.client().search_runs([exp.experiment_id], filter_string, max_results=5000) if exp else []


@contextlib.contextmanager
def as_team(password: str = TEAM_PASSWORD):
    """This test process talks to the server as the team user (MLflow reads the credentials per request)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME="team", MLFLOW_TRACKING_PASSWORD=password)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def start_server(tmp: Path, backend: str, auth_db: str) -> MlflowServer:
    """`make server`'s command with the basic-auth app: every member may read and log (default_permission EDIT)."""
    ini = tmp / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = EDIT\ndatabase_uri = {auth_db}\nadmin_username = admin\n"
                   "auth_cache_ttl_seconds = 60\n")  # fmt: skip
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}  # fmt: skip
    server = MlflowServer(backend, tmp / "artifacts", tmp / "server.log", env=env, app="basic-auth")
    server.start()
    resp = requests.post(f"{server.url}/api/2.0/mlflow/users/create", json={"username": "team", "password": TEAM_PASSWORD},
                         auth=("admin", ADMIN_PASSWORD), timeout=30)  # fmt: skip
    assert resp.status_code == 200, resp.text
    return server


@contextlib.contextmanager
def databases(tmp: Path):
    """(tracking, auth, studies) URLs on a throwaway PostgreSQL, or SQLite files where it cannot run (said so)."""
    why = postgres_missing()
    if why:
        warnings.warn(f"test_team: {why}; the team server and the shared studies use SQLite files instead")
        urls = [f"sqlite:///{tmp / name}.db" for name in ("tracking", "auth", "studies")]
        yield urls, [lambda p=Path(u[len("sqlite:///"):]): p.read_bytes().decode("latin-1") for u in urls]
        return
    with postgres_server() as pg:
        urls = [pg.database(name, f"{name}_user", DB_PASSWORD) for name in ("tracking", "auth", "studies")]
        yield urls, [lambda n=name: pg.dump(n) for name in ("tracking", "auth", "studies")]


def clone(tmp: Path, name: str, server: MlflowServer, studies: str, cpus: set[int]) -> Machine:
    project = make_project(tmp / name, ["diabetes"])
    project.env.update(MLFLOW_TRACKING_URI=server.url, MLFLOW_TRACKING_USERNAME="team", MLFLOW_TRACKING_PASSWORD=TEAM_PASSWORD)
    params = project.params()
    params["tune"].update(storage=studies, n_trials=TRIALS, prune_warmup_epochs=100)  # no pruning
    project.set_params(params)
    return Machine(project, cpus)


def leave_orphan(machine: Machine) -> None:
    """A run of this clone left RUNNING by a process that died (as under the OOM killer): the real stage_run in a
    forked child (no second start-up of the frameworks), which SIGKILLs itself inside the run."""
    pid = os.fork()
    if pid == 0:  # the child: this clone's environment, then the run, then death
        try:
            os.environ.clear()
            os.environ.update(machine.project.env, DVC_ROOT=str(machine.project.root))
            os.sched_setaffinity(0, machine.cpus)
            with tracking.stage_run("diabetes", "train", {"device": "cpu", "framework": "torch"}, name="orphan"):
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team")
    cpus = sorted(os.sched_getaffinity(0))
    with databases(tmp) as ((tracking_db, auth_db, studies), dumps):
        optuna.storages.RDBStorage(studies).engine.dispose()  # the schema, created once as on a shared server
        server = start_server(tmp, tracking_db, auth_db)
        try:
            machines = [clone(tmp, name, server, studies, set(c)) for name, c in
                        (("laptop", cpus[:1]), ("gpubox", cpus), ("reporter", cpus))]  # fmt: skip
            t = Team(server, *machines, dumps)
            run_the_study(t)
            yield t
        finally:
            server.stop()


def run_the_study(t: Team) -> None:
    """Both machines' stages against the server, the tuning of both and a training stage at once."""
    laptop, gpubox = t.laptop, t.gpubox
    t.wait(laptop.popen("stages/hardware.py"), gpubox.popen("stages/hardware.py"))  # each machine's fingerprint
    leave_orphan(laptop)
    leave_orphan(gpubox)
    t.facts["orphans_before"] = orphans(t)
    for stage in ("ingest", "eda", "prepare", "train"):  # data stages open no MLflow store; train reaps first
        t.wait(t.stage(laptop, stage))
    t.facts["orphans_after_laptop"] = orphans(t)  # the GPU box's orphan is not the laptop's to judge
    for folder in ("data/raw", "data/prepared", "results/diabetes/eda"):  # what `dvc pull` from the team's remote brings
        shutil.copytree(laptop.project.root / folder, gpubox.project.root / folder)
    t.facts["counts_before"] = status_counts(t.runs())
    at_once = [t.stage(m, "tune") for m in (laptop, laptop, gpubox, gpubox)] + [t.stage(gpubox, "train")]
    t.wait(*at_once)
    t.facts["counts_after"] = status_counts(t.runs())
    t.wait(t.stage(gpubox, "benchmark"))
    t.wait(t.stage(laptop, "benchmark"))
    t.facts["fake_gpu_runs"] = log_fake_gpu_side(t)
    [t.facts["report"]] = t.wait(t.reporter.popen("stages/report.py"))


def status_counts(runs: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in runs:
        key = f"{r.data.tags.get('stage')}/{r.info.status}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def log_fake_gpu_side(t: Team) -> list[str]:
    """The GPU box's throughput records again as `cuda` ones, 10x faster: what its GPU would have logged."""
    gpubox = str(t.gpubox.project.root)
    ids = []
    with as_team():
        client = t.client()
        for r in t.runs("tags.stage = 'benchmark' and tags.kind = 'throughput' and attributes.status = 'FINISHED'"):
            if r.data.tags["checkout"] != gpubox:
                continue
            tags = {**{k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
                    "device": "cuda", "device_name": "NVIDIA FakeGPU", "hw.gpus": "NVIDIA FakeGPU"}  # fmt: skip
            run = client.create_run(r.info.experiment_id, run_name=r.info.run_name.replace("-cpu-", "-cuda-"), tags=tags)
            for i, m in enumerate(client.get_metric_history(r.info.run_id, "bench/repeat_samples_per_s")):
                client.log_metric(run.info.run_id, m.key, 10 * m.value, step=i)
            client.log_metric(run.info.run_id, "bench/samples_per_s", 10 * r.data.metrics["bench/samples_per_s"])
            client.set_terminated(run.info.run_id, "FINISHED")
            ids.append(run.info.run_id)
    assert ids, "the GPU box logged no throughput record"
    return ids


def orphans(t: Team) -> dict[str, str]:
    """Status of each clone's orphaned run, by clone name."""
    return {Path(r.data.tags["checkout"]).name: r.info.status for r in t.runs("attributes.run_name = 'orphan'")}


def test_two_machines_one_report_pairs_each_gpu_with_its_own_cpu(team):
    laptop, gpubox = (team.runs(f"tags.stage = 'benchmark' and tags.device = 'cpu' and tags.checkout = '{m.project.root}'")
                      for m in (team.laptop, team.gpubox))  # fmt: skip
    assert laptop and gpubox
    fingerprints = [{r.data.tags["hardware"] for r in side} for side in (laptop, gpubox)]
    assert len(fingerprints[0]) == len(fingerprints[1]) == 1 and fingerprints[0] != fingerprints[1]
    assert {r.data.tags["hw.cores"] for r in laptop} == {str(os.cpu_count())}  # same box, fewer usable cores
    assert not (team.laptop.project.root / "mlruns").exists()  # nothing logged to a local store

    out = team.reporter.project.root / "reports"
    summary = json.loads((out / "summary.json").read_text())
    gpu_ids, gpubox_ids = set(team.facts["fake_gpu_runs"]), {r.info.run_id for r in gpubox}
    assert summary["has_gpu"] and summary["comparisons"]
    for comp in summary["comparisons"]:  # the GPU box's GPU against the GPU box's CPU, never the laptop's
        assert comp["gpu_run"] in gpu_ids and comp["cpu_run"] in gpubox_ids
    assert set(summary["runs"]) >= gpu_ids | gpubox_ids | {r.info.run_id for r in laptop}
    md = (out / "report.md").read_text()
    assert all(run_id in md for run_id in summary["runs"])  # it names every run it used
    assert "NVIDIA FakeGPU" in md


def test_artifacts_are_read_back_through_the_server(team):
    """EDA, model and plots, downloaded through the server (the proxy), equal the laptop's own files."""
    root = team.laptop.project.root
    expected = {"eda": root / "results/diabetes/eda", "model": root / "models/diabetes/mlp", "plots": root / "results/diabetes/plots"}
    stage_of = {"eda": "train", "model": "train", "plots": "evaluate"}  # the EDA rides on the training run
    with as_team(), tempfile.TemporaryDirectory() as tmp:
        for name, local in expected.items():
            [run] = team.runs(f"tags.stage = '{stage_of[name]}' and tags.checkout = '{root}' and tags.variant = 'mlp' "
                              "and attributes.status = 'FINISHED'")  # the model's run, not its baseline's
            assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied, not a path on the server's disk
            got = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name, dst_path=tmp,
                                                           tracking_uri=team.server.url))  # fmt: skip
            files = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
            assert files and files == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file())
            assert all((got / f).read_bytes() == (local / f).read_bytes() for f in files)


def test_concurrent_tuning_and_training_lose_no_run(team):
    """Four tuning workers (two tune stages on each machine, one shared study) and a training stage at once."""
    before, after = team.facts["counts_before"], team.facts["counts_after"]
    print(f"runs before: {before}\nruns after:  {after}")
    study = optuna.load_study(study_name="diabetes-cpu-torch", storage=team.laptop.project.params()["tune"]["storage"])
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(TRIALS))  # none lost, none duplicated, none extra
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    tunes = team.runs("tags.stage = 'tune'")
    assert len(tunes) == 4 and all(r.info.status == "FINISHED" for r in tunes)
    assert len({r.data.tags["hardware"] for r in tunes}) == 2 and len({r.data.tags["pid"] for r in tunes}) == 4
    nested = team.runs("tags.stage = 'trial'")
    assert sorted(int(r.data.tags["trial"]) for r in nested) == list(range(TRIALS))  # each trial's run exactly once
    assert all(r.info.status == "FINISHED" for r in nested)
    assert {r.data.tags["mlflow.parentRunId"] for r in nested} <= {r.info.run_id for r in tunes}
    new = {k: after.get(k, 0) - before.get(k, 0) for k in before | after}
    assert before["evaluate/FINISHED"] > 0  # the laptop's train evaluated what it trained: the GPU box's does the same
    assert new == {**{k: 0 for k in new}, "tune/FINISHED": 4, "trial/FINISHED": TRIALS, "train/FINISHED": 1,
                   "evaluate/FINISHED": before["evaluate/FINISHED"],
                   "train/KILLED": 1, "train/RUNNING": -1}  # the GPU box's orphan, reaped by its own tuning  # fmt: skip
    assert not team.runs("attributes.status = 'RUNNING'")  # at the end, the orphans included


def test_reaping_touches_only_runs_of_the_same_host_and_checkout(team):
    assert team.facts["orphans_before"] == {"laptop": "RUNNING", "gpubox": "RUNNING"}
    # the laptop's first run-logging stage reaped its own orphan and left the GPU box's (a pid there means nothing here)
    assert team.facts["orphans_after_laptop"] == {"laptop": "KILLED", "gpubox": "RUNNING"}
    assert orphans(team) == {"laptop": "KILLED", "gpubox": "KILLED"}  # the GPU box's own stage reaped its own


def test_wrong_url_or_credentials_fail_fast_in_one_line(team):
    runs_before = len(team.runs())
    cases = {"wrong URL": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}, "bad password": {"MLFLOW_TRACKING_PASSWORD": "wrong-password-123"}}
    start = time.monotonic()
    procs = [team.stage(team.laptop, "train", env=env) for env in cases.values()]
    done = team.wait(*procs, ok=False)
    elapsed = time.monotonic() - start
    for why, proc in zip(cases, done):
        lines = error_lines(proc.stderr)
        said = [ln for ln in proc.stderr.strip().splitlines() if ln not in lines]
        assert said == ["accelbench train diabetes: start"], (why, said)  # nothing but the start line besides the error
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (why, proc.stderr[-2000:])
        assert lines[0].startswith("accelbench train: error: MLFLOW_TRACKING_URI=http://127.0.0.1:")
    assert "no MLflow tracking server answered (Connection refused)" in done[0].stderr
    assert "rejected the credentials (HTTP 401)" in done[1].stderr
    assert elapsed < 60, elapsed  # before: 252 s of retries
    assert len(team.runs()) == runs_before  # no work, not even a FAILED record


def test_server_restart_mid_training_keeps_the_run_whole(team):
    """The server goes down while a training stage runs and comes back: MLflow's client retries, the stage
    finishes with every epoch's metrics; or it fails in one line with its run FAILED. Outputs stay whole."""
    machine = team.gpubox
    epochs = 60
    machine.project.update("diabetes.train.epochs", epochs)
    proc = team.stage(machine, "train")
    deadline = time.monotonic() + 120
    while not team.runs(f"tags.stage = 'train' and tags.checkout = '{machine.project.root}' and attributes.status = 'RUNNING'"):
        assert time.monotonic() < deadline and proc.poll() is None, "the training run never showed up"
        time.sleep(0.2)
    team.server.stop()
    down = time.monotonic()
    team.server.start()
    team.facts["downtime_s"] = time.monotonic() - down
    [done] = team.wait(proc, ok=False)
    run = max(team.runs(f"tags.stage = 'train' and tags.checkout = '{machine.project.root}'"), key=lambda r: r.info.start_time)
    print(f"server down {team.facts['downtime_s']:.1f} s; stage exit {done.returncode}; run {run.info.status}")
    train_json = machine.project.root / "results/diabetes/train.json"
    if done.returncode == 0:
        assert run.info.status == "FINISHED"
        with as_team():
            history = team.client().get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(epochs))
        assert json.loads(train_json.read_text())["mlp"]["train/loss"] == pytest.approx(max(history, key=lambda m: m.step).value)
    else:  # one error line after the start and read lines; the run open when the server failed it ends FAILED:
        # training's, or that of its evaluation, which follows in the same process
        assert done.returncode == 2 and len(error_lines(done.stderr)) == 1, done.stderr[-3000:]
        later = [r for r in team.runs(f"tags.checkout = '{machine.project.root}'") if r.info.start_time >= run.info.start_time]
        assert "FAILED" in {r.info.status for r in later}, [(r.info.run_name, r.info.status) for r in later]
    assert not list(machine.project.root.glob("models/.*")) and not list(machine.project.root.glob("results/diabetes/.*"))


def test_planted_passwords_are_nowhere(team):
    """Params, tags, artifacts, stage logs, the report, the clones and the server's databases.

    The one place a password may be is where its owner wrote it: the database password in the clones'
    params.yaml (tune.storage, the Optuna study's URL; MLflow records it masked)."""
    haystacks: dict[str, str] = {}
    for r in team.runs():
        haystacks[f"run {r.info.run_id} params+tags"] = json.dumps([r.data.params, r.data.tags])
    for base, label in ((team.server.artifacts, "artifact"), *((m.project.root, m.project.root.name) for m in
                        (team.laptop, team.gpubox, team.reporter))):  # fmt: skip
        for path in base.rglob("*"):
            if path.is_file() and ".git" not in path.parts and ".dvc" not in path.parts:
                haystacks[f"{label} {path}"] = path.read_bytes().decode("latin-1")
    haystacks.update({f"stage log {i}": text for i, text in enumerate(team.logs)})
    haystacks["server log"] = team.server.log.read_text()
    haystacks.update({f"database {i}": dump() for i, dump in enumerate(team.dumps)})
    assert any("stage" in k for k in haystacks) and len(haystacks) > 50
    leaks = [(name, secret) for name, text in haystacks.items() for secret in SECRETS
             if secret in text and not (secret == DB_PASSWORD and name.endswith("/params.yaml"))]  # fmt: skip
    assert not leaks, leaks
