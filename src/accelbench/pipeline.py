"""One function per stage kind; stages/*.py call them through cli.main."""
from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Any

from . import devices, distributed, tuning
from .checkpoint import Checkpoint, params_hash
from .config import Config, as_dict, flatten, parse, with_overrides
from .devices import Runtime
from .engines import get_engine
from .errors import ConfigError, DataError
from .io import SPLITS, atomic_dir, atomic_file, load_prepared, read_json, save_prepared, write_json
from .tracking import main_rank_run, run_name, stage_run
from .workloads import Workload

HOST_TAGS = {"device": "cpu", "framework": "none", "precision": "n/a"}


def raw_dir(root: Path, name: str) -> Path:
    return root / "data" / "raw" / name


def prepared_dir(root: Path, name: str) -> Path:
    return root / "data" / "prepared" / name


def results_dir(root: Path, name: str) -> Path:
    return root / "results" / name


def model_dir(root: Path, name: str) -> Path:
    return root / "models" / name


def framework_for(cfg: Config, wl: Workload) -> str:
    framework = cfg.params(wl.name).framework or cfg.framework
    if framework not in wl.frameworks:
        raise ConfigError(
            f"params.yaml: framework: '{wl.name}' has no {framework} model "
            f"(supported: {list(wl.frameworks)}; set {wl.name}.framework to override)"
        )
    return framework


def runtime_for(cfg: Config, wl: Workload, data_parallel: bool = False) -> Runtime:
    """`data_parallel`: this process is (a rank of) a `distributed` run: train and benchmark, not tune/evaluate."""
    framework = framework_for(cfg, wl)
    device = devices.resolve(cfg.device, framework)
    runtime = Runtime.from_config(cfg, device, framework, cfg.cpu_threads)
    if data_parallel:
        runtime = distributed.join(cfg, runtime)
    get_engine(runtime.framework).setup(runtime)
    devices.seed_everything(cfg.seed + runtime.rank, framework)  # rank 0 as a single process; own dropout elsewhere
    return runtime


def hardware(root: Path) -> None:
    write_json(root / "results" / "hardware.json", devices.hardware_info())


def ingest(cfg: Config, wl: Workload, root: Path) -> None:
    params = cfg.params(wl.name)
    with stage_run(wl.name, "ingest", HOST_TAGS, flatten({"data": as_dict(params.data)})) as run:
        with atomic_dir(raw_dir(root, wl.name)) as tmp:
            summary = wl.ingest(params, tmp)
            write_json(tmp / "source.json", summary)
        run.set_tags({"data.source": summary["source"], "data.origin": summary["origin"]})
        run.log_metrics({"data/rows": summary["rows"]})


def eda(cfg: Config, wl: Workload, root: Path) -> None:
    out = results_dir(root, wl.name) / "eda"
    with stage_run(wl.name, "eda", HOST_TAGS) as run:
        with atomic_dir(out) as tmp:
            write_json(tmp / "eda.json", wl.eda(cfg.params(wl.name), raw_dir(root, wl.name), tmp))
        run.log_artifacts(out, "eda")


def prepare(cfg: Config, wl: Workload, root: Path) -> None:
    params = cfg.params(wl.name)
    with stage_run(wl.name, "prepare", HOST_TAGS, flatten({"prepare": as_dict(getattr(params, "prepare", {}))})) as run:
        prepared = wl.prepare(params, raw_dir(root, wl.name), cfg.seed)
        for split in SPLITS:
            if prepared.n(split) == 0:
                raise DataError(f"{raw_dir(root, wl.name)}: the {split} split is empty; more rows are needed")
        save_prepared(prepared_dir(root, wl.name), prepared)
        run.log_metrics({f"data/{s}_rows": prepared.n(s) for s in SPLITS})


