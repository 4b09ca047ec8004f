"""reports/: the CPU-vs-GPU comparison, built from the MLflow store (so several machines combine).

Reads every FINISHED run with tag stage=benchmark, keeps the newest per measurement, pairs each GPU with
the CPU of the same host where there is one (else the newest CPU), and writes report.md, a self-contained
report.html, PNG plots, and CSVs that `dvc plots show` renders.
"""
from __future__ import annotations

import base64
import csv
import html
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from . import stats
from .errors import AccelbenchError
from .io import atomic_dir, write_json

KEY_TAGS = ("workload", "variant", "kind", "device_name", "framework", "precision", "compile", "batch_size", "hardware")


@dataclass
class Rec:
    run_id: str
    run_name: str
    start: int
    tags: dict[str, str]
    metrics: dict[str, float]
    repeats: list[float] = field(default_factory=list)

    @property
    def gpu(self) -> bool:
        return self.tags.get("device", "cpu") != "cpu"

    @property
    def batch(self) -> int:
        return int(self.tags.get("batch_size") or 0)  # population records span several batch sizes: 0

    @property
    def tput(self) -> float:
        return self.metrics["bench/samples_per_s"]

    def t(self, key: str) -> str:
        return self.tags.get(key, "")


def collect(uri: str) -> list[Rec]:
    """Newest FINISHED benchmark run per measurement, with its per-repeat throughputs."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids, "tags.stage = 'benchmark' and attributes.status = 'FINISHED'", max_results=50000) if exp_ids else []
    newest: dict[tuple, Any] = {}
    for run in runs:
        key = tuple(run.data.tags.get(k, "") for k in KEY_TAGS)
        if key not in newest or run.info.start_time > newest[key].info.start_time:
            newest[key] = run
    recs = []
    for run in newest.values():
        rec = Rec(run.info.run_id, run.info.run_name, run.info.start_time, dict(run.data.tags), dict(run.data.metrics))
        if rec.t("kind") == "throughput":
            history = client.get_metric_history(rec.run_id, "bench/repeat_samples_per_s")
            rec.repeats = [m.value for m in sorted(history, key=lambda m: m.step)]
        recs.append(rec)
    return sorted(recs, key=lambda r: (r.t("workload"), r.t("variant"), r.t("framework"), r.gpu, r.t("device_name"), r.batch))


@dataclass
class Comparison:
    """One GPU against one CPU for a workload variant and framework at the reference (default) batch."""

    workload: str
    variant: str
    framework: str
    gpu: Rec
    cpu: Rec
    speedup: float
    lo: float
    hi: float
    crossover: int | None
    largest: int
    sentence: str


def compare(recs: list[Rec]) -> list[Comparison]:
    groups: dict[tuple, list[Rec]] = defaultdict(list)
    for r in recs:
        if r.t("kind") == "throughput":
            groups[(r.t("workload"), r.t("variant"), r.t("framework"), r.t("precision"))].append(r)
    out = []
    for (workload, variant, framework, _), rs in sorted(groups.items()):
        cpus = [r for r in rs if not r.gpu]
        for gpu_name in sorted({r.t("device_name") for r in rs if r.gpu}):
            gpus = [r for r in rs if r.t("device_name") == gpu_name]
            cpu_side = _cpu_side(cpus, gpus[0].t("hardware"))
            if not cpu_side:
                continue
            cpu_by_b = {r.batch: r for r in cpu_side}
            gpu_by_b = {r.batch: r for r in gpus}
            common = sorted(set(cpu_by_b) & set(gpu_by_b))
            if not common:
                continue
            ref = next((b for b in common if gpu_by_b[b].t("batch_role") == "default"), common[0])
            g, c = gpu_by_b[ref], cpu_by_b[ref]
            s, lo, hi = stats.ratio_ci(g.repeats or [g.tput], c.repeats or [c.tput])
            cross = stats.crossover(common, [cpu_by_b[b].tput for b in common], [gpu_by_b[b].tput for b in common])
            sentence = stats.verdict(s, lo, hi, ref, cross, common[-1])
            out.append(Comparison(workload, variant, framework, g, c, s, lo, hi, cross, common[-1], sentence))
    return out


def _cpu_side(cpus: list[Rec], gpu_host: str) -> list[Rec]:
    """The same host's CPU when it was measured (a fair pairing), else the most recently measured CPU."""
    same_host = [r for r in cpus if r.t("hardware") == gpu_host]
    if same_host or not cpus:
        return same_host
    newest = max(cpus, key=lambda r: r.start).t("hardware")
    return [r for r in cpus if r.t("hardware") == newest]


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


