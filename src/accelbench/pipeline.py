"""The stages that train: tune, and train, which evaluates what it trained; stages/*.py call them through cli.main."""
from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Any

import numpy as np

from . import distributed, progress
from . import summary as headline
from .checkpoint import Checkpoint, params_hash
from .config import Config, as_dict, flatten, parse, with_overrides
from .devices import Runtime
from .engines import get_engine
from .errors import ConfigError
from .io import SPLITS, Prepared, atomic_dir, atomic_file, load_prepared, read_json, write_json
from .project import checkpoint_dir, model_dir, prepared_dir, results_dir
from .runtime import framework_for, runtime_for
from .timing import work
from .tracking import check_server, main_rank_run, run_name, stage_run, tracking_uri
from .workloads import Workload

HOST_TAGS = {"device": "cpu", "framework": "none", "precision": "n/a"}


def tune(cfg: Config, wl: Workload, root: Path) -> None:
    from . import tuning  # Optuna and the claims' SQLAlchemy: train does without them

    check_server(tracking_uri(root))  # a wrong URL or bad credentials: one line before any work
    runtime = runtime_for(cfg, wl)
    prepared = read_prepared(root, wl.name)
    params = cfg.params(wl.name)
    with work():
        best = {
            variant: tuning.run_study(cfg, wl, variant, with_overrides(params, overrides), runtime, prepared, root)
            for variant, overrides in wl.variants(params).items()
        }
    write_json(results_dir(root, wl.name) / "best_params.json", best)
    progress.result("; ".join(f"{v}: best {b['objective']} {_num(b['value'])}" for v, b in best.items()))


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _split_sizes(prepared: Prepared) -> str:
    return ", ".join(f"{s} {prepared.n(s):,}" for s in SPLITS) + " rows"


def read_prepared(root: Path, name: str) -> Prepared:
    """Load the prepared splits and say so: the stage's what-was-read line."""
    prepared = load_prepared(prepared_dir(root, name))
    progress.read(f"data/prepared/{name}: {_split_sizes(prepared)}")
    return prepared


def headline_params(runtime: Runtime, variant: str, batch_size: int) -> dict[str, Any]:
    """The params a training run shares with the benchmark runs, so that MLflow's plots line both kinds up."""
    tags = runtime.tags()
    return {"variant": variant, "device": tags["device"], "framework": tags["framework"], "batch_size": batch_size,
            "setting": headline.setting_label(lambda k: tags.get(k, ""))}  # fmt: skip


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
    """Train every variant, then evaluate the saved models in the same process: a second stage would start
    Python, torch, CUDA, cuDNN and the MLflow store all over again, for less work than that start-up itself."""
    check_server(tracking_uri(root))  # a wrong URL or bad credentials: one line before any work
    cfg = distributed.for_workload(cfg, wl)
    if distributed.needs_relaunch(cfg, framework_for(cfg, wl)):
        distributed.local_gpus_needed(cfg)
        distributed.relaunch(cfg, "train", wl.name, root)  # the same stage, once per rank, under torchrun
        if cfg.distributed.node_rank == 0:  # where rank 0 saved the models
            progress.result(evaluate(cfg, wl, root, read_prepared(root, wl.name)))
        return
    runtime = runtime_for(cfg, wl, data_parallel=True)
    prepared = read_prepared(root, wl.name)
    try:
        trained = _train(cfg, wl, root, runtime, prepared)
    finally:
        distributed.leave()
    if runtime.is_main and not distributed.under_torchrun():  # under torchrun, the parent process evaluates
        progress.result(f"{trained}; {evaluate(cfg, wl, root, prepared)}")


