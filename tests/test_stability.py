"""Numbers that hold twice (issue 27): interval statistics on known inputs, the host readings, the turns the
device processes take, and a benchmark stage run twice on the CPU whose report shows both runs."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from accelbench import hostload, interleave, stats

# ---- statistics on known inputs ----


def test_repeats_spread_over_intervals_and_interleaved_medians():
    assert stats.split_repeats(5, 5) == [1, 1, 1, 1, 1]
    assert stats.split_repeats(5, 2) == [3, 2]
    with pytest.raises(ValueError, match="2 repeats cannot fill 3 intervals"):
        stats.split_repeats(2, 3)
    # repeats in timing order, tagged with their interval: each interval's median, in interval order
    assert stats.interval_medians([10, 12, 11, 20, 22, 30], [0, 0, 0, 1, 1, 2]) == [11.0, 21.0, 30.0]


def test_a_planted_slow_interval_is_caught_and_flagged_with_its_cause():
    steady = [100.0, 102.0, 99.0, 101.0, 100.0]
    slow = [100.0, 102.0, 60.0, 101.0, 100.0]  # the third interval ran while another job took a core
    quiet = [{"steal_pct": 0.0, "others_cores": 0.05, "mhz": 2600.0}] * 5
    busy = quiet[:2] + [{"steal_pct": 0.0, "others_cores": 1.2, "mhz": 2600.0}] + quiet[3:]
    assert stats.relative_spread(steady) < stats.UNSTABLE_SPREAD
    assert stats.stability_flag(steady, quiet, 2, cpu_side=True) == ""
    assert math.isclose(stats.relative_spread(slow), 0.42)
    flag = stats.stability_flag(slow, busy, 2, cpu_side=True)
    assert flag.startswith("contended: other processes used up to 1.2 of 2 cores")
    assert "unstable: intervals 42% apart (likely cause: other processes used up to 1.2 of 2 cores)" in flag
    # the same spread with quiet readings: flagged, and it says no cause was measured
    assert stats.stability_flag(slow, quiet, 2, cpu_side=True) == (
        "unstable: intervals 42% apart (likely cause: no steal, other load or clock change measured)")
    stolen = [dict(q, steal_pct=12.0) for q in quiet]
    assert "steal time up to 12%" in stats.stability_flag(slow, stolen, 2, cpu_side=True)
    slowed = quiet[:2] + [dict(quiet[0], mhz=1800.0)] + quiet[3:]
    assert "CPU clock 1,800-2,600 MHz" in stats.stability_flag(slow, slowed, 2, cpu_side=True)
    # a GPU figure is not "contended" by host load, but its instability still names the load
    assert stats.stability_flag(steady, busy, 2, cpu_side=False) == ""


def test_speedup_ci_is_built_from_the_intervals():
    # a slow spell hit both sides in interval 2: paired intervals cancel it, the speedup is exactly 10x
    cpu = [100.0, 100.0, 50.0, 100.0, 100.0]
    gpu = [1000.0, 1000.0, 500.0, 1000.0, 1000.0]
    point, lo, hi = stats.interval_ratio_ci(gpu, cpu)
    assert math.isclose(point, 10.0) and math.isclose(lo, 10.0) and math.isclose(hi, 10.0)
    # intervals that disagree widen the CI: a t-interval over 5 log ratios (t = 2.776 at 4 degrees of freedom)
    gpu = [1000.0, 1100.0, 900.0, 1000.0, 1000.0]
    point, lo, hi = stats.interval_ratio_ci(gpu, [100.0] * 5)
    logs = [math.log(g / 100.0) for g in gpu]
    mean = sum(logs) / 5
    sem = math.sqrt(sum((x - mean) ** 2 for x in logs) / 4 / 5)
    assert math.isclose(point, math.exp(mean))
    assert math.isclose(lo, math.exp(mean - 2.7764451 * sem), rel_tol=1e-6)
    assert math.isclose(hi, math.exp(mean + 2.7764451 * sem), rel_tol=1e-6)
    assert lo < 9.5 and hi > 10.5
    # one interval a side: no between-interval spread to build a CI from
    assert stats.interval_ratio_ci([1000.0], [100.0]) == (10.0, 10.0, 10.0)


def test_agreement_between_runs():
    assert math.isclose(stats.agreement(100.0, 115.0), 0.15)
    assert stats.agreement(300.0, 100.0) == 2.0  # the 303x against 111x: far outside 15%


# ---- the host readings ----


def test_bf16_only_where_the_cpu_computes_it_natively():
    assert hostload.native_bf16("flags\t: fpu sse avx512f avx512_bf16 amx_tile\n") is None
    assert hostload.native_bf16("flags\t: fpu sse amx_bf16\n") is None
    assert "no native bf16" in hostload.native_bf16("flags\t: fpu sse avx2 avx512f\n")


def test_probe_sees_another_process_load_the_cores():
    """A busy loop in another process while this one sleeps: the probe reads it as other load, not ours."""
    probe = hostload.HostProbe()
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    time.sleep(0.3)  # past its start-up
    probe.begin()
    time.sleep(1.0)
    probe.end()
    burner.wait()
    (reading,) = probe.readings
    assert reading["others_cores"] >= 0.7  # the burner's core (other engineers' jobs may add more)
    assert reading["ours_cores"] < 0.2  # this process slept
    assert reading["steal_pct"] is None or reading["steal_pct"] >= 0.0
    assert hostload.physical_cores() >= 1


# ---- turns between the device processes ----

CHILD = """
import sys
from accelbench import interleave
turn = interleave.turn()
turn.wait()
for k in range(3):
    with open(sys.argv[1], "a") as f:
        f.write(f"{sys.argv[2]}{k} ")
    turn.hand_on()
