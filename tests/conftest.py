"""A fixture shrinks the real config and runs the real entry points in a temp git + DVC repo."""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
COPIED = ["dvc.yaml", "params.yaml", "stages", "src", "vega", ".gitignore"]
# What a stage that trains nothing must not load (sklearn: where a split uses it)
HEAVY = ("torch", "tensorflow", "keras", "pennylane", "triton", "mlflow", "optuna")


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_sessionfinish(session):
    """No warm process (preload.py) outlives the suite: the controller stops them once every worker is done."""
    if not hasattr(session.config, "workerinput"):
        subprocess.run([sys.executable, "-m", "accelbench.preload", "stop"], capture_output=True, check=False)


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Per workload, the dotted keys that make its stages take seconds, not minutes.
SMALL: dict[str, dict[str, object]] = {
    # one trial at a time: the tests of tuning's processes (workers, claims, timeouts, failing trials) tune diabetes;
    # test_population runs its populations, and quantum's stacking head tunes as populations (auto) throughout
    "diabetes": {"train.epochs": 4, "tune.strategy": "sequential"},
    "guava": {"data.count": 60, "data.size": 64, "prepare.image_size": 32, "train.epochs": 2},
    "sentiment": {
        "data.max_rows": 400, "train.epochs": 2, "model.embed_dim": 8, "model.hidden": 8, "prepare.min_freq": 1,
        "search": {"train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}},
    },  # fmt: skip
    "quantum": {"train.epochs": 3, "search": {"train.lr": {"low": 3.0e-3, "high": 3.0e-2, "log": True}}},
    # one small layer, one epoch; the search tunes lr only, so no trial picks a large model
    "stock": {"train.epochs": 1, "model.layers": 1, "model.units": 8,
              "search": {"train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}},
    "rnn": {"train.epochs": 1, "model.layers": 1, "model.units": 8,
            "search": {"train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}},
}


def shrink(params: dict) -> dict:
    """One config knob per thing that costs time: few epochs, two trials, CPU."""
    # a study's overrides apply on top of everything below: a checkout set to `study: gpu` would resize every test
    params["study"] = "quick"
    params["device"] = "cpu"
    params["cpu_threads"] = 1  # two test workers share two cores: one thread each, no oversubscription
    params["tune"].update(n_trials=2, timeout_s=120, prune_warmup_epochs=1)
    params["benchmark"].update(batch_sizes=[64], steps=3, warmup_steps=1, repeats=2, intervals=2, min_repeat_s=0.05)
    params["benchmark"]["population"] = None  # tuning twice per device: test_population switches it on, tiny
    for workload, overrides in SMALL.items():
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = params[workload]
            for key in parents:
                node = node[key]
            node[leaf] = value
    return params


@dataclass
class Project:
    root: Path
    env: dict[str, str]

    def run(self, *cmd: str, check: bool = True, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=self.root, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def stage(self, stage: str, workload: str = "diabetes") -> subprocess.CompletedProcess:
        return self.run(sys.executable, f"stages/{stage}.py", workload, check=False)

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, params: dict) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def update(self, dotted: str, value) -> None:
        params = self.params()
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
        self.set_params(params)

    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=f"sqlite:///{self.root / 'mlruns' / 'mlflow.db'}")

    def artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """A run's artifact paths, listed as MLflow's tools do: from the project root, against which the local
        store's relative artifact locations resolve (tracking.use_experiment)."""
        with contextlib.chdir(self.root):
            return [a.path for a in self.client().list_artifacts(run_id, path)]

    def runs(self, experiment: str = "diabetes", filter_string: str = "") -> list:
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], filter_string, order_by=["attributes.start_time DESC"])


def make_project(path: Path, workloads: list[str] | None = None) -> Project:
    """A temp git + DVC repo with the real stages and shrunken params; `workloads` narrows the foreach list."""
    shutil.copytree(_template(), path, dirs_exist_ok=True)
    project = Project(path, _project_env())
    params = shrink(project.params())
    if workloads:
        params["workloads"] = workloads
    project.set_params(params)
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "fixture")
    return project


@functools.cache
def _template() -> Path:
    """The repo's stages and params in a fresh git + DVC repo, made once per test process and copied for each
    project: `dvc init` and `dvc config` are two DVC start-ups, about a second of every project's set-up."""
    root = _scratch("accelbench-template-")
    root.mkdir()
    for name in COPIED:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    for cache in root.rglob("__pycache__"):
        shutil.rmtree(cache)
    template = Project(root, _project_env())
    template.run("git", "init", "-q", "-b", "main")
    template.run(sys.executable, "-m", "dvc", "init", "-q")
    template.run(sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    return root


def _scratch(prefix: str) -> Path:
    """Where a template project goes: a folder removed when the test process exits."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, True)
    return folder / "project"


def _project_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "KAGGLE_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
        PYTHONUNBUFFERED="1",
        # Overlapping stage processes (tuning workers, the benchmark child) on 2 cores: busy-waiting
        # OpenMP threads would otherwise starve each other (tests only; measurements keep the default).
        OMP_WAIT_POLICY="PASSIVE",
    )  # fmt: skip
    return env


RUN_STAGES = {"tune", "train", "benchmark"}  # the stages that log MLflow runs (train: its evaluation runs too)


def error_lines(stderr: str) -> list[str]:
    """A stage's error lines ("accelbench <stage>: error: ..."), apart from its start and progress lines."""
    return [ln for ln in stderr.splitlines() if ln.startswith("accelbench ") and ": error: " in ln]


def assert_failure_recorded(project: Project, workload: str, stage: str, reason: str) -> None:
    """A stage that logs runs ends its run FAILED with the reason; a data stage opens no store at all, so the
    one error line and the absent output are its whole record."""
    runs = project.runs(workload, f"tags.stage = '{stage}'")
    if stage in RUN_STAGES:
        assert runs and runs[0].info.status == "FAILED", runs
        assert reason in runs[0].data.tags["failure_reason"], (reason, runs[0].data.tags["failure_reason"])
    else:
        assert runs == [], f"{stage} logged {len(runs)} run(s)"


@pytest.fixture
def project(tmp_path) -> Project:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="module")
def prepared_project(tmp_path_factory) -> Project:
    """Raw and prepared data in place, for tests of the stages after them: each module its own copy of one
    project that ran `dvc repro prepare@diabetes` once per test process."""
    path = tmp_path_factory.mktemp("prepared") / "project"
    shutil.copytree(_prepared_template(), path)
    return Project(path, _project_env())


@functools.cache
def _prepared_template() -> Path:
    root = _scratch("accelbench-prepared-")
    make_project(root, ["diabetes"]).run(sys.executable, "-m", "dvc", "repro", "prepare@diabetes")
    return root