def tune(cfg: Config, wl: Workload, root: Path) -> None:
    runtime = runtime_for(cfg, wl)
    prepared = load_prepared(prepared_dir(root, wl.name))
    params = cfg.params(wl.name)
    best = {
        variant: tuning.run_study(cfg, wl, variant, with_overrides(params, overrides), runtime, prepared, root)
        for variant, overrides in wl.variants(params).items()
    }
    write_json(results_dir(root, wl.name) / "best_params.json", best)


def variant_params(cfg: Config, wl: Workload, root: Path) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Each variant's params with its overrides and then its tuned values applied."""
    path = results_dir(root, wl.name) / "best_params.json"
    tuned = read_json(path) if path.is_file() else {}
    params = cfg.params(wl.name)
    out = {}
    for variant, overrides in wl.variants(params).items():
        best = tuned.get(variant, {"params": {}})  # no study yet: the params as written
        out[variant] = (with_overrides(with_overrides(params, overrides), best["params"]), best)
    return out


def train(cfg: Config, wl: Workload, root: Path) -> None:
    cfg = distributed.for_workload(cfg, wl)
    if distributed.needs_relaunch(cfg, framework_for(cfg, wl)):
        distributed.local_gpus_needed(cfg)
        distributed.relaunch(cfg, "train", wl.name, root)  # the same stage, once per rank, under torchrun
        return
    runtime = runtime_for(cfg, wl, data_parallel=True)
    try:
        _train(cfg, wl, root, runtime)
    finally:
        distributed.leave()


def _train(cfg: Config, wl: Workload, root: Path, runtime: Runtime) -> None:
    prepared = load_prepared(prepared_dir(root, wl.name))
    task = wl.task(prepared.meta)
    engine = get_engine(runtime.framework)
    variants = variant_params(cfg, wl, root)
    out = results_dir(root, wl.name)
    ckpt_dir = root / "checkpoints" / wl.name
    ckpt_dir.mkdir(parents=True, exist_ok=True)  # a DVC persist output: it must exist even when unused
    main = runtime.is_main  # only rank 0 of a data-parallel run logs and writes outputs
    all_metrics = {}
    with atomic_dir(model_dir(root, wl.name)) if main else contextlib.nullcontext() as models:
        for variant, (params, best) in variants.items():
            train_params = distributed.effective_train(params.train, runtime.world_size, cfg.distributed)
            logged = flatten({"model": as_dict(getattr(params, "model", {})), "train": as_dict(params.train)})
            tags = {
                "variant": variant,
                "tuned_from": best.get("study") or "defaults",
                "tuned_trial": str(best.get("trial")),
                "cpu_threads": str(engine.threads()),
                "deterministic": str(runtime.deterministic).lower(),
                **engine.determinism_flags(),
                **wl.run_tags(params, runtime),
                **distributed.group_tags(),
                "dist.global_batch": str(train_params.batch_size),
                "dist.lr": str(train_params.lr),
            }
            checkpoint = Checkpoint(
                ckpt_dir / f"{variant}-{runtime.framework}",
                params_hash(as_dict(params), runtime.tags(), runtime.seed, runtime.deterministic, prepared.meta),
                cfg.checkpoint.every_epochs,
            )
            name = run_name("train", runtime.tags(), variant if len(variants) > 1 else None)
            with main_rank_run(main, wl.name, "train", runtime.tags(), logged, name=name, system_metrics=True, tags=tags) as run:
                inputs, precomputed = wl.precompute(params, prepared, runtime)
                run.log_metrics(precomputed)
                model = wl.build_model(runtime.framework, params, prepared.meta)
                log_epoch = lambda epoch, row: run.log_metrics(row, step=epoch)  # noqa: E731
                desc = f"{wl.name}/{variant} {runtime.framework}"
                result = engine.fit(model, task, inputs, train_params, runtime, log_epoch, desc, checkpoint)
                run.set_tags({"resumed_from_epoch": str(result.resumed_from), "cuda_graphs_applied": result.cuda_graphs})
                summary = {**result.summary(units_per_sample=prepared.meta.get("units_per_sample")), **precomputed}
                run.log_metrics(summary)  # the per-epoch curves are already in
                if main:
                    folder = models / variant
                    folder.mkdir()
                    engine.save(model, folder)
                    write_json(folder / "model.json", {"framework": runtime.framework, "params": as_dict(params)})
                    run.log_artifacts(folder, "model")
            all_metrics[variant] = {**result.history[-1], **summary}
            if main:
                _write_history(out / "history" / f"{variant}.csv", result.history)
    if main:
        write_json(out / "train.json", all_metrics)


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    keys = sorted({k for row in history for k in row})
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", *keys])
        writer.writeheader()
        for i, row in enumerate(history, 1):
            writer.writerow({"epoch": i, **row})


