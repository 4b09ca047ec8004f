"""benchmark@<workload>: timed training work per device, framework, variant and batch size.

Each (framework, device) pair runs in its own process: TensorFlow's device visibility and dtype policy are
process-wide, and a fresh process keeps one side's allocator, threads and peak memory out of the other's.
Every measurement is an MLflow run (stage=benchmark) so that the report can combine machines.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna

from . import devices, distributed, hostload, interleave, preload, progress, scaling, stats, summary, tuning
from .cli import main_child
from .config import ABLATION_VALUES, BenchmarkConfig, Config, WorkloadParams, ablation_options, with_overrides
from .devices import Runtime
from .engines import BenchResult, BenchSpec, get_engine
from .errors import AccelbenchError, ConfigError, TrainingError
from .io import Prepared, load_prepared, write_json
from .project import prepared_dir, results_dir
from .runtime import on_device, runtime_for
from .study import AS_WRITTEN, Study, config_hash, storage_url, study_name
from .tasks import Task
from .timing import IntervalPlan, median, spread, work
from .tracking import check_server, log_benchmark_run, record_failure, run_name, stage_run, tracking_uri
from .workloads import Workload


class _TargetReached(Exception):
    pass


@dataclass(frozen=True)
class Point:
    """What every measurement of one variant on this device shares."""

    cfg: Config
    wl: Workload
    variant: str
    several: bool  # the workload compares several variants: run names carry the variant
    runtime: Runtime
    prepared: Prepared  # as prepared; each measurement precomputes the model's inputs from it
    task: Task
    engine: ModuleType
    source: str  # where the hyperparameters came from, said for a reader: a study's trial, or AS_WRITTEN
    util: Any = None  # devices.UtilisationSampler on CUDA (torch)
    energy: Any = None  # a joules counter where the device has one


def device_specs(cfg: Config) -> list[str]:
    """`auto` means every device present: the CPU and each visible GPU."""
    specs: list[str] = []
    for spec in cfg.benchmark.devices:
        if spec == "auto":
            specs += ["cpu"] + [f"cuda:{i}" for i in range(len(devices.gpu_names()))]
        else:
            specs.append(spec)
    return list(dict.fromkeys(specs))


def frameworks(cfg: Config, wl: Workload) -> list[str]:
    forced = cfg.params(wl.name).framework
    return [forced] if forced else [f for f in cfg.benchmark.frameworks if f in wl.frameworks]


def run(cfg: Config, wl: Workload, root: Path) -> None:
    """The stage: one child process per (framework, device); records merged into results/<w>/benchmark.json.
    With several ranks (`distributed`), the scaling points (kind=scaling) are measured after them."""
    check_server(tracking_uri(root))  # a wrong URL or bad credentials: one line before any work
    cfg = distributed.for_workload(cfg, wl)
    records: list[dict[str, Any]] = []
    env = {**os.environ, "DVC_ROOT": str(root), interleave.SESSION_ENV: uuid.uuid4().hex[:12]}
    with work():  # the measuring children, their own start-up included
        for framework in frameworks(cfg, wl):
            records += _devices_in_turns(wl, framework, device_specs(cfg), root, env)
        if scaling.rank_counts(cfg):
            records += scaling.run(cfg, wl, root, frameworks(cfg, wl))
    summary.write_sweep(wl.name, records, results_dir(root, wl.name) / "sweep.csv")
    write_json(results_dir(root, wl.name) / "benchmark.json", {"records": records})
    progress.result(f"{len(records)} measurements in results/{wl.name}/benchmark.json")


def _devices_in_turns(wl: Workload, framework: str, specs: list[str], root: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """One child per device, taking turns interval by interval (interleave.py); their records in device order."""
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"records-{i}.json" for i in range(len(specs))]
        child = preload.child_command("benchmark", wl.name, framework)  # warm, as the stage is
        cmds = [[*child, spec, str(out)] for spec, out in zip(specs, outs)]
        for code, stderr in interleave.run_in_turns(cmds, root, env):
            if code != 0:
                raise AccelbenchError(_child_error(stderr))
        return [rec for out in outs for rec in json.loads(out.read_text())]


def _child_error(stderr: str) -> str:
    """A failed child's reason: its error line, else (a crash, not a clean error) the end of its stderr. Its
    progress lines are no reason, though they too start with 'accelbench '."""
    return progress.last_error(stderr) or stderr.strip()[-2000:]


def tuned_overrides(cfg: Config, wl: Workload, variant: str, runtime: Runtime, root: Path) -> tuple[dict[str, Any], str]:
    """The device's own best trial from its Optuna study, else the params as written (and say which)."""
    several = len(wl.variants(cfg.params(wl.name))) > 1
    name = study_name(wl.name, variant if several else None, runtime)
    try:
        study = optuna.load_study(study_name=name, storage=storage_url(cfg.tune.storage, root))
        return study.best_trial.params, f"tuned (study {name}, trial {study.best_trial.number})"
    except (KeyError, ValueError):  # no such study, or no completed trial in it
        return {}, AS_WRITTEN


