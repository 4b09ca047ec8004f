"""The report's statistics on known inputs, and the report built from a store this test writes itself."""
from __future__ import annotations

import json
import sys

import mlflow
import pytest
import yaml

from conftest import REPO
from accelbench import stats
from accelbench.report import build

# ---- statistics on known inputs ----


def test_median_ci_is_bounded_by_the_repeats():
    assert stats.median_ci([5.0, 5.0, 5.0]) == (5.0, 5.0)
    lo, hi = stats.median_ci([1.0, 2.0, 3.0, 4.0, 100.0])
    assert 1.0 <= lo <= 3.0 <= hi <= 100.0


def test_ratio_ci():
    assert stats.ratio_ci([4.0, 4.0], [2.0, 2.0]) == (2.0, 2.0, 2.0)
    point, lo, hi = stats.ratio_ci([9.0, 10.0, 11.0], [1.0, 1.0, 1.0])
    assert point == 10.0 and 9.0 <= lo < 10.0 < hi <= 11.0


@pytest.mark.parametrize(
    "cpu, gpu, expected",
    [([10, 10, 10], [5, 9, 30], 512), ([10, 10, 10], [11, 20, 30], 32), ([10, 10, 10], [1, 2, 3], None),
     ([10, 10, 10], [11, 9, 30], 512)],  # fmt: skip
    ids=["middle", "always", "never", "must-stay-ahead"],
)
def test_crossover(cpu, gpu, expected):
    assert stats.crossover([32, 128, 512], cpu, gpu) == expected


def test_scaling_stops():
    assert stats.scaling_stops([32, 64, 128, 256], [100, 190, 200, 205]) == 64
    assert stats.scaling_stops([32, 64], [100, 200]) is None


def test_verdicts():
    assert stats.verdict(0.476, 0.45, 0.5, 32, 512, 2048) == "the GPU is 2.1x slower at batch 32 and pays off from batch 512"
    assert stats.verdict(35.0, 30.0, 40.0, 256, 32, 2048) == "the GPU is 35.0x faster at batch 256"
    assert stats.verdict(0.5, 0.4, 0.6, 32, None, 256) == (
        "the GPU is 2.0x slower at batch 32 and does not pay off at any batch size measured (up to 256)"
    )
    assert stats.verdict(1.02, 0.9, 1.1, 32, 32, 256).startswith("the GPU and the CPU are level at batch 32")


# ---- the report from a store written here ----


