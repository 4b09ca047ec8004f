"""Data-parallel training without GPUs: torch DDP over 2 gloo CPU ranks launched by the real train stage
(torchrun), TensorFlow MirroredStrategy over 2 logical CPU devices, the scaling benchmark at 1 and 2 ranks,
and the workloads that stay on one device.

Why the tolerance is tight: with dropout off and the global batch split exactly (108 training windows, even),
a 2-rank step averages two half-batch mean gradients, which is the full-batch mean gradient; the ranks see
the very batches the single process sees (one shared permutation, interleaved shards). What remains is
float32 summation order, ~1e-7 relative per step, which 3 epochs of AdamW do not grow past 1e-4. A wrong
shard (a rank skipping or repeating samples), a missing all-reduce or a lr/batch rule applied twice moves
the validation loss by whole percents.
"""
from __future__ import annotations

import json

import pytest

from accelbench.config import DistributedConfig, TrainParams
from accelbench.project import load_config
from accelbench.errors import ConfigError

from conftest import make_project
from test_stock import prepared, use_google_files

EPOCHS = 3
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    """stock on the Google fixture, prepared in this process (test_stock runs those stages); dropout off (see above)."""
    from accelbench.io import save_prepared
    from accelbench.workloads import get_workload

    project = make_project(tmp_path_factory.mktemp("dp") / "project", ["stock", "diabetes", "quantum"])
    # levels, not the default daily moves: on moves the ranks' other summation order drifted past TOLERANCE within
    # three epochs; what this test pins is the data-parallel path, whatever the target
    use_google_files(project, **{"model.dropout": 0.0, "train.epochs": EPOCHS, "train.batch_size": 16,
                                 "prepare.predict": "level"})  # fmt: skip
    wl = get_workload("stock")
    cfg = load_config(project.root / "params.yaml")
    save_prepared(project.root / "data/prepared/stock", prepared(wl, cfg.params("stock"), project.root / "data/raw/stock"))
    return project


def single_process(project, framework: str) -> list[dict[str, float]]:
    """The same training as the train stage's, in this process, on one device: the reference history."""
    from accelbench import pipeline
    from accelbench.engines import get_engine
    from accelbench.runtime import runtime_for
    from accelbench.io import load_prepared
    from accelbench.workloads import get_workload

    cfg = load_config(project.root / "params.yaml")
    wl = get_workload("stock")
    runtime = runtime_for(cfg, wl)  # seeds as the stage does
    assert runtime.world_size == 1
    prepared = load_prepared(project.root / "data/prepared/stock")
    params, _ = pipeline.variant_params(cfg, wl, project.root)["lstm"]
    wl.run_tags(params, runtime)  # the stage's cuDNN probe runs before the model is built: same RNG stream
    model = wl.build_model(framework, params, prepared.meta)
    return get_engine(framework).fit(model, wl.task(prepared.meta), prepared, params.train, runtime).history


def train_runs(project) -> list:
    return project.runs("stock", "tags.stage = 'train'")


def test_ddp_two_gloo_ranks_train_like_one_process(dp):
    dp.update("distributed.gpus", 2)
    proc = dp.stage("train", "stock")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((dp.root / "results/stock/train.json").read_text())["lstm"]

    runs = train_runs(dp)  # rank 0 alone logs: one run, no trace from rank 1
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    tags = runs[0].data.tags
    assert (tags["world_size"], tags["dist.backend"], tags["dist.global_batch"], tags["dist.lr"]) == ("2", "gloo", "16", "0.001")
    ranks = tags["dist.devices"].split("; ")
    assert [r.split(":", 1)[0] for r in ranks] == ["0", "1"] and all("/cpu " in r for r in ranks)
    assert runs[0].data.metrics["val/loss"] == pytest.approx(trained["val/loss"])

    # outputs written once, by rank 0: no stray temp folders, one history row per epoch
    assert sorted(p.name for p in (dp.root / "models/stock").iterdir()) == ["lstm"]
    assert [p.name for p in (dp.root / "models").iterdir()] == ["stock"]
    assert len((dp.root / "results/stock/history/lstm.csv").read_text().splitlines()) == 1 + EPOCHS
    # then the stage's own process, not a rank, evaluated rank 0's saved model: once
    evaluated = json.loads((dp.root / "results/stock/evaluate.json").read_text())
    assert 0 < evaluated["lstm"]["test/rmse"] < float("inf") and "persistence" in evaluated
    assert len(dp.runs("stock", "tags.stage = 'evaluate' and tags.variant = 'lstm'")) == 1

    dp.update("distributed.gpus", 1)
    reference = single_process(dp, "torch")
    assert trained["val/loss"] == pytest.approx(reference[-1]["val/loss"], rel=TOLERANCE)
    assert trained["train/loss"] == pytest.approx(reference[-1]["train/loss"], rel=TOLERANCE)
    assert reference[-1]["train/loss"] < reference[0]["train/loss"]  # it learned: the match is not two flat lines