def measure(cfg: Config, wl: Workload, framework: str, spec: str, root: Path) -> list[dict[str, Any]]:
    """Inside the child process: the batch-size sweep and the time to target on one device."""
    interleave.turn().wait()  # nothing of this process runs while another device's process times
    b = cfg.benchmark
    fair = hostload.physical_cores() if spec == "cpu" else None  # one thread per physical core
    runtime = runtime_for(on_device(cfg, wl, spec, framework, b.cpu_threads or cfg.cpu_threads or fair), wl,
                          device_key="benchmark.devices")  # fmt: skip
    device = runtime.device
    if blocker := _precision_blocker(runtime):
        return [_skipped(wl, runtime, "throughput, ablation and time to target", blocker)]
    engine = get_engine(framework)
    prepared = load_prepared(prepared_dir(root, wl.name))
    progress.read(f"data/prepared/{wl.name} ({prepared.n('train'):,} training rows) to time {framework} on {spec}")
    task = wl.task(prepared.meta)
    params = cfg.params(wl.name)
    variants = wl.variants(params)
    energy = devices.energy_counter(device)
    util = devices.utilisation_sampler(device, min_s=b.gpu_util_min_s) if framework == "torch" else None
    # the workload's own measurements first: a bad input they read fails before minutes of training steps
    records = [_log_extra(wl, runtime, {"cpu_threads": engine.threads(), **rec}) for rec in wl.extra_benchmarks(params, runtime, b)]
    for variant, overrides in variants.items():
        base = with_overrides(params, overrides)
        tuned, source = tuned_overrides(cfg, wl, variant, runtime, root)
        point = Point(cfg, wl, variant, len(variants) > 1, runtime, prepared, task, engine, source, util, energy)
        vparams = with_overrides(base, tuned)
        # speed is timed on the model as written, each device's study giving only its batch size: a CPU study
        # that picked a smaller network must not pass for a faster CPU. Quality (time to target) uses it all.
        speed = with_overrides(base, {"train.batch_size": vparams.train.batch_size})
        roles = {speed.train.batch_size: "tuned", base.train.batch_size: "default"}  # default wins a tie
        inputs, _ = wl.precompute(speed, prepared, runtime)  # the training steps timed are on the model's inputs
        rows = inputs.n("train")
        batches = _within_split(sorted(set(b.batch_sizes) | set(roles)), rows, f"{variant} on {spec}")
        roles = {min(batch, rows): role for batch, role in roles.items()}  # as timed; default still wins
        for batch in progress.track(batches, len(batches), f"benchmark {wl.name} {variant} {framework} {spec}", "batch size"):
            rec = _throughput(point, speed, inputs, batch)
            # the speed uses only the study's batch (above): 'tuned batch (study ..., trial N)'
            rec.update(batch_role=roles.get(batch, "sweep"), hparams=source.replace("tuned (", "tuned batch ("))
            _log_throughput(wl, variant, runtime, rec, rec["repeats_samples_per_s"], len(variants) > 1)
            records.append(rec)
        if b.ablation and device.type in b.ablation_devices and framework == "torch":
            records += _ablation(point, speed, inputs.meta)
        target = params.benchmark
        if target.value is not None:
            records.append(_time_to_target(point, vparams))
        if _stacks(cfg, wl, base, runtime):
            records.append(_population_vs_sequential(point, base))
    return records