class Doc:
    """Blocks rendered to both Markdown and self-contained HTML, so the two never disagree."""

    def __init__(self):
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def markdown(self) -> str:
        out = []
        for kind, v in self.blocks:
            if kind == "h":
                out.append("#" * v[0] + " " + v[1])
            elif kind == "p":
                out.append(v)
            elif kind == "table":
                header, rows = v
                out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(r) + " |" for r in rows]
            else:
                out.append(f"![{v[1]}]({v[0].name})")
            out.append("")
        return "\n".join(out)

    def html(self) -> str:
        out = ["<!doctype html><meta charset='utf-8'><title>accelbench report</title>",
               "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
               "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}</style>"]  # fmt: skip
        for kind, v in self.blocks:
            if kind == "h":
                out.append(f"<h{v[0]}>{html.escape(v[1])}</h{v[0]}>")
            elif kind == "p":
                out.append(f"<p>{html.escape(v)}</p>")
            elif kind == "table":
                header, rows = v
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            else:
                data = base64.b64encode(v[0].read_bytes()).decode()
                out.append(f"<p><img alt='{html.escape(v[1])}' src='data:image/png;base64,{data}'></p>")
        return "\n".join(out)


def build(uri: str, out_dir: Path) -> dict[str, Any]:
    """Write the report; raise AccelbenchError with a clear message when the store has no benchmark runs."""
    recs = collect(uri)
    if not recs:
        raise AccelbenchError(
            f"{uri}: no finished benchmark runs in this MLflow store; run the benchmark stages first (dvc repro)"
        )
    comps = compare(recs)
    with atomic_dir(out_dir) as tmp:
        doc = Doc()
        summary = _write(doc, recs, comps, tmp)
        (tmp / "report.md").write_text(doc.markdown())
        (tmp / "report.html").write_text(doc.html())
        write_json(tmp / "summary.json", summary)
    return summary


