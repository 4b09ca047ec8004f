"""Bad input: one clear line naming what and where, a non-zero exit, no outputs, a FAILED run with the reason
(where the stage logs runs)."""
from __future__ import annotations

import shutil

import pytest

from conftest import FIXTURES, assert_failure_recorded, error_lines, has_cuda

GOOD = (FIXTURES / "diabetes.csv").read_text()


def rewrite_header(old: str, new: str) -> str:
    header, rest = GOOD.split("\n", 1)
    return header.replace(old, new) + "\n" + rest


def assert_failed_cleanly(project, proc, stage: str, *needles: str, output: str | None = None) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if output:
        assert not (project.root / output).exists(), f"{output} left behind"
        leftovers = [p.name for p in (project.root / output).parent.glob(".*")] if (project.root / output).parent.exists() else []
        assert not [p for p in leftovers if p.startswith("." + (project.root / output).name)], leftovers
    for needle in needles:
        assert_failure_recorded(project, "diabetes", stage, needle)
    return lines[0]


@pytest.mark.parametrize(
    "content, needles",
    [
        (None, ["missing.csv", "file not found"]),
        ("", ["bad.csv", "file is empty"]),
        (rewrite_header(",Insulin,", ","), ["bad.csv", "missing column 'Insulin'"]),
        (rewrite_header("Glucose", "Glucse"), ["bad.csv", "missing column 'Glucose'", "found 'Glucse'"]),
        (GOOD.replace("\n6,148,", "\n6,abc,", 1), ["bad.csv", "column 'Glucose', row 2", "'abc' is not a number"]),
        (GOOD.split("\n", 1)[0] + "\n", ["bad.csv", "no rows"]),
        (GOOD.replace(",50,1\n", ",50,2\n", 1), ["bad.csv", "column 'Outcome'", "expected 0 or 1"]),
    ],
    ids=["missing-file", "empty-file", "missing-column", "misspelt-column", "non-numeric", "header-only", "bad-label"],
)
def test_bad_kaggle_csv(project, content, needles):
    path = project.root / ("missing.csv" if content is None else "bad.csv")
    if content is not None:
        path.write_text(content)
    project.update("diabetes.data.source", "path")
    project.update("diabetes.data.path", str(path))
    proc = project.stage("ingest")
    assert_failed_cleanly(project, proc, "ingest", *needles, output="data/raw/diabetes")


def test_good_kaggle_csv_is_read_with_zeros_as_missing(project):
    project.update("diabetes.data.source", "path")
    project.update("diabetes.data.path", str(FIXTURES / "diabetes.csv"))
    assert project.stage("ingest").returncode == 0
    assert project.stage("prepare").returncode == 0
    import json

    meta = json.loads((project.root / "data/prepared/diabetes/meta.json").read_text())
    assert meta["dropped_features"] == []
    assert sum(meta["missing_in_train"].values()) > 0  # the fixture's zeros were counted as missing


def test_class_missing_from_training_split(project):
    rows = GOOD.strip().split("\n")
    positives = [r for r in rows[1:] if r.endswith(",1")]
    negatives = [r for r in rows[1:] if r.endswith(",0")]
    (project.root / "few.csv").write_text("\n".join([rows[0], *negatives, *positives[:2]]) + "\n")
    project.update("diabetes.data.source", "path")
    project.update("diabetes.data.path", str(project.root / "few.csv"))
    assert project.stage("ingest").returncode == 0
    proc = project.stage("prepare")
    assert_failed_cleanly(project, proc, "prepare", "diabetes.csv", "class 1 has 2 row(s)", output="data/prepared/diabetes")


def test_unknown_workload(project):
    proc = project.stage("ingest", "diabetis")
    assert proc.returncode == 2
    assert "unknown workload 'diabetis'" in proc.stderr and "diabetes" in proc.stderr


@pytest.mark.parametrize(
    "dotted, value, needles",
    [
        ("diabetes.model.hiden", [4], ["diabetes.model.hiden: unknown key", "hidden"]),
        ("framework", "jax", ["framework: 'jax' is not one of", "torch"]),
        ("tune.n_trials", "ten", ["tune.n_trials: expected int"]),
    ],
    ids=["misspelt-key", "unknown-framework", "wrong-type"],
)
def test_bad_params(project, dotted, value, needles):
    project.update(dotted, value)
    proc = project.stage("ingest")
    line = assert_failed_cleanly(project, proc, "ingest", "params.yaml", *needles, output="data/raw/diabetes")
    assert line.count("\n") == 0


@pytest.mark.parametrize(
    "device, needles",
    [("gpu0", ["device: 'gpu0' is not one of cpu, cuda, cuda:N, auto"]), ("cuda:7", ["device: 'cuda:7' requested"])],
    ids=["unknown-device", "absent-gpu"],
)
def test_bad_device(prepared_project, device, needles):
    project = prepared_project
    original = project.params()
    try:
        project.update("device", device)
        proc = project.stage("tune")
        assert_failed_cleanly(project, proc, "tune", *needles, output="results/diabetes/best_params.json")
    finally:
        project.set_params(original)