def _within_split(batches: list[int], rows: int, what: str) -> list[int]:
    """The sweep's batch sizes, those above the training split's size timed at the whole split instead: a larger
    batch would draw rows several times over in every step, a speed no epoch on this data reaches."""
    over = [batch for batch in batches if batch > rows]
    if over:
        progress.note(f"batch size {', '.join(map(str, over))} exceeds the {rows:,} training rows: {what} timed at {rows:,}")
    return sorted({min(batch, rows) for batch in batches})


def _precision_blocker(runtime: Runtime) -> str | None:
    """Why bf16 is not timed on this CPU (it has no native bf16: the figure would be the emulation's), else None."""
    if runtime.device.type == "cpu" and runtime.precision == "bf16":
        return hostload.native_bf16()
    return None


def _skipped(wl: Workload, runtime: Runtime, what: str, why: str) -> dict[str, Any]:
    """A measurement left out, said on stderr and kept as its own run so that the record shows why."""
    print(f"accelbench benchmark: {wl.name} {runtime.device.label} {runtime.precision}: {what} not timed: {why}", file=sys.stderr)
    rec = {"kind": "skipped", "workload": wl.name, "variant": "", **runtime.tags(), "skipped": f"{what}: {why}"}
    name = f"{run_name('benchmark', runtime.tags())}-skipped"
    log_benchmark_run(wl.name, runtime.tags(), name, {"kind": "skipped", "skipped": rec["skipped"]}, rec)
    return rec


def _log_extra(wl: Workload, runtime: Runtime, rec: dict[str, Any]) -> dict[str, Any]:
    """A workload's own measurement as its own run: its values as tags, `bench/` metrics, repeats as steps."""
    rec = {"workload": wl.name, **runtime.tags(), **rec}  # a record may set a runtime tag its own way (compile)
    repeats = rec.pop("repeats", {})
    runtime_tags = {k: str(rec[k]) for k in runtime.tags()}
    name = run_name(f"{rec['kind']}-{rec['variant']}", runtime_tags)  # 'circuits-fixed-cpu-torch': what differs first
    tags = {k: str(v) for k, v in rec.items()
            if not k.startswith("bench/") and v is not None and k not in runtime_tags and k != "start_ms"}  # fmt: skip
    log_benchmark_run(wl.name, runtime_tags, name, tags, rec, repeats)
    return {**rec, "repeats": repeats}


def _throughput(p: Point, params: WorkloadParams, prepared: Prepared, batch: int) -> dict[str, Any]:
    """One batch size timed on the model's inputs (`prepared`, after the workload's precompute)."""
    cfg, wl, variant, runtime, task, engine, energy, util = p.cfg, p.wl, p.variant, p.runtime, p.task, p.engine, p.energy, p.util
    b = cfg.benchmark
    start_ms = int(time.time() * 1000)
    devices.seed_everything(cfg.seed, runtime.framework)
    probe = hostload.HostProbe()
    hand_on = lambda: (probe.end(), interleave.turn().hand_on())  # noqa: E731
    plan = IntervalPlan(stats.split_repeats(b.repeats, b.intervals), probe.begin, hand_on)
    spec = BenchSpec(batch, b.steps, b.warmup_steps, b.repeats, min_repeat_s=b.min_repeat_s, intervals=plan, energy=energy,
                     utilisation=util)  # fmt: skip
    real = engine.bench(wl.build_model(runtime.framework, params, prepared.meta), task, prepared, params.train, runtime, spec)
    ceiling = None
    if b.compute_ceiling:
        ceiling = engine.bench(wl.build_model(runtime.framework, params, prepared.meta), task, prepared, params.train,
                               runtime, BenchSpec(batch, b.steps, b.warmup_steps, b.repeats, synthetic=True,
                                                  min_repeat_s=b.min_repeat_s))  # fmt: skip
    rec = {**_summarize(real, ceiling), **_stability(real, probe.readings, runtime), "start_ms": start_ms}
    goal = params.benchmark
    if goal.gpu_speedup_goal is not None:  # read by the report's goals table
        rec.update(goal_speedup=goal.gpu_speedup_goal, goal_batch=goal.goal_batch)
    if goal.gpu_util_goal_pct is not None:
        rec["goal_util_pct"] = goal.gpu_util_goal_pct
    for unit, per_sample in (prepared.meta.get("units_per_sample") or {}).items():  # e.g. tokens per tweet
        rec[f"bench/{unit}_per_s"] = rec["bench/samples_per_s"] * per_sample
    rec.update(kind="throughput", workload=wl.name, variant=variant, **runtime.tags(), cuda_graphs_applied=real.cuda_graphs, batch_size=batch,
               steps_per_repeat=real.steps,
               cpu_threads=engine.threads(), **hostload.thread_settings(),
               timed=f"{b.repeats} x {real.steps} training steps{_floor(b)} after {b.warmup_steps} warm-up, in {b.intervals} "
               "interval(s), each after the first re-warmed, taking turns with the other devices; batches drawn from the "
               "device-resident training split")  # fmt: skip
    return rec