def evaluate(cfg: Config, wl: Workload, root: Path) -> None:
    runtime = runtime_for(cfg, wl)
    prepared = load_prepared(prepared_dir(root, wl.name))
    task = wl.task(prepared.meta)
    engine = get_engine(runtime.framework)
    inputs = prepared.meta.get("inputs", ["x"])
    variants = wl.variants(cfg.params(wl.name))
    all_metrics = {}
    with atomic_dir(results_dir(root, wl.name) / "plots") as plots:
        for variant in variants:
            folder = model_dir(root, wl.name) / variant
            info = read_json(folder / "model.json")
            if info["framework"] != runtime.framework:
                raise ConfigError(f"{folder}: trained with {info['framework']}, framework is {runtime.framework}; rerun train")
            params = parse(wl.Params, info["params"], str(folder / "model.json"))  # exactly what was trained
            name = run_name("evaluate", runtime.tags(), variant if len(variants) > 1 else None)
            with stage_run(wl.name, "evaluate", runtime.tags(), name=name, tags={"variant": variant}) as run:
                model = engine.load(folder, wl.build_model(runtime.framework, params, prepared.meta), runtime)
                inputs_v, _ = wl.precompute(params, prepared, runtime)
                metrics: dict[str, float] = {}
                for split in ("val", "test"):
                    arrays = inputs_v.splits[split]
                    logits = engine.predict(model, task, arrays, inputs, runtime, prepared.meta.get("eval_batch_size", 4096))
                    metrics.update(task.metrics(arrays["y"], logits, split))
                    metrics.update(wl.evaluate_extra(params, prepared, split, logits, plots, f"{variant}_{split}"))
                    if task.kind != "regression":
                        title = f"{wl.name}/{variant} {split}"
                        _confusion_png(task, arrays["y"], logits, plots / f"{variant}_confusion_{split}.png", title)
                run.log_metrics(metrics)
                for png in sorted(plots.glob(f"{variant}_*")):
                    run.log_artifact(png, "plots")
            all_metrics[variant] = metrics
        for baseline, metrics in wl.baselines(cfg.params(wl.name), prepared, plots).items():
            with stage_run(wl.name, "evaluate", HOST_TAGS, name=f"baseline-{baseline}",
                           tags={"variant": baseline, "baseline": "true"}) as run:  # fmt: skip
                run.log_metrics(metrics)
            all_metrics[baseline] = metrics
    write_json(results_dir(root, wl.name) / "evaluate.json", all_metrics)


def benchmark(cfg: Config, wl: Workload, root: Path) -> None:
    from . import benchmark as bench

    bench.run(cfg, wl, root)


def _confusion_png(task, y, logits, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = task.confusion(y, logits)
    names = list(task.class_names) or [str(i) for i in range(len(cm))]
    fig, ax = plt.subplots(figsize=(1.2 * len(cm) + 2, 1.2 * len(cm) + 1.5))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in __import__("numpy").ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set(xticks=range(len(cm)), yticks=range(len(cm)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title=title)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(root: Path) -> None:
    from . import report as rep
    from .tracking import tracking_uri

    rep.build(tracking_uri(root), root / "reports")
