"""Scaling part of benchmark@<w>: training samples/s at 1, 2, 4 ... ranks on this host, and the efficiency
N-rank throughput / (N x 1-rank throughput).

Every point is the same data-parallel code path: torch ranks under torchrun (DDP, NCCL or gloo; the 1-rank point
too, so that the ratio measures what adding ranks costs), TensorFlow replicas of one MirroredStrategy. Batches
are drawn on each device from its resident training split (the data pipeline is inside the clock).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import distributed
from .cli import main_child
from .config import Config, with_overrides
from .engines import BenchSpec, get_engine
from .errors import ConfigError
from .io import load_prepared, write_json
from .project import prepared_dir
from .runtime import on_device, runtime_for
from .study import AS_WRITTEN
from .timing import median, spread
from .tracking import log_benchmark_run, record_failure, run_name
from .workloads import Workload

RANKS_ENV = "ACCELBENCH_RANKS"


def rank_counts(cfg: Config) -> list[int]:
    """benchmark.scaling as written, else 1, 2, 4 ... below distributed.gpus and gpus itself (none for one rank)."""
    if cfg.benchmark.scaling is not None:
        return sorted(set(cfg.benchmark.scaling))
    gpus = cfg.distributed.gpus
    counts, k = [], 1
    while k < gpus:
        counts.append(k)
        k *= 2
    return counts + [gpus] if gpus > 1 else []


def run(cfg: Config, wl: Workload, root: Path, frameworks: list[str]) -> list[dict[str, Any]]:
    """In the stage process: one child run per (framework, rank count); efficiency from the measured points."""
    d = cfg.distributed
    if d.nodes > 1:
        raise ConfigError("params.yaml: distributed.nodes: the scaling benchmark runs on one host; set nodes: 1 "
                          "(several hosts are for train@<w>)")  # fmt: skip
    counts = rank_counts(cfg)
    if counts[0] < 1:
        raise ConfigError(f"params.yaml: benchmark.scaling: {cfg.benchmark.scaling}: rank counts start at 1")
    if max(counts) > 1 and not wl.data_parallel:
        print(f"accelbench: no scaling points for {wl.name}, it stays on one device: {wl.single_device_reason}", file=sys.stderr)
        return []
    distributed.local_gpus_needed(cfg, max(counts))
    records: list[dict[str, Any]] = []
    for framework in frameworks:
        points = [rec for k in counts for rec in _measure_in_child(cfg, wl, framework, k, root)]
        records += _with_efficiency(points)
    for rec in records:
        _log(wl, rec)
    return records


def _measure_in_child(cfg: Config, wl: Workload, framework: str, ranks: int, root: Path) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        child = ["-m", "accelbench.scaling", wl.name, framework, cfg.device, str(out)]
        if framework == "torch":
            cmd = [*distributed.torchrun_args(dataclasses.replace(cfg.distributed, nodes=1), ranks), *child]
        else:
            cmd = [sys.executable, *child]
        distributed.run_ranks(cmd, root, "benchmark", distributed.child_env(root, **{RANKS_ENV: str(ranks)}))
        return json.loads(out.read_text())


def measure(cfg: Config, wl: Workload, framework: str, spec: str, root: Path) -> list[dict[str, Any]]:
    """Inside a child (each torch rank): time the workload's training steps at this child's rank count."""
    ranks = int(os.environ[RANKS_ENV])
    b = cfg.benchmark
    dist_cfg = dataclasses.replace(cfg.distributed, gpus=ranks, nodes=1, node_rank=0)
    cfg = dataclasses.replace(on_device(cfg, wl, spec, framework, b.cpu_threads or cfg.cpu_threads), distributed=dist_cfg)
    runtime = runtime_for(cfg, wl, data_parallel=True)
    try:
        engine = get_engine(framework)
        prepared = load_prepared(prepared_dir(root, wl.name))
        task = wl.task(prepared.meta)
        params = cfg.params(wl.name)
        records = []
        for variant, overrides in wl.variants(params).items():
            vparams = with_overrides(params, overrides)  # as written: the batch is the user's, not a trial's
            train = distributed.effective_train(vparams.train, runtime.world_size, dist_cfg)
            inputs, _ = wl.precompute(vparams, prepared, runtime)
            model = wl.build_model(framework, vparams, prepared.meta)
            spec = BenchSpec(train.batch_size, b.steps, b.warmup_steps, b.repeats, min_repeat_s=b.min_repeat_s)
            res = engine.bench(model, task, inputs, train, runtime, spec)
            tput = res.samples_per_s()
            records.append({
                "kind": "scaling", "workload": wl.name, "variant": variant, **runtime.tags(), **distributed.group_tags(),
                "batch_size": train.batch_size, "per_rank_batch": train.batch_size // runtime.world_size,
                "hparams": AS_WRITTEN, "several_variants": len(wl.variants(params)) > 1,
                "bench/samples_per_s": median(tput), "bench/samples_per_s_iqr": spread(tput),
                "bench/step_ms": 1000 * median(res.repeat_s) / res.steps, "bench/peak_gpu_mb": res.peak_gpu_mb,
                "repeats_samples_per_s": tput,
                "timed": f"{b.repeats} x {res.steps} data-parallel training steps after {b.warmup_steps} warm-up over "
                         f"{runtime.world_size} rank(s); each rank draws its batch share from its device-resident training "
                         "split; a repeat lasts as long as its slowest rank",
            })  # fmt: skip
        return records if runtime.is_main else []
    finally:
        distributed.leave()


def _with_efficiency(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speedup and efficiency of each point against the 1-rank point of the same variant (when it was timed)."""
    one = {p["variant"]: p["bench/samples_per_s"] for p in points if int(p["world_size"]) == 1}
    for p in points:
        n, base = int(p["world_size"]), one.get(p["variant"])
        if base is None:
            continue
        p["bench/scaling_speedup"] = p["bench/samples_per_s"] / base
        p["bench/scaling_efficiency"] = p["bench/samples_per_s"] / (n * base)
    return points


def _log(wl: Workload, rec: dict[str, Any]) -> None:
    runtime_tags = {k: str(rec[k]) for k in ("device", "device_name", "framework", "precision", "compile", "compile_mode", "channels_last")}
    name = run_name("scaling", runtime_tags, rec["variant"] if rec["several_variants"] else None) + f"-w{rec['world_size']}"
    keys = ("kind", "variant", "batch_size", "per_rank_batch", "world_size", "hparams", "timed",
            "dist.backend", "dist.devices", "dist.nodes")  # fmt: skip
    tags = {k: str(rec[k]) for k in keys if k in rec}
    log_benchmark_run(wl.name, runtime_tags, name, tags, rec, {"bench/repeat_samples_per_s": rec["repeats_samples_per_s"]})


def _child() -> None:
    main_child("benchmark", lambda cfg, wl, root, framework, spec, out: _write_main(Path(out), measure(cfg, wl, framework, spec, root)), on_failure=record_failure)


def _write_main(out: Path, records: list[dict[str, Any]]) -> None:
    if os.environ.get("RANK", "0") == "0":  # rank 0 alone writes what the group measured
        write_json(out, records)


if __name__ == "__main__":
    _child()