def _stability(real: BenchResult, readings: list[dict[str, float | None]], runtime: Runtime) -> dict[str, Any]:
    """Each interval's throughput, how far apart they are, what the host did meanwhile, and the flag they earn."""
    per_interval = stats.interval_medians(real.samples_per_s(), real.interval_of or [0] * len(real.repeat_s))
    cores = hostload.logical_cores()

    def extreme(key: str, pick) -> float | None:
        values = [r[key] for r in readings if r.get(key) is not None]
        return pick(values) if values else None

    return {
        "intervals_samples_per_s": per_interval,
        "bench/intervals": float(len(per_interval)),
        "bench/interval_spread": stats.relative_spread(per_interval),
        "bench/steal_pct_max": extreme("steal_pct", max),
        "bench/others_cores_max": extreme("others_cores", max),
        "bench/ours_cores_min": extreme("ours_cores", min),
        "bench/cpu_mhz_min": extreme("mhz", min),
        "bench/cpu_mhz_max": extreme("mhz", max),
        "host_readings": readings,
        "logical_cores": cores,
        "flag": stats.stability_flag(per_interval, readings, cores, cpu_side=runtime.device.type == "cpu"),
        "bench_session": os.environ.get(interleave.SESSION_ENV, ""),
    }


def _floor(b: BenchmarkConfig) -> str:
    return f" (each repeat at least {b.min_repeat_s:g} s: steps again, or fewer long ones)" if b.min_repeat_s > 0 else ""


def _log_throughput(wl, variant, runtime, rec, real_repeats, several) -> None:
    name = run_name(f"bench-b{rec['batch_size']}", runtime.tags(), variant if several else None)  # batch first: the UI cuts names
    keys = ("kind", "variant", "batch_size", "batch_role", "hparams", "timed", "cpu_threads", "cuda_graphs_applied",
            "flag", "bench_session", "logical_cores", *hostload.thread_settings())  # fmt: skip
    goals = ("goal_speedup", "goal_batch", "goal_util_pct") if runtime.device.type != "cpu" else ()  # a GPU's goals
    tags = {k: str(rec[k]) for k in keys + goals if k in rec}
    series = {"bench/repeat_samples_per_s": real_repeats, "bench/interval_samples_per_s": rec["intervals_samples_per_s"]}
    log_benchmark_run(wl.name, runtime.tags(), name, tags, rec, series)


def _summarize(real: BenchResult, ceiling: BenchResult | None) -> dict[str, Any]:
    tput = real.samples_per_s()
    lo, hi = stats.median_ci(tput)
    rec: dict[str, Any] = {
        "bench/samples_per_s": median(tput),
        "bench/samples_per_s_iqr": spread(tput),
        "bench/samples_per_s_ci_low": float(lo),
        "bench/samples_per_s_ci_high": float(hi),
        "bench/step_ms": 1000 * median(real.repeat_s) / real.steps,
        "bench/warmup_s": real.warmup_s,
        "bench/to_device_s": real.to_device_s,
        "bench/peak_gpu_mb": real.peak_gpu_mb,
        # a counter that did not move over a repeat is below its resolution: n/a, never a made-up zero
        "bench/energy_j_per_1k_samples": (
            1000 * median(real.energy_j) / (real.steps * real.batch_size)
            if real.energy_j and min(real.energy_j) > 0 else None
        ),
        "repeats_samples_per_s": tput,
    }
    if real.gpu_util_pct:  # absent on the CPU: not a zero
        rec["bench/gpu_util_pct"] = median(real.gpu_util_pct)
        rec["bench/gpu_util_mean_pct"] = sum(real.gpu_util_pct) / len(real.gpu_util_pct)
        rec["bench/gpu_util_samples"] = float(len(real.gpu_util_pct))
    if ceiling:
        top = median(ceiling.samples_per_s())
        rec["bench/compute_only_samples_per_s"] = top
        rec["bench/input_share"] = max(0.0, 1.0 - rec["bench/samples_per_s"] / top)  # time lost to batch assembly
    return rec