def log_run(client, exp_id, name, device, device_name, hardware, batch, repeats, role="sweep", framework="torch"):
    tags = {"stage": "benchmark", "kind": "throughput", "workload": "diabetes", "variant": "mlp", "device": device,
            "device_name": device_name, "framework": framework, "precision": "fp32", "compile": "false",
            "batch_size": str(batch), "batch_role": role, "hardware": hardware, "hparams": "as in params.yaml",
            "hw.cpu": "Test CPU", "timed": "5 x 20 training steps"}  # fmt: skip
    run = client.create_run(exp_id, run_name=name, tags=tags)
    for i, v in enumerate(repeats):
        client.log_metric(run.info.run_id, "bench/repeat_samples_per_s", v, step=i)
    client.log_metric(run.info.run_id, "bench/samples_per_s", sorted(repeats)[len(repeats) // 2])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("diabetes", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, exp_id


def test_report_compares_same_host_cpu_and_gpu(store, tmp_path):
    uri, client, exp = store
    ids = {
        "cpu32": log_run(client, exp, "benchmark-cpu-torch-b32", "cpu", "Xeon", "hostA", 32, [1000, 1000, 1000], "default"),
        "cpu512": log_run(client, exp, "benchmark-cpu-torch-b512", "cpu", "Xeon", "hostA", 512, [4000, 4000, 4000]),
        "gpu32": log_run(client, exp, "benchmark-cuda-torch-b32", "cuda", "NVIDIA FakeGPU", "hostA", 32, [500, 500, 500], "default"),
        "gpu512": log_run(client, exp, "benchmark-cuda-torch-b512", "cuda", "NVIDIA FakeGPU", "hostA", 512, [40000, 40000, 40000]),
    }
    # a newer laptop CPU: must not be the GPU's comparison, the same host's CPU is
    log_run(client, exp, "benchmark-cpu-torch-b32", "cpu", "Laptop", "laptop", 32, [9000, 9000, 9000], "default")
    out = tmp_path / "reports"
    summary = build(uri, out)
    assert summary["has_gpu"]
    [comp] = summary["comparisons"]
    assert comp["speedup"] == pytest.approx(0.5) and comp["crossover"] == 512 and comp["batch"] == 32
    assert comp["cpu_run"] == ids["cpu32"] and comp["gpu_run"] == ids["gpu32"]
    assert comp["verdict"] == "the GPU is 2.0x slower at batch 32 and pays off from batch 512"
    md = (out / "report.md").read_text()
    assert "the GPU is 2.0x slower at batch 32 and pays off from batch 512" in md
    assert "NVIDIA FakeGPU" in md and "Only CPU runs" not in md
    for run_id in ids.values():
        assert run_id in md  # the report names every run it used
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<img" in html and "src='speedup.png'" not in html
    assert (out / "speedup.png").stat().st_size > 0 and (out / "sweep_diabetes.png").stat().st_size > 0


def test_cpu_only_store_says_so(store, tmp_path):
    uri, client, exp = store
    log_run(client, exp, "benchmark-cpu-torch-b32", "cpu", "Xeon", "hostA", 32, [1000, 1100, 900], "default")
    summary = build(uri, tmp_path / "reports")
    assert not summary["has_gpu"] and summary["comparisons"] == []
    md = (tmp_path / "reports" / "report.md").read_text()
    assert "Only CPU runs are in this store" in md and "1,000" in md


def test_empty_store_gets_a_clear_message_not_a_crash(tmp_path):
    from conftest import make_project

    project = make_project(tmp_path / "project")
    proc = project.run(sys.executable, "stages/report.py", check=False)
    assert proc.returncode == 2
    assert "no finished benchmark runs in this MLflow store" in proc.stderr and "Traceback" not in proc.stderr
    assert not (project.root / "reports").exists()


def tag_run(client, run_id, **tags):
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))


def log_ablation(client, exp_id, setting, tput, quality=None, skipped=None, **tags):
    base = {"stage": "benchmark", "kind": "ablation", "workload": "diabetes", "variant": "mlp", "device": "cuda",
            "device_name": "NVIDIA FakeGPU", "framework": "torch", "precision": "fp32", "compile": "false",
            "batch_size": "256", "hardware": "hostA", "setting": setting, "quality_metric": "val/roc_auc",
            "quality_epochs": "5", **tags}  # fmt: skip
    if skipped:
        base["skipped"] = skipped
    run = client.create_run(exp_id, run_name=f"ablation-cuda-torch-{setting}", tags=base)
    if tput is not None:
        client.log_metric(run.info.run_id, "bench/samples_per_s", tput)
        client.log_metric(run.info.run_id, "bench/speedup_vs_baseline", tput / 8000)
        client.log_metric(run.info.run_id, "bench/quality", quality)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_goals_pair_each_sides_tuned_batch_and_ablation_shows_what_each_option_bought(store, tmp_path):
    uri, client, exp = store
    goal = {"goal_speedup": 30, "goal_batch": "tuned", "goal_util_pct": 80}
    runs = {
        "cpu32": log_run(client, exp, "b", "cpu", "Xeon", "hostA", 32, [800] * 3, "default"),
        "cpu64": log_run(client, exp, "b", "cpu", "Xeon", "hostA", 64, [1000] * 3, "tuned"),
        "gpu32": log_run(client, exp, "b", "cuda", "NVIDIA FakeGPU", "hostA", 32, [8000] * 3, "default"),
        "gpu256": log_run(client, exp, "b", "cuda", "NVIDIA FakeGPU", "hostA", 256, [60000] * 3, "tuned"),
    }
    for run_id in runs.values():
        tag_run(client, run_id, **goal)
    client.log_metric(runs["gpu256"], "bench/gpu_util_pct", 97.0)
    log_ablation(client, exp, "baseline", 8000, 0.81)
    graphs = log_ablation(client, exp, "cuda_graphs=true", 90000, 0.81, cuda_graphs="true")
    log_ablation(client, exp, "compile_mode=max-autotune-no-cudagraphs", 12000, 0.81, compile="true",
                 compile_mode="max-autotune-no-cudagraphs")  # fmt: skip
    client.log_metric(graphs, "bench/gpu_util_pct", 96.0)
    log_ablation(client, exp, "channels_last=true", None, skipped="no 4-D weights: channels_last changes nothing")
    summary = build(uri, tmp_path / "reports")
    [goal_row] = summary["goals"]
    # the GPU's fastest setting at its own tuned batch (the graphed ablation run) against the CPU's tuned batch
    assert goal_row["speedup"] == pytest.approx(90.0) and goal_row["met"] and goal_row["util_met"]
    assert (goal_row["cpu_run"], goal_row["gpu_run"]) == (runs["cpu64"], graphs)
    assert [(a["setting"], a["speedup"]) for a in summary["ablation"]] == [
        ("baseline", 1.0), ("channels_last=true", None), ("compile_mode=max-autotune-no-cudagraphs", 1.5), ("cuda_graphs=true", 11.25)]
    md = (tmp_path / "reports" / "report.md").read_text()
    assert "## Goals: GPU against the same host's CPU" in md and "| 90.00x | yes |" in md
    assert "b64 fp32: 1,000" in md and "b256 fp32+graphs: 90,000" in md
    assert "## Ablation: what each optimisation bought" in md and "val/roc_auc 0.81 after 5 epochs" in md
    assert "no 4-D weights" in md