@pytest.mark.skipif(has_cuda(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_an_error_not_a_cpu_run(prepared_project):
    project = prepared_project
    original = project.params()
    try:
        project.update("device", "cuda")
        proc = project.stage("train")
        assert_failed_cleanly(project, proc, "train", "device: 'cuda' requested", "sees no CUDA GPU", output="models/diabetes")
        assert not project.runs(filter_string="tags.stage = 'train' and attributes.status = 'FINISHED'")
    finally:
        project.set_params(original)


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_nan_loss_fails_training(prepared_project, framework):
    project = prepared_project
    original = project.params()
    try:
        project.update("framework", framework)
        project.update("diabetes.train.lr", 1.0e30)
        shutil.rmtree(project.root / "models", ignore_errors=True)
        proc = project.stage("train")
        assert_failed_cleanly(project, proc, "train", "training loss became nan", "lr=1e+30", output="models/diabetes")
        assert not (project.root / "results/diabetes/train.json").exists()
    finally:
        project.set_params(original)


def test_bad_ablation_entry_fails_the_benchmark_stage_cleanly(prepared_project):
    project = prepared_project
    original = project.params()
    try:
        project.update("benchmark.ablation", ["precision=fp64"])
        proc = project.stage("benchmark")
        assert_failed_cleanly(project, proc, "benchmark", "benchmark", "'precision=fp64' is not one of precision=fp32|bf16|fp16",
                              output="results/diabetes/benchmark.json")  # fmt: skip
    finally:
        project.set_params(original)



def test_a_failing_benchmark_child_is_reported_once_and_its_sibling_ended_quietly(prepared_project):
    """Two device children taking turns: the CPU's measures, the absent GPU's fails on its first turn. Their lines
    reach the stage's stderr as they come, but the failing child's error line only once, as the stage's own; the
    CPU child, ended for it, adds no line of its own ending."""
    project = prepared_project
    original = project.params()
    try:
        project.update("benchmark.devices", ["cpu", "cuda:7"])
        proc = project.stage("benchmark")
        assert_failed_cleanly(project, proc, "benchmark", "params.yaml: benchmark.devices: 'cuda:7' requested",
                              output="results/diabetes/benchmark.json")  # fmt: skip
        assert "accelbench benchmark diabetes: read data/prepared/diabetes" in proc.stderr  # the CPU child, live
        assert "interrupted" not in proc.stderr
    finally:
        project.set_params(original)

def test_ablation_options_that_do_not_apply_say_why_and_the_rest_are_measured(prepared_project, tmp_path):
    """Not an error, but the same promise: cuda_graphs on the CPU and channels_last on an MLP are recorded no-ops with
    their reason; bf16 is timed beside the quality of a training run under it (the benchmark stage's child, on the CPU)."""
    import json
    import sys

    project = prepared_project
    original = project.params()
    try:
        project.update("cuda_graphs", True)
        project.update("diabetes.benchmark.value", None)  # no time to target: the ablation is what is tested
        bench = {**original["benchmark"], "ablation": ["precision=bf16", "channels_last=true"], "ablation_epochs": 2,
                 "ablation_devices": ["cpu"], "batch_sizes": [], "compute_ceiling": False}  # fmt: skip
        project.update("benchmark", bench)
        out = tmp_path / "records.json"
        project.run(sys.executable, "-m", "accelbench.benchmark", "diabetes", "torch", "cpu", str(out))
    finally:
        project.set_params(original)
    records = json.loads(out.read_text())
    [tput] = [r for r in records if r["kind"] == "throughput"]
    assert tput["cuda_graphs"] == "true" and tput["cuda_graphs_applied"] == "n/a: not a CUDA device"
    assert "bench/gpu_util_pct" not in tput  # absent on the CPU, not a zero
    ablation = {r["setting"]: r for r in records if r["kind"] == "ablation"}
    assert list(ablation) == ["baseline", "precision=bf16", "channels_last=true"]  # one option applies: no "all"
    base, bf16 = ablation["baseline"], ablation["precision=bf16"]
    assert base["bench/speedup_vs_baseline"] == 1.0 and (base["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert bf16["bench/speedup_vs_baseline"] == pytest.approx(bf16["bench/samples_per_s"] / base["bench/samples_per_s"])
    for rec in (base, bf16):
        assert rec["quality_metric"] == "val/roc_auc" and rec["quality_epochs"] == 2 and 0.0 <= rec["bench/quality"] <= 1.0
        assert rec["cuda_graphs_applied"] == "n/a: not a CUDA device"
    assert ablation["channels_last=true"]["skipped"].startswith("no 4-D weights")  # an MLP: nothing to lay out
    runs = project.runs(filter_string="tags.kind = 'ablation'")
    assert {r.data.tags["setting"]: r.data.tags.get("skipped", "")[:14] for r in runs} == {
        "baseline": "", "precision=bf16": "", "channels_last=true": "no 4-D weights"}