def _ablation(p: Point, params: WorkloadParams, model_meta: dict[str, Any]) -> list[dict[str, Any]]:
    """What each optimisation buys at the tuned batch: the baseline, each option alone, then all the options
    that apply together; beside each speed, the validation metric of a training run under the same setting."""
    cfg, wl, variant, runtime, engine, source = p.cfg, p.wl, p.variant, p.runtime, p.engine, p.source
    options = ablation_options(cfg.benchmark.ablation)
    probe = wl.build_model(runtime.framework, params, model_meta)  # the model's inputs decide its layers
    skipped = {name: why for name, change in options.items() if (why := _not_applicable(change, runtime, probe, engine))}
    combined = {k: v for name, change in options.items() if name not in skipped for k, v in change.items()}
    settings = {"baseline": {}, **options, **({"all": combined} if len(options) - len(skipped) > 1 else {})}
    records, base_tput = [], None
    for name, change in settings.items():
        rec = {"kind": "ablation", "workload": wl.name, "variant": variant, "setting": name, "hparams": source,
               "start_ms": int(time.time() * 1000),
               "batch_size": params.train.batch_size, **dataclasses.replace(runtime, **change).tags()}  # fmt: skip
        if name in skipped:
            rec["skipped"] = skipped[name]
        else:
            try:
                rec.update(_ablation_point(p, params, dataclasses.replace(runtime, **change)))
            except (RuntimeError, TrainingError) as exc:  # e.g. a capture this model's ops refuse: say so, go on
                rec["skipped"] = f"failed: {str(exc).splitlines()[0][:300]}"
        if name == "baseline" and "skipped" not in rec:
            base_tput = rec["bench/samples_per_s"]
        if base_tput and "bench/samples_per_s" in rec:
            rec["bench/speedup_vs_baseline"] = rec["bench/samples_per_s"] / base_tput
        _log_ablation(wl, variant, runtime, rec, p.several)
        records.append(rec)
    return records


def _not_applicable(change: dict[str, Any], runtime: Runtime, probe, engine) -> str | None:
    if all(getattr(runtime, k) == v for k, v in change.items()):
        return "already in the baseline"
    if change.get("channels_last") and not any(p.dim() == 4 for p in probe.parameters()):
        return "no 4-D weights: channels_last changes nothing for this model"
    if change.get("cuda_graphs"):
        return engine.graph_blocker(dataclasses.replace(runtime, **change))
    return _precision_blocker(dataclasses.replace(runtime, **change))


def _ablation_point(p: Point, params: WorkloadParams, runtime: Runtime) -> dict[str, Any]:
    """One setting (`runtime`, the point's with the setting's changes): its speed, then its quality."""
    cfg, wl, prepared, task, engine, util = p.cfg, p.wl, p.prepared, p.task, p.engine, p.util
    b = cfg.benchmark
    inputs, _ = wl.precompute(params, prepared, runtime)
    devices.seed_everything(cfg.seed, runtime.framework)
    real = engine.bench(wl.build_model(runtime.framework, params, inputs.meta), task, inputs, params.train, runtime,
                        BenchSpec(params.train.batch_size, b.steps, b.warmup_steps, b.repeats, min_repeat_s=b.min_repeat_s,
                                  utilisation=util))  # fmt: skip
    rec = {k: v for k, v in _summarize(real, None).items() if k != "repeats_samples_per_s"}
    rec["cuda_graphs_applied"] = real.cuda_graphs
    epochs = b.ablation_epochs or params.train.epochs
    devices.seed_everything(cfg.seed, runtime.framework)
    train = dataclasses.replace(params.train, epochs=epochs)
    fit = engine.fit(wl.build_model(runtime.framework, params, inputs.meta), task, inputs, train, runtime, None, f"{wl.name} ablation")
    metric = params.benchmark.metric or task.objective
    rec.update({"quality_metric": metric, "quality_epochs": epochs, "bench/quality": fit.history[-1][metric],
                "bench/fit_epoch_s": fit.summary()["time/epoch_s"]})  # fmt: skip
    return rec