"""


def test_device_processes_take_turns_interval_by_interval(tmp_path):
    log = tmp_path / "order.txt"
    cmds = [[sys.executable, "-c", CHILD, str(log), name] for name in ("cpu", "gpu")]
    results = interleave.run_in_turns(cmds, tmp_path, dict(__import__("os").environ))
    assert [code for code, _ in results] == [0, 0]
    assert log.read_text().split() == ["cpu0", "gpu0", "cpu1", "gpu1", "cpu2", "gpu2"]


def test_a_failing_device_process_ends_the_others(tmp_path):
    failing = "from accelbench import interleave\ninterleave.turn().wait()\nraise SystemExit(3)"
    cmds = [[sys.executable, "-c", failing], [sys.executable, "-c", CHILD, str(tmp_path / "x.txt"), "gpu"]]
    results = interleave.run_in_turns(cmds, tmp_path, dict(__import__("os").environ))
    assert [code for code, _ in results] == [3]  # the other never took a turn: ended, left out
    assert not (tmp_path / "x.txt").exists()


# ---- a stage run twice on the CPU ----


def test_benchmark_run_twice_on_the_cpu_reports_both_runs_and_their_agreement(prepared_project):
    project = prepared_project
    original = project.params()
    try:
        project.update("diabetes.benchmark.value", None)  # throughput only: what the two runs compare
        project.update("benchmark.compute_ceiling", False)
        project.update("benchmark.repeats", 3)
        project.update("benchmark.intervals", 3)
        for _ in range(2):
            proc = project.stage("benchmark")
            assert proc.returncode == 0, proc.stderr
        records = json.loads((project.root / "results/diabetes/benchmark.json").read_text())["records"]
        tput = [r for r in records if r["kind"] == "throughput"]
        assert tput and all(len(r["intervals_samples_per_s"]) == 3 and len(r["host_readings"]) == 3 for r in tput)
        assert all(r["cpu_threads"] == 1 for r in tput)  # the fixture's cpu_threads: 1 wins over the physical cores
        assert {r["omp_wait_policy"] for r in tput} == {"PASSIVE"}  # the thread environment, recorded
        proc = project.run(sys.executable, "stages/report.py")
        md = (project.root / "reports/report.md").read_text()
        summary = json.loads((project.root / "reports/summary.json").read_text())
    finally:
        project.set_params(original)
    assert "## Stability: intervals, host load and run-to-run agreement" in md
    assert "Two runs of the study are in this store" in md
    agreement = summary["agreement"]
    assert {a["batch"] for a in agreement} == {r["batch_size"] for r in tput}
    for a in agreement:
        assert a["previous"] > 0 and a["latest"] > 0 and a["previous"] != a["latest"]  # two measurements, not one twice
        assert a["agree"] == (a["difference"] <= 0.15)
        verdict = "yes" if a["agree"] else f"⚠ no: the runs differ by {100 * a['difference']:.0f}%"
        assert verdict in md
    latest = {r["batch_size"]: r["bench/samples_per_s"] for r in tput}
    assert {a["batch"]: a["latest"] for a in agreement} == latest
    for r in tput:  # the flag each record earned is beside its figure
        if r["flag"]:
            assert r["flag"] in md


# ---- the report from a store with two runs of the study, CPU and GPU ----


def _log(client, exp_id, device, session, intervals, flag=""):
    name = "Xeon" if device == "cpu" else "NVIDIA FakeGPU"
    tags = {"stage": "benchmark", "kind": "throughput", "workload": "diabetes", "variant": "mlp", "device": device,
            "device_name": name, "framework": "torch", "precision": "fp32", "compile": "false", "batch_size": "32",
            "batch_role": "default", "hardware": "hostA", "hparams": "as in params.yaml", "bench_session": session, "flag": flag}  # fmt: skip
    run = client.create_run(exp_id, run_name=f"benchmark-{device}-torch-b32", tags=tags)
    for i, v in enumerate(intervals):
        client.log_metric(run.info.run_id, "bench/repeat_samples_per_s", v, step=i)
        client.log_metric(run.info.run_id, "bench/interval_samples_per_s", v, step=i)
    client.log_metric(run.info.run_id, "bench/samples_per_s", sorted(intervals)[len(intervals) // 2])
    client.log_metric(run.info.run_id, "bench/interval_spread", stats.relative_spread(intervals))
    client.set_terminated(run.info.run_id, "FINISHED")


def test_report_speedup_ci_from_intervals_and_the_two_runs_agreement(tmp_path):
    import mlflow

    from accelbench.report import build

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("diabetes", artifact_location=(tmp_path / "artifacts").as_uri())
    _log(client, exp, "cpu", "run1", [100.0, 100.0, 100.0])
    _log(client, exp, "cuda", "run1", [1000.0, 1000.0, 1000.0])
    time.sleep(0.01)  # the second run starts later
    cpu2, gpu2 = [100.0, 40.0, 100.0], [1200.0, 480.0, 1250.0]  # a slow spell in interval 2 hit both sides
    flag = stats.stability_flag(cpu2, [{"others_cores": 1.5}] * 3, 2, cpu_side=True)
    _log(client, exp, "cpu", "run2", cpu2, flag)
    _log(client, exp, "cuda", "run2", gpu2)
    summary = build(uri, tmp_path / "reports")
    md = (tmp_path / "reports/report.md").read_text()
    (comp,) = summary["comparisons"]
    assert comp["ci_from"] == "intervals"
    point, lo, hi = stats.interval_ratio_ci(gpu2, cpu2)
    assert comp["speedup"] == pytest.approx(point) and comp["ci95"] == pytest.approx([lo, hi])
    _, unpaired_lo, unpaired_hi = stats.ratio_ci(gpu2, cpu2)
    assert 11 < lo < point < hi < 13.5 and unpaired_hi - unpaired_lo > 2 * (hi - lo)  # paired: the slow spell cancels
    assert "100 ⚠ contended+unstable" in md  # the flag beside the CPU figure
    rows = {a["figure"]: a for a in summary["agreement"]}
    assert rows["Xeon samples/s"]["agree"] and rows["Xeon samples/s"]["difference"] == 0.0
    assert rows["NVIDIA FakeGPU samples/s"]["previous"] == 1000.0 and rows["NVIDIA FakeGPU samples/s"]["latest"] == 1200.0
    assert not rows["NVIDIA FakeGPU samples/s"]["agree"]  # 20% apart
    assert rows["GPU/CPU speedup"]["previous"] == pytest.approx(10.0)
    assert rows["GPU/CPU speedup"]["latest"] == pytest.approx(point)
    assert "⚠ no: the runs differ by 20%" in md
