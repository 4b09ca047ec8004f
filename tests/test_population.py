"""Population tuning trains the same models as one-by-one training, and runs through the real tune stage."""
from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch
from sklearn.metrics import roc_auc_score

from accelbench.config import with_overrides
from accelbench.project import load_config
from accelbench.devices import Device, Runtime, seed_everything
from accelbench.engines import torch as engine
from accelbench.io import load_prepared
from accelbench.population import Population, batched_auc, fit_population
from accelbench.report import build
from accelbench.workloads import get_workload


def test_batched_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=(5, 200)) + y, 1)  # rounding makes ties
    ours = batched_auc(torch.tensor(scores), torch.tensor(y, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(ours, [roc_auc_score(y, s) for s in scores], atol=1e-6)


def test_population_reaches_the_same_models_as_one_by_one(prepared_project):
    """Tolerance: the same float32 arithmetic per member; vmap only batches the matmuls, so summation
    order may differ: rounding of ~1e-7 relative per op over 6 epochs x 11 steps stays far below 1e-5."""
    root = prepared_project.root
    wl = get_workload("diabetes")
    params = load_config(root / "params.yaml").params("diabetes")
    prepared = load_prepared(root / "data/prepared/diabetes")
    task = wl.task(prepared.meta)
    runtime = Runtime(Device("cpu", 0, "cpu"), "torch", seed=42)
    lrs, wds, epochs = [1e-3, 3e-3, 1e-2], [0.0, 0.01, 0.001], 6
    one_by_one = []
    for lr, wd in zip(lrs, wds):
        p = with_overrides(params, {"train.lr": lr, "train.weight_decay": wd, "model.dropout": 0.0, "train.epochs": epochs})
        seed_everything(42, "torch")
        one_by_one.append(engine.fit(wl.build_model("torch", p, prepared.meta), task, prepared, p.train, runtime).history[-1])
    models = []
    for _ in lrs:
        seed_everything(42, "torch")
        models.append(wl.build_model("torch", with_overrides(params, {"model.dropout": 0.0}), prepared.meta))
    pop = fit_population(Population(models, lrs, wds), task, prepared, epochs, params.train.batch_size, runtime)
    for i, ref in enumerate(one_by_one):
        assert pop.curves["train/loss"][-1, i].item() == pytest.approx(ref["train/loss"], rel=1e-5)
        assert pop.curves["val/roc_auc"][-1, i].item() == pytest.approx(ref["val/roc_auc"], abs=1e-6)
    assert len({round(ref["train/loss"], 4) for ref in one_by_one}) == 3  # the members really differ


def test_one_model_with_member_dropout_rates_is_the_population_of_each_members_build(prepared_project):
    """The tune stage stacks one seeded model N times and gives each member its dropout rate: the same
    population, draw for draw, as building each member with its own rate."""
    root = prepared_project.root
    wl = get_workload("diabetes")
    params = load_config(root / "params.yaml").params("diabetes")
    prepared = load_prepared(root / "data/prepared/diabetes")
    runtime = Runtime(Device("cpu", 0, "cpu"), "torch", seed=42)
    rates, lrs, wds = [0.0, 0.3, 0.0], [3e-3] * 3, [0.0] * 3
    built = []
    for rate in rates:
        seed_everything(42, "torch")
        built.append(wl.build_model("torch", with_overrides(params, {"model.dropout": rate}), prepared.meta))
    seed_everything(42, "torch")
    one = wl.build_model("torch", params, prepared.meta)
    task = wl.task(prepared.meta)
    seed_everything(7, "torch")  # the dropout draws: the same stream for both
    a = fit_population(Population(built, lrs, wds), task, prepared, 3, 32, runtime).curves["train/loss"]
    seed_everything(7, "torch")
    b = fit_population(Population([one] * 3, lrs, wds, dropout=rates), task, prepared, 3, 32, runtime).curves["train/loss"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert b[-1, 0] == b[-1, 2] and b[-1, 1] != b[-1, 0]  # the rate, not the position, sets a member's path


def test_population_strategy_through_the_tune_stage(prepared_project):
    project = prepared_project
    original = project.params()
    try:
        project.update("diabetes.tune.strategy", "population")
        project.update("tune.n_trials", 12)
        project.update("tune.workers", 3)  # sequential studies only: a population is one stacked model in one process
        proc = project.stage("tune")
        assert proc.returncode == 0, proc.stderr
        assert "diabetes-cpu-torch: a population study runs in one process; tune.workers (3)" in proc.stderr, proc.stderr
        assert "Warning" not in proc.stderr, proc.stderr  # Optuna warned of heartbeats on every ask
        best = json.loads((project.root / "results/diabetes/best_params.json").read_text())["mlp"]
        assert sum(best["trials"].values()) == 12 and best["trials"]["complete"] >= 1
        study = optuna.load_study(study_name="diabetes-cpu-torch", storage=f"sqlite:///{project.root}/mlruns/optuna.db")
        mine = [t for t in study.trials if t.user_attrs.get("config_hash") == best["config_hash"]]
        assert len(mine) == 12 and best["value"] == max(t.value for t in mine if t.value is not None)
        tune = project.runs(filter_string="tags.stage = 'tune'")[0]
        trials = project.runs(filter_string=f"tags.`mlflow.parentRunId` = '{tune.info.run_id}'")
        assert len(trials) == 12 and all(r.data.tags["tune.strategy"] == "population" for r in trials)
        assert {r.data.tags["pid"] for r in trials} == {tune.data.tags["pid"]} and tune.data.params["tune.workers"] == "1"
        for r in trials:  # each spans the training its population shared, though logged after it
            fit_ms = 1000 * float(r.data.tags["population.fit_s"])
            assert fit_ms > 0 and abs(r.info.end_time - r.info.start_time - fit_ms) <= 1, r.info.run_name
        curve = project.client().get_metric_history(trials[0].info.run_id, "val/roc_auc")
        assert len(curve) >= 1
    finally:
        project.set_params(original)


def test_benchmark_times_population_against_sequential_tuning(prepared_project):
    project = prepared_project
    original = project.params()
    try:
        project.update("benchmark.population", {"trials": 9, "sequential_trials": 2, "epochs": 3, "cpu_trials": 6})
        project.update("benchmark.compute_ceiling", False)  # the stage's other measurements, as small as they go
        project.update("diabetes.benchmark.value", None)
        proc = project.stage("benchmark")
        assert proc.returncode == 0, proc.stderr
        assert "[I " not in proc.stderr  # Optuna's INFO lines (a throwaway study created, each trial finished) stay filtered
        records = json.loads((project.root / "results/diabetes/benchmark.json").read_text())["records"]
        [rec] = [r for r in records if r["kind"] == "population"]
        assert rec["epochs"] == "3" and rec["objective"] == "val/roc_auc" and rec["device"] == "cpu"
        assert rec["bench/population_trials"] == 6 and rec["bench/sequential_trials"] == 2
        for strategy in ("population", "sequential"):
            assert rec[f"bench/{strategy}_trials_per_s"] == pytest.approx(rec[f"bench/{strategy}_trials"] / rec[f"bench/{strategy}_wall_s"])
            assert 0.5 < rec[f"bench/{strategy}_best"] <= 1  # a validation ROC AUC better than chance
        assert rec["bench/population_best_same_budget"] <= rec["bench/population_best"]  # 2 trials of the 6-trial search space
        assert rec["bench/population_fit_s"] < rec["bench/population_wall_s"] and rec["bench/population_log_s"] > 0
        run = project.client().get_run(rec["run_id"])
        assert run.data.tags["stage"] == "benchmark" and run.data.tags["kind"] == "population"
        assert run.data.metrics["bench/population_speedup"] == pytest.approx(rec["bench/population_speedup"])
        trials = project.runs(filter_string=f"tags.`mlflow.parentRunId` = '{rec['run_id']}'")
        strategies = [r.data.tags.get("tune.strategy", "sequential") for r in trials]
        assert strategies.count("population") == 6 + 2 and len(trials) == 6 + 2 + 2  # the same-budget population too
        for r, strategy in zip(trials, strategies):  # population curves: the epochs reported to Optuna (the last of 3)
            steps = [m.step for m in project.client().get_metric_history(r.info.run_id, "val/roc_auc")]
            assert sorted(steps) == ([2] if strategy == "population" else [0, 1, 2])
        build(f"sqlite:///{project.root / 'mlruns' / 'mlflow.db'}", project.root / "reports")  # the report stage's work
        md = (project.root / "reports/report.md").read_text()
        section = md.split("## Population tuning", 1)[1].split("\n## ", 1)[0]
        assert f"| diabetes | mlp | {rec['device_name']} | 3 | 6 |" in section and "extrapolated" in section
    finally:
        project.set_params(original)


def test_bad_population_benchmark_size_names_the_key(tmp_path):
    import yaml

    from accelbench.errors import ConfigError
    from conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["study"] = "quick"  # the GPU study's own population would hide the bad size of a checkout set to it
    params["benchmark"]["population"]["sequential_trials"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"params.yaml: benchmark.population: expected trials, sequential_trials, epochs and cpu_trials >= 1"):
        load_config(tmp_path / "params.yaml")