def _log_ablation(wl, variant, runtime, rec, several) -> None:
    name = run_name(f"ablation-{rec['setting']}", runtime.tags(), variant if several else None)
    keys = ("kind", "variant", "setting", "batch_size", "hparams", "skipped", "quality_metric", "quality_epochs", "cuda_graphs_applied")
    tags = {k: str(rec[k]) for k in keys if k in rec}
    setting_tags = {k: rec[k] for k in ABLATION_VALUES}  # the options an ablation can change
    rec["timed"] = ("training steps timed as in the throughput runs, at the tuned batch; quality: the validation "
                    f"{rec.get('quality_metric')} after {rec.get('quality_epochs')} epochs of a training run under the same setting")
    tags["timed"] = rec["timed"]
    log_benchmark_run(wl.name, {**runtime.tags(), **setting_tags}, name, tags, rec)


def _time_to_target(p: Point, params: WorkloadParams) -> dict[str, Any]:
    cfg, wl, variant, runtime, prepared, task, engine, source = p.cfg, p.wl, p.variant, p.runtime, p.prepared, p.task, p.engine, p.source
    target = params.benchmark
    metric = target.metric or task.objective
    better = (lambda v: v >= target.value) if task.direction == "maximize" else (lambda v: v <= target.value)
    hit: dict[str, float] = {}
    start_ms = int(time.time() * 1000)  # the run spans the training, though logged after it
    t0 = time.perf_counter()

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        if metric not in row:
            raise ConfigError(f"params.yaml: {wl.name}.benchmark.metric: '{metric}' is not logged (have {sorted(row)})")
        if better(row[metric]):
            hit.update(epoch=epoch + 1, seconds=time.perf_counter() - t0, value=row[metric])
            raise _TargetReached

    devices.seed_everything(cfg.seed, runtime.framework)
    inputs, _ = wl.precompute(params, prepared, runtime)  # inside the clock: part of the time to target
    model = wl.build_model(runtime.framework, params, prepared.meta)
    try:
        engine.fit(model, task, inputs, params.train, runtime, on_epoch, f"{wl.name} to target")
    except _TargetReached:
        pass
    rec = {
        "kind": "time_to_target", "workload": wl.name, "variant": variant, **runtime.tags(),
        "batch_size": params.train.batch_size, "hparams": source, "target_metric": metric, "target_value": target.value,
        "bench/target_reached": 1.0 if hit else 0.0,
        "bench/time_to_target_s": hit.get("seconds"), "bench/epochs_to_target": hit.get("epoch"),
        "timed": f"wall time from the start of training until {metric} reached {target.value} (validation each epoch)",
        "start_ms": start_ms,
    }  # fmt: skip
    name = run_name("time_to_target", runtime.tags(), variant if p.several else None)
    tags = {k: str(rec[k]) for k in ("kind", "variant", "batch_size", "hparams", "target_metric", "target_value", "timed")}
    log_benchmark_run(wl.name, runtime.tags(), name, tags, rec)
    return rec


def _stacks(cfg: Config, wl: Workload, params: WorkloadParams, runtime: Runtime) -> bool:
    """Whether population tuning is measured here: switched on, torch, and a model that stacks (asked cheaply:
    building the population model would run quantum's circuits once more just to answer yes)."""
    return cfg.benchmark.population is not None and runtime.framework == "torch" and wl.stacks(params)