def _write(doc: Doc, recs: list[Rec], comps: list[Comparison], out: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    tput = [r for r in recs if r.t("kind") == "throughput"]
    target = [r for r in recs if r.t("kind") == "time_to_target"]
    has_gpu = any(r.gpu for r in recs)
    doc.h(1, "accelbench: is the GPU worth it?")
    if not has_gpu:
        doc.p("Only CPU runs are in this store: there is no GPU side to compare yet. The CPU figures below stand "
              "alone; run `dvc exp run -S benchmark.devices=[cpu,cuda]` on a GPU machine logging to this store.")  # fmt: skip
    if comps:
        doc.h(2, "Summary")
        doc.table(
            ["workload", "variant", "framework", "CPU", "GPU", "batch", "CPU samples/s", "GPU samples/s", "speedup (95% CI)", "verdict"],
            [[c.workload, c.variant, c.framework, c.cpu.t("device_name"), c.gpu.t("device_name"), str(c.cpu.batch),
              _fmt(c.cpu.tput), _fmt(c.gpu.tput), f"{c.speedup:.2f}x ({c.lo:.2f}-{c.hi:.2f})", c.sentence] for c in comps],
        )  # fmt: skip
        _speedup_png(comps, out / "speedup.png")
        doc.img(out / "speedup.png", "GPU/CPU speedup per workload")
    doc.h(2, "Measurements")
    doc.table(
        ["workload", "variant", "framework", "device", "batch", "samples/s (95% CI)", "step ms", "compute-only samples/s",
         "input share", "J / 1k samples", "peak GPU MB", "hyperparameters"],
        [[r.t("workload"), r.t("variant"), r.t("framework"), r.t("device_name"), str(r.batch),
          f"{_fmt(r.tput)} ({_fmt(r.metrics.get('bench/samples_per_s_ci_low'))}-{_fmt(r.metrics.get('bench/samples_per_s_ci_high'))})",
          _fmt(r.metrics.get("bench/step_ms"), 2), _fmt(r.metrics.get("bench/compute_only_samples_per_s")),
          _fmt(100 * r.metrics["bench/input_share"], 1) + "%" if "bench/input_share" in r.metrics else "n/a",
          _fmt(r.metrics.get("bench/energy_j_per_1k_samples"), 2), _fmt(r.metrics.get("bench/peak_gpu_mb"), 1),
          r.t("hparams")] for r in tput],
    )  # fmt: skip
    doc.p("Energy is NVML's counter on GPUs and RAPL on the CPU where readable; n/a means the hardware exposed none.")
    sweep_dir = out / "sweep"
    sweep_dir.mkdir()
    for workload in sorted({r.t("workload") for r in tput}):
        doc.h(2, f"{workload}: samples/s against batch size")
        rs = [r for r in tput if r.t("workload") == workload]
        _sweep_png(rs, [c for c in comps if c.workload == workload], out / f"sweep_{workload}.png")
        doc.img(out / f"sweep_{workload}.png", f"{workload} batch sweep")
        _sweep_csvs(rs, sweep_dir)
        for c in (c for c in comps if c.workload == workload):
            line = sorted((r.batch, r.tput) for r in rs if (r.t("device_name"), r.t("variant"), r.t("framework"))
                          == (c.gpu.t("device_name"), c.variant, c.framework))  # fmt: skip
            stop = stats.scaling_stops([b for b, _ in line], [t for _, t in line])
            tail = f"; GPU throughput stops scaling after batch {stop}" if stop else ""
            doc.p(f"{workload}/{c.variant} ({c.framework}): {c.sentence}{tail}.")
    if target:
        doc.h(2, "Time to target quality")
        doc.table(
            ["workload", "variant", "framework", "device", "target", "reached", "seconds", "epochs", "batch", "hyperparameters"],
            [[r.t("workload"), r.t("variant"), r.t("framework"), r.t("device_name"), f"{r.t('target_metric')} {r.t('target_value')}",
              "yes" if r.metrics.get("bench/target_reached") else "no", _fmt(r.metrics.get("bench/time_to_target_s"), 2),
              _fmt(r.metrics.get("bench/epochs_to_target")), str(r.batch), r.t("hparams")] for r in target],
        )  # fmt: skip
        with open(out / "time_to_target.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "seconds"])
            for r in target:
                if r.metrics.get("bench/target_reached"):
                    w.writerow([f"{r.t('workload')}/{r.t('variant')} {r.t('framework')} {r.t('device_name')}", r.metrics["bench/time_to_target_s"]])
    _frameworks(doc, tput)
    population = _population(doc, [r for r in recs if r.t("kind") == "population"])
    doc.h(2, "Hardware")
    hosts = {}
    for r in tput or recs:  # throughput runs carry the thread count
        hosts.setdefault((r.t("hardware"), r.t("device_name")), r)
    doc.table(["device", "host CPU", "cores", "GPUs", "CUDA", "driver", "CPU threads used", "fingerprint"],
              [[r.t("device_name"), r.t("hw.cpu"), r.t("hw.cores"), r.t("hw.gpus"), r.t("hw.cuda"), r.t("hw.driver"),
                r.t("cpu_threads"), r.t("hardware")] for r in hosts.values()])  # fmt: skip
    doc.h(2, "Runs used")
    doc.table(["workload", "run", "run id", "device", "what was timed"],
              [[r.t("workload"), r.run_name, r.run_id, r.t("device_name"), r.t("timed")] for r in recs])  # fmt: skip
    return {
        "has_gpu": has_gpu,
        "runs": [r.run_id for r in recs],
        "comparisons": [{"workload": c.workload, "variant": c.variant, "framework": c.framework, "speedup": c.speedup,
                         "ci95": [c.lo, c.hi], "batch": c.cpu.batch, "crossover": c.crossover, "verdict": c.sentence,
                         "cpu_run": c.cpu.run_id, "gpu_run": c.gpu.run_id} for c in comps],
        "population": population,
    }  # fmt: skip


def _frameworks(doc: Doc, tput: list[Rec]) -> None:
    by = defaultdict(dict)
    for r in tput:
        by[(r.t("workload"), r.t("variant"), r.t("device_name"), r.batch)][r.t("framework")] = r.tput
    rows = [[w, v, d, str(b), _fmt(f.get("torch")), _fmt(f.get("tensorflow"))] for (w, v, d, b), f in sorted(by.items()) if len(f) > 1]
    if rows:
        doc.h(2, "PyTorch against TensorFlow")
        doc.table(["workload", "variant", "device", "batch", "torch samples/s", "tensorflow samples/s"], rows)


# The goals for population tuning (diabetes on an H100), quoted as measured.
GOAL_TRIALS, GOAL_EPOCHS, GOAL_WALL_S, GOAL_SPEEDUP = 1000, 150, 30.0, 1000.0


def _population(doc: Doc, recs: list[Rec]) -> list[dict[str, Any]]:
    """Population against sequential tuning per device; a GPU's population against its host's CPU sequential."""
    if not recs:
        return []
    m = lambda r, k, d=0: _fmt(r.metrics.get(f"bench/{k}"), d)  # noqa: E731
    doc.h(2, "Population tuning")
    doc.p("Trials per second of Optuna ask/train/tell loops with pruning off, every trial training the same epochs: "
          "populations (trials trained together as one stacked model) against sequential trials (one at a time, "
          "the sequential rate measured on the few trials listed and extrapolated). Population MLflow logging is "
          "timed apart (the 'logging s' column); best objectives compare both strategies at the sequential budget.")  # fmt: skip
    doc.table(
        ["workload", "variant", "device", "epochs/trial", "population trials", "population trials/s", "wall s",
         "logging s", "sequential trials", "sequential trials/s", "sequential s for the population's trials (extrapolated)",
         "same-device speedup", "objective",
         "best (all population trials)", "best population, same budget", "best sequential"],
        [[r.t("workload"), r.t("variant"), r.t("device_name"), r.t("epochs"), m(r, "population_trials"),
          m(r, "population_trials_per_s", 2), m(r, "population_wall_s", 2), m(r, "population_log_s", 2),
          m(r, "sequential_trials"), m(r, "sequential_trials_per_s", 3), m(r, "sequential_wall_s_extrapolated", 1),
          m(r, "population_speedup", 1) + "x",
          r.t("objective"), m(r, "population_best", 4), m(r, "population_best_same_budget", 4),
          m(r, "sequential_best", 4)] for r in recs],
    )  # fmt: skip
    goals = []
    for g in (r for r in recs if r.gpu):
        cpus = _cpu_side([r for r in recs if not r.gpu and (r.t("workload"), r.t("variant"), r.t("epochs"))
                          == (g.t("workload"), g.t("variant"), g.t("epochs"))], g.t("hardware"))  # fmt: skip
        cpu = max(cpus, key=lambda r: r.start) if cpus else None
        speedup = g.metrics["bench/population_trials_per_s"] / cpu.metrics["bench/sequential_trials_per_s"] if cpu else None
        at_goal_size = int(g.metrics["bench/population_trials"]) >= GOAL_TRIALS and int(g.t("epochs") or 0) >= GOAL_EPOCHS
        pop_best, seq_best = g.metrics.get("bench/population_best_same_budget"), g.metrics.get("bench/sequential_best")
        better = (lambda a, b: a <= b) if g.t("direction") == "minimize" else (lambda a, b: a >= b)
        goals.append({
            "workload": g.t("workload"), "variant": g.t("variant"), "gpu": g.t("device_name"),
            "cpu": cpu.t("device_name") if cpu else None, "speedup_vs_cpu_sequential": speedup,
            "speedup_goal_met": speedup >= GOAL_SPEEDUP if speedup is not None else None,
            "trials": int(g.metrics["bench/population_trials"]), "epochs": int(g.t("epochs") or 0),
            "wall_s": g.metrics["bench/population_wall_s"],
            "wall_goal_met": g.metrics["bench/population_wall_s"] < GOAL_WALL_S if at_goal_size else None,
            "best_population": pop_best, "best_sequential": seq_best,
            "best_goal_met": better(pop_best, seq_best) if None not in (pop_best, seq_best) else None,
        })  # fmt: skip
    if goals:
        yes = lambda v: "n/a" if v is None else ("yes" if v else "no")  # noqa: E731
        doc.p(f"Goals: GPU population tuning at least {GOAL_SPEEDUP:,.0f}x the trials/s of sequential tuning on the same "
              f"host's CPU; {GOAL_TRIALS:,} trials of {GOAL_EPOCHS} epochs in under {GOAL_WALL_S:.0f} s (n/a when "
              "measured at a smaller size); a best objective at least as good as sequential tuning's with the same "
              "budget of trials.")  # fmt: skip
        doc.table(
            ["workload", "variant", "GPU", "CPU", "speedup over CPU sequential", f">= {GOAL_SPEEDUP:,.0f}x",
             "trials x epochs", "wall s", f"< {GOAL_WALL_S:.0f} s", "best population / sequential", "at least as good"],
            [[x["workload"], x["variant"], x["gpu"], x["cpu"] or "none measured", _fmt(x["speedup_vs_cpu_sequential"], 0) + "x",
              yes(x["speedup_goal_met"]), f"{x['trials']:,} x {x['epochs']}", _fmt(x["wall_s"], 2), yes(x["wall_goal_met"]),
              f"{_fmt(x['best_population'], 4)} / {_fmt(x['best_sequential'], 4)}", yes(x["best_goal_met"])] for x in goals],
        )  # fmt: skip
    return goals


def _speedup_png(comps: list[Comparison], path: Path) -> None:
    import matplotlib.pyplot as plt

    labels = [f"{c.workload}/{c.variant}\n{c.framework} b{c.cpu.batch}" for c in comps]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(comps)), 3.5))
    ax.bar(labels, [c.speedup for c in comps], yerr=[[c.speedup - c.lo for c in comps], [c.hi - c.speedup for c in comps]],
           color=["tab:green" if c.speedup >= 1 else "tab:red" for c in comps], capsize=4)  # fmt: skip
    ax.axhline(1, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set(ylabel="GPU / CPU samples/s (95% CI)", title="Speedup at each workload's default batch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _sweep_png(rs: list[Rec], comps: list[Comparison], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lines = defaultdict(list)
    for r in rs:
        lines[(r.t("variant"), r.t("framework"), r.t("device_name"))].append((r.batch, r.tput))
    for (variant, framework, device), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=f"{variant} {framework} {device}")
    for c in comps:
        if c.crossover:
            ax.axvline(c.crossover, ls="--", color="gray")
            ax.annotate(f"GPU wins from {c.crossover}", (c.crossover, ax.get_ylim()[0]), rotation=90, fontsize=7, va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="batch size", ylabel="training samples/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _sweep_csvs(rs: list[Rec], folder: Path) -> None:
    lines = defaultdict(list)
    for r in rs:
        lines[f"{r.t('workload')}-{r.t('variant')}-{r.t('framework')}-{r.t('device')}"].append((r.batch, r.tput))
    for name, pts in lines.items():
        with open(folder / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["batch_size", "samples_per_s"])
            w.writerows(sorted(pts))