def test_a_failure_in_every_rank_is_one_error_line(dp):
    """Both ranks diverge alike: the stage prints the first rank's error once, not once per rank and again."""
    from conftest import error_lines

    original = dp.params()
    try:
        dp.update("distributed.gpus", 2)
        dp.update("stock.train.lr", 1.0e30)
        proc = dp.stage("train", "stock")
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = error_lines(proc.stderr)
        assert len(errors) == 1 and "training loss became nan" in errors[0], proc.stderr[-3000:]
    finally:
        dp.set_params(original)


def test_tensorflow_mirrored_over_two_logical_cpus_trains_like_one_device(dp):
    params = dp.params()
    params["framework"] = "tensorflow"
    params["distributed"]["gpus"] = 2
    dp.set_params(params)
    proc = dp.stage("train", "stock")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((dp.root / "results/stock/train.json").read_text())["lstm"]
    run = [r for r in train_runs(dp) if r.data.tags["framework"] == "tensorflow"]
    assert len(run) == 1 and run[0].info.status == "FINISHED"
    tags = run[0].data.tags
    assert (tags["world_size"], tags["dist.backend"]) == ("2", "tf.distribute.MirroredStrategy")
    assert [r.split("/", 1)[1].split(" ")[0] for r in tags["dist.devices"].split("; ")] == ["CPU:0", "CPU:1"]
    assert (dp.root / "models/stock/lstm/model.keras").is_file()

    dp.update("distributed.gpus", 1)
    reference = single_process(dp, "tensorflow")
    assert trained["val/loss"] == pytest.approx(reference[-1]["val/loss"], rel=TOLERANCE)
    assert reference[-1]["train/loss"] < reference[0]["train/loss"]
    dp.update("framework", "torch")


def test_scaling_benchmark_at_one_and_two_gloo_ranks(dp):
    params = dp.params()
    params["distributed"]["gpus"] = 2
    params["benchmark"].update(devices=[], frameworks=["torch"])  # the scaling points alone
    dp.set_params(params)
    proc = dp.stage("benchmark", "stock")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((dp.root / "results/stock/benchmark.json").read_text())["records"]
    by_world = {r["world_size"]: r for r in records}
    assert [r["kind"] for r in records] == ["scaling", "scaling"] and set(by_world) == {"1", "2"}
    one, two = by_world["1"]["bench/samples_per_s"], by_world["2"]["bench/samples_per_s"]
    assert one > 0 and two > 0
    assert by_world["2"]["bench/scaling_efficiency"] == pytest.approx(two / (2 * one))
    assert by_world["2"]["bench/scaling_speedup"] == pytest.approx(two / one)
    assert by_world["1"]["bench/scaling_efficiency"] == pytest.approx(1.0)
    assert (by_world["2"]["batch_size"], by_world["2"]["per_rank_batch"]) == (16, 8)  # the global batch, split
    assert by_world["2"]["dist.backend"] == "gloo" and len(by_world["2"]["repeats_samples_per_s"]) == 2

    runs = dp.runs("stock", "tags.kind = 'scaling'")
    assert sorted(r.data.tags["world_size"] for r in runs) == ["1", "2"]
    for r in runs:
        rec = by_world[r.data.tags["world_size"]]
        assert r.info.run_id == rec["run_id"] and r.info.run_name == f"scaling-cpu-torch-w{rec['world_size']}"
        assert r.data.metrics["bench/scaling_efficiency"] == pytest.approx(rec["bench/scaling_efficiency"])

    from accelbench import report

    report.build(f"sqlite:///{dp.root / 'mlruns' / 'mlflow.db'}", dp.root / "reports")
    md = (dp.root / "reports/report.md").read_text()
    section = md.split("## Scaling", 1)[1].split("\n## ", 1)[0]
    assert f"{100 * by_world['2']['bench/scaling_efficiency']:,.1f}%" in section
    assert "![data-parallel scaling](scaling.png)" in section and (dp.root / "reports/scaling.png").stat().st_size > 0