def _population_vs_sequential(p: Point, params: WorkloadParams) -> dict[str, Any]:
    """Tune with both strategies on this device from the same search space, epochs fixed and pruning off so
    that every trial trains the same number of epochs: trials/s of each, the population's wall time, and
    the best objective of each with the same budget of trials."""
    cfg, wl, variant, runtime, task = p.cfg, p.wl, p.variant, p.runtime, p.task
    pb = cfg.benchmark.population
    epochs = pb.epochs or params.train.epochs
    fixed = {k: v for k, v in params.search.items() if k != "train.epochs"}  # trials x epochs stays an honest count
    params = dataclasses.replace(with_overrides(params, {"train.epochs": epochs}), search=fixed)
    tags = {"kind": "population", "variant": variant, "epochs": str(epochs), "objective": task.objective, "direction": task.direction,
            "tune.population": str(params.tune.population), "cpu_threads": str(get_engine("torch").threads()),
            "timed": f"Optuna ask/train/tell loops (TPE, in-memory storage, pruning off), {epochs} epochs per trial; "
                     "population: MLflow bulk logging of its nested runs timed apart; sequential: the tune stage's "
                     "objective, its per-trial MLflow run included; sequential rate extrapolated from its trials"}  # fmt: skip
    name = run_name("population", runtime.tags(), variant if p.several else None)
    with stage_run(wl.name, "benchmark", runtime.tags(), name=name, tags=tags) as run:
        trials = pb.cpu_trials if pb.cpu_trials and runtime.device.type == "cpu" else pb.trials
        pop = _tune_timed(p, params, "population", trials, run.run_id)
        same = pop if pb.sequential_trials == trials else _tune_timed(p, params, "population", pb.sequential_trials, run.run_id)
        seq = _tune_timed(p, params, "sequential", pb.sequential_trials, run.run_id)
        metrics = {
            "bench/population_trials": pop["trials"], "bench/population_wall_s": pop["wall_s"],
            "bench/population_trials_per_s": pop["trials"] / pop["wall_s"],
            "bench/population_fit_s": pop["fit_s"], "bench/population_log_s": pop["log_s"],
            "bench/population_trials_per_s_with_logging": pop["trials"] / (pop["wall_s"] + pop["log_s"]),
            "bench/population_best": pop["best"], "bench/population_best_same_budget": same["best"],
            "bench/sequential_trials": seq["trials"], "bench/sequential_wall_s": seq["wall_s"],
            "bench/sequential_trials_per_s": seq["trials"] / seq["wall_s"], "bench/sequential_best": seq["best"],
        }  # fmt: skip
        metrics["bench/sequential_wall_s_extrapolated"] = pop["trials"] / metrics["bench/sequential_trials_per_s"]
        metrics["bench/population_speedup"] = metrics["bench/population_trials_per_s"] / metrics["bench/sequential_trials_per_s"]
        run.log_metrics({k: v for k, v in metrics.items() if v is not None})
        run_id = run.run_id
    return {"workload": wl.name, **runtime.tags(), **tags, **metrics, "run_id": run_id}


def _tune_timed(p: Point, params: WorkloadParams, strategy: str, n_trials: int, parent_run_id: str) -> dict[str, Any]:
    """`n_trials` of one strategy in a throwaway study, wall-clocked with the device synchronised."""
    cfg, wl, variant, runtime, prepared, task = p.cfg, p.wl, p.variant, p.runtime, p.prepared, p.task
    from . import population  # imports torch: only a stacking workload's benchmark pays for it

    params = with_overrides(params, {"tune.strategy": strategy})
    study = optuna.create_study(direction=task.direction, sampler=optuna.samplers.TPESampler(seed=cfg.seed),
                                pruner=optuna.pruners.NopPruner())  # fmt: skip
    name = f"benchmark-{strategy}-" + study_name(wl.name, variant, runtime)
    s = Study(cfg=cfg, wl=wl, variant=variant, several=False, params=params, runtime=runtime, prepared=prepared,
              task=task, name=name, config_hash=config_hash(params, runtime, prepared), optuna=study)
    sync = _device_sync(runtime)
    sync()
    t0 = time.perf_counter()
    if strategy == "population":
        stats = population.optimize(s, n_trials, parent_run_id)
    else:
        study.optimize(tuning.objective_for(s, parent_run_id), n_trials=n_trials, catch=(TrainingError,))
        stats = population.TuneStats()
    sync()
    # the population's logging happened inside the loop: taken out here, reported apart
    wall = time.perf_counter() - t0 - stats.log_s
    values = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pick = max if task.direction == "maximize" else min
    return {"trials": len(study.trials), "wall_s": wall, "fit_s": stats.fit_s or None, "log_s": stats.log_s,
            "best": pick(values) if values else None}  # fmt: skip


def _device_sync(runtime: Runtime):
    import torch

    return torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)


def child_main() -> None:
    """One device's measurements: `python -m accelbench.preload child benchmark <workload> <framework> <device>
    <out.json>` (warm), or `python -m accelbench.benchmark` with the same arguments."""
    main_child("benchmark", lambda cfg, wl, root, framework, spec, out: write_json(Path(out), measure(cfg, wl, framework, spec, root)), on_failure=record_failure)


if __name__ == "__main__":
    child_main()
