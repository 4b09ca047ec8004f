"""One function per stage kind; stages/*.py call them through cli.main."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from . import devices, tuning
from .config import Config, as_dict, flatten, with_overrides
from .devices import Runtime
from .engines import get_engine
from .errors import ConfigError, DataError
from .io import SPLITS, atomic_dir, atomic_file, load_prepared, read_json, save_prepared, write_json
from .tracking import stage_run
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


def runtime_for(cfg: Config, wl: Workload) -> Runtime:
    if cfg.framework not in wl.frameworks:
        raise ConfigError(f"params.yaml: framework: '{wl.name}' has no {cfg.framework} model (supported: {list(wl.frameworks)})")
    device = devices.resolve(cfg.device, cfg.framework)
    runtime = Runtime(device, cfg.framework, cfg.precision, cfg.compile, cfg.seed, cfg.cpu_threads)
    get_engine(runtime.framework).setup(runtime)
    devices.seed_everything(cfg.seed, cfg.framework)
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
    best = tuning.run_study(cfg, wl, runtime, load_prepared(prepared_dir(root, wl.name)), root)
    write_json(results_dir(root, wl.name) / "best_params.json", best)


def _tuned_params(root: Path, cfg: Config, wl: Workload) -> tuple[Any, dict[str, Any]]:
    path = results_dir(root, wl.name) / "best_params.json"
    best = read_json(path) if path.is_file() else {"params": {}}
    return with_overrides(cfg.params(wl.name), best["params"]), best


def train(cfg: Config, wl: Workload, root: Path) -> None:
    runtime = runtime_for(cfg, wl)
    prepared = load_prepared(prepared_dir(root, wl.name))
    params, best = _tuned_params(root, cfg, wl)
    task = wl.task(prepared.meta)
    engine = get_engine(runtime.framework)
    logged = flatten({"model": as_dict(getattr(params, "model", {})), "train": as_dict(params.train)})
    tags = {"tuned_from": best.get("study") or "defaults", "tuned_trial": str(best.get("trial")), "cpu_threads": str(engine.threads())}
    with stage_run(wl.name, "train", runtime.tags(), logged, system_metrics=True, tags=tags) as run:
        model = wl.build_model(runtime.framework, params, prepared.meta)
        log_epoch = lambda epoch, row: run.log_metrics(row, step=epoch)  # noqa: E731
        result = engine.fit(model, task, prepared, params.train, runtime, log_epoch, f"{wl.name} {runtime.framework}")
        summary = result.summary()
        run.log_metrics(summary)  # the per-epoch curves are already in
        metrics = {**result.history[-1], **summary}
        with atomic_dir(model_dir(root, wl.name)) as tmp:
            engine.save(model, tmp)
            write_json(tmp / "model.json", {"framework": runtime.framework, "overrides": best["params"]})
        out = results_dir(root, wl.name)
        _write_history(out / "train_history.csv", result.history)
        write_json(out / "train.json", metrics)
        run.log_artifacts(model_dir(root, wl.name), "model")


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
    info = read_json(model_dir(root, wl.name) / "model.json")
    if info["framework"] != runtime.framework:
        raise ConfigError(f"{model_dir(root, wl.name)}: model was trained with {info['framework']}, framework is {runtime.framework}; rerun train")
    params = with_overrides(cfg.params(wl.name), info["overrides"])
    task = wl.task(prepared.meta)
    engine = get_engine(runtime.framework)
    inputs = prepared.meta.get("inputs", ["x"])
    with stage_run(wl.name, "evaluate", runtime.tags()) as run:
        model = engine.load(model_dir(root, wl.name), wl.build_model(runtime.framework, params, prepared.meta), runtime)
        metrics: dict[str, float] = {}
        with atomic_dir(results_dir(root, wl.name) / "plots") as plots:
            for split in ("val", "test"):
                arrays = prepared.splits[split]
                logits = engine.predict(model, task, arrays, inputs, runtime)
                metrics.update(task.metrics(arrays["y"], logits, split))
                if task.kind != "regression":
                    _confusion_png(task, arrays["y"], logits, plots / f"confusion_{split}.png", f"{wl.name} {split}")
        run.log_metrics(metrics)
        run.log_artifacts(results_dir(root, wl.name) / "plots", "plots")
        write_json(results_dir(root, wl.name) / "evaluate.json", metrics)


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
