"""What `dvc exp show` and `dvc plots` compare, in git-tracked files under results/<w>/.

summary.json: the few headline figures per variant that `dvc exp show` compares.

The long tables (every split's metrics, every benchmark point) stay in train.json, evaluate.json and
benchmark.json; this file picks, per variant, the quality against its baseline, the training speed, tune's
best value and the benchmark's plain and best GPU/CPU speedups. Numbers only (DVC tabulates numbers), so a
metric's name sits in the key. curves.csv (train) and sweep.csv (benchmark): the data of `dvc plots`.
"""
from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import progress
from .config import Config
from .io import atomic_file, read_json, write_json
from .timing import work
from .workloads import Workload

SPEED_KINDS = ("throughput", "ablation")


def setting_label(tag: Callable[[str], str]) -> str:
    """fp32, bf16+CL+compile+fused+graphs, ...: how a measurement ran, from its tags (`tag(name)` -> '' if absent)."""
    mode = tag("compile_mode")
    compiled = "compile" + (f"({mode})" if mode not in ("", "default") else "")
    flags = [("channels_last", "CL"), ("compile", compiled), ("fused_optimizer", "fused")]
    graphs = tag("cuda_graphs") == "true" and tag("cuda_graphs_applied") in ("", "on")  # not where a no-op (CPU)
    return "+".join([tag("precision") or "fp32"] + [label for key, label in flags if tag(key) == "true"] + ["graphs"] * graphs)