def _train(cfg: Config, wl: Workload, root: Path, runtime: Runtime, prepared: Prepared) -> str:
    """Every variant trained, saved and logged; returns the stage's result line on them."""
    task = wl.task(prepared.meta)
    engine = get_engine(runtime.framework)
    variants = variant_params(cfg, wl, root)
    out = results_dir(root, wl.name)
    ckpt_dir = checkpoint_dir(root, wl.name)
    ckpt_dir.mkdir(parents=True, exist_ok=True)  # a DVC persist output: it must exist even when unused
    main = runtime.is_main  # only rank 0 of a data-parallel run logs and writes outputs
    all_metrics, histories = {}, {}
    with atomic_dir(model_dir(root, wl.name)) if main else contextlib.nullcontext() as models:
        for variant, (params, best) in variants.items():
            train_params = distributed.effective_train(params.train, runtime.world_size, cfg.distributed)
            logged = {**flatten({"model": as_dict(getattr(params, "model", {})), "train": as_dict(params.train)}),
                      **headline_params(runtime, variant, params.train.batch_size)}  # fmt: skip
            tags = {
                "variant": variant,
                "study": cfg.study,
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
            with main_rank_run(main, wl.name, "train", runtime.tags(), logged, name=name, system_metrics=True, tags=tags) as run, work():
                log_data_record(run, prepared.meta, results_dir(root, wl.name) / "eda")
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
            histories[variant] = result.history
            if main:
                _write_history(out / "history" / f"{variant}.csv", result.history)
    if main:
        headline.write_curves(wl.name, histories, out / "curves.csv")
        write_json(out / "train.json", all_metrics)
    return "; ".join(f"{v}: {_num(m.get('time/epoch_s'))} s/epoch, val/loss {_num(m.get('val/loss'))}" for v, m in all_metrics.items())


def log_data_record(run: Any, meta: dict[str, Any], eda: Path) -> None:
    """What the data stages read (they open no MLflow store) rides on each training run: source tags and the EDA."""
    source = meta.get("source") or {}
    run.set_tags({f"data.{k}": v for k, v in source.items() if isinstance(v, (str, int, float, bool))})
    if eda.is_dir():
        run.log_artifacts(eda, "eda")


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    keys = sorted({k for row in history for k in row})
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", *keys])
        writer.writeheader()
        for i, row in enumerate(history, 1):
            writer.writerow({"epoch": i, **row})


def evaluate(cfg: Config, wl: Workload, root: Path, prepared: Prepared) -> str:
    """The saved models, reloaded as a user would load them, scored on val and test beside the baselines;
    returns the stage's result line on the test split."""
    runtime = runtime_for(cfg, wl)
    task = wl.task(prepared.meta)
    engine = get_engine(runtime.framework)
    inputs = prepared.meta.get("inputs", ["x"])
    variants = wl.variants(cfg.params(wl.name))
    all_metrics, test_logits = {}, {}
    with atomic_dir(results_dir(root, wl.name) / "plots") as plots:
        for variant in variants:
            folder = model_dir(root, wl.name) / variant
            info = read_json(folder / "model.json")
            if info["framework"] != runtime.framework:
                raise ConfigError(f"{folder}: trained with {info['framework']}, framework is {runtime.framework}; rerun train")
            params = parse(wl.Params, info["params"], str(folder / "model.json"))  # exactly what was trained
            name = run_name("evaluate", runtime.tags(), variant if len(variants) > 1 else None)
            with stage_run(wl.name, "evaluate", runtime.tags(), name=name, tags={"variant": variant}) as run, work():
                model = engine.load(folder, wl.build_model(runtime.framework, params, prepared.meta), runtime)
                inputs_v, _ = wl.precompute(params, prepared, runtime)
                metrics: dict[str, float] = {}
                for split in ("val", "test"):
                    arrays = inputs_v.splits[split]
                    logits = engine.predict(model, task, arrays, inputs, runtime, prepared.meta.get("eval_batch_size", 4096))
                    metrics.update(task.metrics(arrays["y"], logits, split))
                    metrics.update(wl.evaluate_extra(params, prepared, split, logits, plots, f"{variant}_{split}"))
                    test_logits[variant] = logits  # test is the last split: its outputs stay
                    if task.kind != "regression":
                        title = f"{wl.name}/{variant} {split}"
                        _confusion_png(task, arrays["y"], logits, plots / f"{variant}_confusion_{split}.png", title)
                run.log_metrics(metrics)
                for png in sorted(plots.glob(f"{variant}_*")):
                    run.log_artifact(png, "plots")
            all_metrics[variant] = metrics
        with work():
            baselines = wl.baselines(cfg.params(wl.name), prepared, plots)
        for baseline, result in baselines.items():
            with stage_run(wl.name, "evaluate", HOST_TAGS, name=f"baseline-{baseline}",
                           tags={"variant": baseline, "baseline": "true"}) as run:  # fmt: skip
                run.log_metrics(result.metrics)
            all_metrics[baseline] = result.metrics
    models = {v: (all_metrics[v], test_logits[v]) for v in variants}
    with work():
        verdict = wl.verdict(cfg.params(wl.name), prepared, models, baselines, cfg.seed)
    if verdict is not None:
        all_metrics["verdict"] = verdict
        print(f"{wl.name}: verdict: {verdict['model']} {verdict['metric']} {verdict['model_value']:.4g} against "
              f"{verdict['baseline']} {verdict['baseline_value']:.4g}, margin {verdict['margin']:+.4g} "
              f"(95% CI {verdict['margin_ci95'][0]:+.4g} to {verdict['margin_ci95'][1]:+.4g}): {verdict['note']}", flush=True)  # fmt: skip
    write_json(results_dir(root, wl.name) / "evaluate.json", all_metrics)
    test = lambda m: ", ".join(f"{k} {_num(v)}" for k, v in m.items() if k.startswith("test/"))  # noqa: E731
    return "; ".join(f"{name}: {test(m)}" for name, m in all_metrics.items() if isinstance(m, dict) and test(m))


def _confusion_png(task, y, logits, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = task.confusion(y, logits)
    names = list(task.class_names) or [str(i) for i in range(len(cm))]
    fig, ax = plt.subplots(figsize=(1.2 * len(cm) + 2, 1.2 * len(cm) + 1.5))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set(xticks=range(len(cm)), yticks=range(len(cm)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title=title)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