def test_single_device_workloads_stay_on_one_device_and_say_why(dp, capfd):
    """A pipeline-wide distributed.gpus=2 spreads the workloads that can use it; diabetes and quantum run
    whole on one device, print why, and benchmark no scaling points (in this process, to save stage start-up)."""
    from accelbench import distributed, scaling
    from accelbench.workloads import get_workload

    dp.update("distributed.gpus", 2)
    cfg = load_config(dp.root / "params.yaml")
    for name, reason in (("diabetes", "a few hundred rows"), ("quantum", "the quanvolution features")):
        single = distributed.for_workload(cfg, get_workload(name))
        assert single.distributed.world_size == 1 and distributed.group_tags()["dist.single_device_reason"].startswith(reason)
        assert f"{name} stays on one device (2 ranks asked): {reason}" in capfd.readouterr().err
        assert scaling.run(cfg, get_workload(name), dp.root, ["torch"]) == []
    assert distributed.for_workload(cfg, get_workload("stock")) is cfg
    dp.update("distributed.gpus", 1)


@pytest.mark.parametrize(
    "global_batch, rule, batch, lr",
    [(True, "linear", 64, 1e-3), (False, "none", 256, 1e-3), (False, "linear", 256, 4e-3), (False, "sqrt", 256, 2e-3)],
)
def test_global_batch_and_lr_rules(global_batch, rule, batch, lr):
    from accelbench.distributed import effective_train

    train = effective_train(TrainParams(batch_size=64, lr=1e-3), 4, DistributedConfig(gpus=4, global_batch=global_batch, lr_scaling=rule))
    assert (train.batch_size, train.lr) == (batch, pytest.approx(lr))


def test_uneven_global_batch_and_missing_rendezvous_are_config_errors(tmp_path):
    from accelbench.distributed import effective_train

    with pytest.raises(ConfigError, match="batch_size: 30 does not split evenly over 4 ranks"):
        effective_train(TrainParams(batch_size=30), 4, DistributedConfig(gpus=4))
    path = tmp_path / "params.yaml"
    path.write_text("workloads: [stock]\ndistributed: {gpus: 8, nodes: 2}\n")
    with pytest.raises(ConfigError, match="distributed: nodes > 1 needs rdzv_endpoint"):
        load_config(path)


def test_torchrun_command_and_child_environment(tmp_path):
    from accelbench.distributed import child_env, torchrun_args

    one = torchrun_args(DistributedConfig(gpus=4))
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone"]
    two = torchrun_args(DistributedConfig(gpus=8, nodes=2, node_rank=1, rdzv_endpoint="node0.example:29500"))
    assert two[5:] == ["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0.example:29500"]
    env = child_env(tmp_path)
    assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"], env["NVSHMEM_DISABLE_NVLS"]) == ("0", "1", "1")


def test_tensorflow_workers_swap_addresses_through_the_rendezvous_store():
    """What MultiWorkerMirroredStrategy's TF_CONFIG is built from: two 'hosts' (threads, loopback only)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from accelbench.distributed import swap_addresses

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    configs = [DistributedConfig(gpus=1, nodes=2, node_rank=r, rdzv_endpoint=f"127.0.0.1:{port}") for r in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        seen = list(pool.map(swap_addresses, configs))
    assert seen[0] == seen[1] and len(seen[0]) == 2
    assert all(w.startswith("127.0.0.1:") for w in seen[0]) and seen[0][0] != seen[0][1]