def _optional(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def headline(evaluate: dict[str, Any], variant: str, best: dict[str, Any] | None, models: list[str]) -> dict[str, Any]:
    """The verdict evaluate.json gives for `variant` (its "verdict" key), else the test split's tuning objective
    against the strongest baseline scored on it (evaluate.json's entries that are not among `models`)."""
    verdict = evaluate.get("verdict")
    if isinstance(verdict, dict) and "metric" not in verdict:  # one verdict per variant
        verdict = verdict.get(variant)
    if isinstance(verdict, list):
        verdict = next((v for v in verdict if v.get("model") == variant), None)
    if isinstance(verdict, dict) and verdict.get("model") in (None, variant):
        return {"metric": verdict["metric"], "value": verdict.get("model_value"), "baseline": verdict.get("baseline_value"),
                "beats": verdict.get("beats_baseline"), "margin_ci95": verdict.get("margin_ci95")}  # fmt: skip
    if isinstance(verdict, dict) and "metric" in verdict:  # another variant is the best: the same metric, no claim
        reference = verdict.get("baseline") == variant  # quantum's raw pixels: what the others are judged against
        return {"metric": verdict["metric"], "value": (evaluate.get(variant) or {}).get(verdict["metric"]),
                "baseline": None if reference else verdict.get("baseline_value"), "beats": None, "judged": False}
    objective = (best or {}).get("objective") or "val/loss"
    metric = "test/" + objective.split("/", 1)[-1]
    value = (evaluate.get(variant) or {}).get(metric)
    baselines = [m[metric] for name, m in evaluate.items() if name not in (*models, "verdict") and isinstance(m, dict)
                 and m.get(metric) is not None]  # fmt: skip
    pick = max if (best or {}).get("direction") == "maximize" else min  # the strongest baseline
    return {"metric": metric, "value": value, "baseline": pick(baselines, default=None), "beats": None}


def speedups(records: list[dict[str, Any]], variant: str) -> dict[str, Any]:
    """GPU/CPU samples/s: plain (the default batch, the params as written) and best (each side's fastest point)."""
    rs = [r for r in records if r.get("kind") in SPEED_KINDS and r.get("variant") == variant
          and r.get("bench/samples_per_s") is not None]  # fmt: skip
    cpus = [r for r in rs if r.get("device") == "cpu"]
    gpus = [r for r in rs if r.get("device") != "cpu"]
    if not (cpus and gpus):
        return {"plain": None, "best": None, "best_gpu": None, "best_cpu": None}
    plain = lambda side: next((r for r in side if r.get("kind") == "throughput" and r.get("batch_role") == "default"), None)  # noqa: E731
    fastest = lambda side: max(side, key=lambda r: r["bench/samples_per_s"])  # noqa: E731
    pc, pg, bc, bg = plain(cpus), plain(gpus), fastest(cpus), fastest(gpus)
    describe = lambda r: f"b{r.get('batch_size')} {setting_label(lambda k: str(r.get(k, '')))}"  # noqa: E731
    return {
        "plain": pg["bench/samples_per_s"] / pc["bench/samples_per_s"] if pc and pg else None,
        "best": bg["bench/samples_per_s"] / bc["bench/samples_per_s"],
        "best_gpu": describe(bg),
        "best_cpu": describe(bc),
    }


def variant_summary(variant: str, models: list[str], results: Path) -> dict[str, Any]:
    """One variant's headline figures, in the order a reader compares them; a stage that has not written its
    file yet leaves its figures out."""
    train = (_optional(results / "train.json") or {}).get(variant, {})
    best = (_optional(results / "best_params.json") or {}).get(variant)
    evaluate = _optional(results / "evaluate.json") or {}
    records = (_optional(results / "benchmark.json") or {}).get("records", [])
    q = headline(evaluate, variant, best, models)
    s = speedups(records, variant)
    out = {
        q["metric"]: q["value"],
        "baseline": q["baseline"],  # the same test metric, for the strongest baseline
        "epoch_s": train.get("time/epoch_s"),
        "samples/s": train.get("throughput/samples_per_s"),
        f"tuned {(best or {}).get('objective', '')}".strip(): (best or {}).get("value"),  # tune's best trial
        "speedup": s["plain"],
        "best_speedup": s["best"],
    }
    return {k: v for k, v in out.items() if v is not None}


def write(workload: str, variants: list[str], results: Path) -> dict[str, Any]:
    """Flat keys `<workload>/[<model>/]<figure>` (the model where the workload compares several): DVC names a
    column by its key, so each is unique across workloads (stock's and rnn's lstm), short, and apart from the
    params (`guava.train.lr`): `--keep 'guava/'` shows one workload. DVC keeps the file's order of columns."""
    several = len(variants) > 1
    summary = {f"{workload}/{variant + '/' if several else ''}{figure}": value
               for variant in variants for figure, value in variant_summary(variant, variants, results).items()}  # fmt: skip
    write_json(results / "summary.json", summary, sort_keys=False)
    return summary


def stage(cfg: Config, wl: Workload, root: Path) -> None:
    """summary@<w>: reads the other stages' JSON (no framework, no MLflow), writes summary.json."""
    results = root / "results" / wl.name
    progress.read(f"results/{wl.name}: best_params.json, train.json, evaluate.json, benchmark.json")
    with work():
        figures = write(wl.name, list(wl.variants(cfg.params(wl.name))), results)
    progress.result(f"{len(figures)} headline figures in results/{wl.name}/summary.json")


# `dvc plots` data, long form: the template (vega/lines.json) draws a chart per `chart` value, titled by it, and
# a line per `line` value; git-tracked under results/, so that `dvc plots diff` compares experiments.


def _write_rows(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_curves(workload: str, histories: dict[str, list[dict[str, float]]], path: Path) -> None:
    """Loss (train and val) and each validation metric against epoch: a chart per quantity, a line per model
    and split."""
    rows = []
    for variant, history in histories.items():
        for epoch, row in enumerate(history, 1):
            for key, value in row.items():
                split, _, quantity = key.partition("/")
                if value is not None and split in ("train", "val") and (quantity == "loss" or split == "val"):
                    rows.append([epoch, value, f"{variant} {split}", f"{workload}: {quantity}"])
    _write_rows(path, ["epoch", "value", "line", "chart"], rows)


def write_sweep(workload: str, records: list[dict[str, Any]], path: Path) -> None:
    """Training samples/s against batch size: a line per model, framework and device."""
    rows = sorted([r["batch_size"], r["bench/samples_per_s"], f"{r['variant']} {r['framework']} {r['device']}",
                   f"{workload}: training samples/s against batch size"]
                  for r in records if r.get("kind") == "throughput" and r.get("bench/samples_per_s"))  # fmt: skip
    _write_rows(path, ["batch_size", "samples_per_s", "line", "chart"], rows)