def test_goal_at_a_tuned_batch_that_is_also_the_default_counts_the_sweep_record(store, tmp_path):
    """A study that picked the default batch: the sweep's record there is tagged `default`, the ablation's at the
    same batch count as tuned. The CPU's fastest of them all is its side of the goal, not only the ablation's."""
    uri, client, exp = store
    goal = {"goal_speedup": 30, "goal_batch": "tuned"}
    cpu = log_run(client, exp, "b", "cpu", "Xeon", "hostA", 32, [4000] * 3, "default")
    tag_run(client, cpu, **goal)
    log_ablation(client, exp, "baseline", 3000, 0.8, device="cpu", device_name="Xeon", batch_size="32")
    gpu = log_ablation(client, exp, "all", 120000, 0.8, batch_size="32", cuda_graphs="true", compile="true",
                       compile_mode="max-autotune-no-cudagraphs")  # fmt: skip
    [row] = build(uri, tmp_path / "reports")["goals"]
    assert (row["cpu_run"], row["gpu_run"]) == (cpu, gpu) and row["speedup"] == pytest.approx(30.0) and row["met"]
    assert "b32 fp32+compile(max-autotune-no-cudagraphs)+graphs: 120,000" in (tmp_path / "reports" / "report.md").read_text()


def log_population(client, exp_id, device, device_name, hardware, trials, epochs, pop_rate, seq_rate, pop_best, seq_best):
    tags = {"stage": "benchmark", "kind": "population", "workload": "diabetes", "variant": "mlp", "device": device,
            "device_name": device_name, "framework": "torch", "precision": "fp32", "compile": "false",
            "hardware": hardware, "epochs": str(epochs), "objective": "val/roc_auc", "direction": "maximize"}  # fmt: skip
    run = client.create_run(exp_id, run_name=f"population-{device}-torch", tags=tags)
    metrics = {"population_trials": trials, "population_trials_per_s": pop_rate, "population_wall_s": trials / pop_rate,
               "sequential_trials": 8, "sequential_trials_per_s": seq_rate, "population_speedup": pop_rate / seq_rate,
               "population_best": pop_best, "population_best_same_budget": pop_best, "sequential_best": seq_best}  # fmt: skip
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, f"bench/{k}", v)
    client.set_terminated(run.info.run_id, "FINISHED")


