"""Population tuning trains the same models as one-by-one training, and runs through the real tune stage."""
from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch
from sklearn.metrics import roc_auc_score

from accelbench.config import load_config, with_overrides
from accelbench.devices import Device, Runtime, seed_everything
from accelbench.engines import torch as engine
from accelbench.io import load_prepared
from accelbench.population import batched_auc, fit_population
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
    pop = fit_population(models, lrs, wds, task, prepared, epochs, params.train.batch_size, runtime)
    for i, ref in enumerate(one_by_one):
        assert pop.curves["train/loss"][-1, i].item() == pytest.approx(ref["train/loss"], rel=1e-5)
        assert pop.curves["val/roc_auc"][-1, i].item() == pytest.approx(ref["val/roc_auc"], abs=1e-6)
    assert len({round(ref["train/loss"], 4) for ref in one_by_one}) == 3  # the members really differ


def test_population_strategy_through_the_tune_stage(prepared_project):
    project = prepared_project
    original = project.params()
    try:
        project.update("diabetes.tune.strategy", "population")
        project.update("tune.n_trials", 12)
        proc = project.stage("tune")
        assert proc.returncode == 0, proc.stderr
        best = json.loads((project.root / "results/diabetes/best_params.json").read_text())["mlp"]
        assert sum(best["trials"].values()) == 12 and best["trials"]["complete"] >= 1
        study = optuna.load_study(study_name="diabetes-cpu-torch", storage=f"sqlite:///{project.root}/mlruns/optuna.db")
        mine = [t for t in study.trials if t.user_attrs.get("config_hash") == best["config_hash"]]
        assert len(mine) == 12 and best["value"] == max(t.value for t in mine if t.value is not None)
        tune = project.runs(filter_string="tags.stage = 'tune'")[0]
        trials = project.runs(filter_string=f"tags.`mlflow.parentRunId` = '{tune.info.run_id}'")
        assert len(trials) == 12 and all(r.data.tags["tune.strategy"] == "population" for r in trials)
        curve = project.client().get_metric_history(trials[0].info.run_id, "val/roc_auc")
        assert len(curve) >= 1
    finally:
        project.set_params(original)