def test_population_goals_pair_the_gpu_with_its_hosts_cpu(store, tmp_path):
    uri, client, exp = store
    log_population(client, exp, "cpu", "Xeon", "hostA", 1000, 150, 2.0, 0.04, 0.80, 0.81)
    log_population(client, exp, "cpu", "Laptop", "laptop", 1000, 150, 3.0, 0.5, 0.80, 0.81)  # newer, another host
    log_population(client, exp, "cuda", "NVIDIA FakeGPU", "hostA", 1000, 150, 50.0, 0.03, 0.82, 0.81)  # 20 s
    summary = build(uri, tmp_path / "reports")
    [goal] = summary["population"]
    assert goal["cpu"] == "Xeon" and goal["speedup_vs_cpu_sequential"] == pytest.approx(50.0 / 0.04)
    assert goal["speedup_goal_met"] and goal["wall_goal_met"] and goal["best_goal_met"]
    md = (tmp_path / "reports" / "report.md").read_text()
    assert "## Population tuning" in md and "| diabetes | mlp | NVIDIA FakeGPU | Xeon | 1,250x | yes | 1,000 x 150 | 20.00 | yes |" in md
    log_population(client, exp, "cuda", "NVIDIA FakeGPU", "hostA", 100, 150, 4.0, 0.03, 0.79, 0.81)  # newer, smaller
    [goal] = build(uri, tmp_path / "reports2")["population"]
    assert goal["speedup_goal_met"] is False and goal["wall_goal_met"] is None and goal["best_goal_met"] is False


def test_report_leads_with_the_answer_and_quality_against_the_baseline(store, tmp_path):
    """The first table: plain and best speedup, the trained model's quality beside them against its baseline."""
    uri, client, exp = store
    log_run(client, exp, "benchmark-cpu-torch-b32", "cpu", "Xeon", "hostA", 32, [1000, 1000, 1000], "default")
    log_run(client, exp, "benchmark-cpu-torch-b512", "cpu", "Xeon", "hostA", 512, [4000, 4000, 4000])
    log_run(client, exp, "benchmark-cuda-torch-b32", "cuda", "FakeGPU", "hostA", 32, [3000, 3000, 3000], "default")
    log_run(client, exp, "benchmark-cuda-torch-b512", "cuda", "FakeGPU", "hostA", 512, [40000, 40000, 40000])
    results = tmp_path / "results"
    (results / "diabetes").mkdir(parents=True)
    verdict = {"metric": "test/roc_auc", "higher_is_better": True, "model": "mlp", "model_value": 0.70,
               "baseline": "logreg", "baseline_value": 0.75, "margin": -0.05, "margin_ci95": [-0.09, -0.01],
               "beats_baseline": False, "note": ""}  # fmt: skip
    (results / "diabetes" / "evaluate.json").write_text(json.dumps({"mlp": {"test/roc_auc": 0.70}, "verdict": verdict}))
    summary = build(uri, tmp_path / "reports", results)
    [answer] = summary["answers"]
    assert answer["plain"] == pytest.approx(3.0) and answer["best"] == pytest.approx(10.0)
    assert answer["best_gpu"] == "b512 fp32" and answer["best_cpu"] == "b512 fp32"
    md = (tmp_path / "reports" / "report.md").read_text()
    first_table = md.split("## The answer", 1)[1].split("\n\n", 2)[1]
    assert "diabetes / mlp" in first_table and "3.00x" in first_table and "10.00x (GPU b512 fp32 against CPU b512 fp32)" in first_table
    assert "test/roc_auc 0.7, baseline 0.75: loses to it" in first_table
    html = (tmp_path / "reports" / "report.html").read_text()
    assert "`" not in html and "issue 9" not in html and "Only CPU runs" not in md


def test_cpu_only_report_gives_a_pasteable_gpu_command_and_is_readable_by_all(store, tmp_path):
    uri, client, exp = store
    log_run(client, exp, "benchmark-cpu-torch-b32", "cpu", "Xeon", "hostA", 32, [1000, 1100, 900], "default")
    out = tmp_path / "reports"
    build(uri, out)
    md = (out / "report.md").read_text()
    assert "```bash\ndvc exp run -S study=gpu\n```" in md
    html = (out / "report.html").read_text()
    assert "<pre><code>dvc exp run -S study=gpu</code></pre>" in html
    assert "gpu" in yaml.safe_load((REPO / "params.yaml").read_text())["studies"]  # a study the project has
    assert "`" not in html
    assert "J / 1k samples" not in md.split("## Measurements", 1)[1].split("\n\n")[1], "an always-empty column stays out"
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    for path in out.rglob("*"):
        assert oct(path.stat().st_mode & 0o777) == ("0o755" if path.is_dir() else "0o644"), path
