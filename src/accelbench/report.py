"""reports/: the CPU-vs-GPU comparison, built from the MLflow store (so several machines combine).

Reads every FINISHED run with tag stage=benchmark, keeps the newest per measurement, pairs each GPU with
the CPU of the same host where there is one (else the newest CPU), and writes report.md, a self-contained
report.html and PNG plots.
"""
from __future__ import annotations

import base64
import html
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from . import progress, stats
from .errors import AccelbenchError
from .io import atomic_dir, read_json, write_json
from .project import reports_dir
from .summary import headline, setting_label, speedups
from .timing import work
from .tracking import check_server, tracking_uri

KEY_TAGS = ("workload", "variant", "kind", "device_name", "framework", "precision", "compile", "compile_mode", "channels_last", "cuda_graphs",
            "fused_optimizer", "setting", "batch_size", "hardware", "world_size")  # fmt: skip


@dataclass
class Rec:
    run_id: str
    run_name: str
    start: int
    tags: dict[str, str]
    metrics: dict[str, float]
    repeats: list[float] = field(default_factory=list)
    intervals: list[float] = field(default_factory=list)  # throughput of each interleaved interval
    previous: Rec | None = None  # the same measurement from the run of the study before this one, if stored

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

    @property
    def session(self) -> str:
        """The benchmark stage call that measured it (older records without one: the run itself)."""
        return self.t("bench_session") or self.run_id


def collect(uri: str) -> list[Rec]:
    """Newest FINISHED benchmark run per measurement, with its per-repeat throughputs; a throughput measured by an
    earlier run of the study too carries that run's record as `previous`."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids, "tags.stage = 'benchmark' and attributes.status = 'FINISHED'", max_results=50000) if exp_ids else []
    by_key: dict[tuple, list[Any]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
        by_key[tuple(run.data.tags.get(k, "") for k in KEY_TAGS)].append(run)
    recs = []
    for history in by_key.values():
        rec = _rec(client, history[0])
        if rec.t("kind") == "throughput":
            earlier = next((r for r in history[1:] if r.data.tags.get("bench_session", r.info.run_id) != rec.session), None)
            rec.previous = _rec(client, earlier) if earlier else None
        recs.append(rec)
    return sorted(recs, key=lambda r: (r.t("workload"), r.t("variant"), r.t("framework"), r.gpu, r.t("device_name"), r.batch))


def _rec(client: mlflow.MlflowClient, run: Any) -> Rec:
    rec = Rec(run.info.run_id, run.info.run_name, run.info.start_time, dict(run.data.tags), dict(run.data.metrics))
    if rec.t("kind") in ("throughput", "scaling"):
        rec.repeats = _series(client, rec.run_id, "bench/repeat_samples_per_s")
    if rec.t("kind") == "throughput":
        rec.intervals = _series(client, rec.run_id, "bench/interval_samples_per_s")
    return rec


def _series(client: mlflow.MlflowClient, run_id: str, metric: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]


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
    ci_from: str = "intervals"  # what the CI spans: interleaved intervals, or (older records) one interval's repeats


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
            s, lo, hi, ci_from = speedup_ci(g, c)
            cross = stats.crossover(common, [cpu_by_b[b].tput for b in common], [gpu_by_b[b].tput for b in common])
            sentence = stats.verdict(s, lo, hi, ref, cross, common[-1])
            out.append(Comparison(workload, variant, framework, g, c, s, lo, hi, cross, common[-1], sentence, ci_from))
    return out


def speedup_ci(gpu: Rec, cpu: Rec) -> tuple[float, float, float, str]:
    """GPU/CPU samples/s with its 95% CI over the interleaved intervals; records from before intervals were timed
    (or with one interval) fall back to the repeats of their one interval, and say so."""
    if len(gpu.intervals) > 1 and len(cpu.intervals) > 1:
        return (*stats.interval_ratio_ci(gpu.intervals, cpu.intervals), "intervals")
    return (*stats.ratio_ci(gpu.repeats or [gpu.tput], cpu.repeats or [cpu.tput]), "repeats of one interval")


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
        """A column with no value in any row is left out, and a line under the table names it."""
        empty = [i for i in range(len(header)) if rows and all(r[i] in ("", "n/a", "None") for r in rows)]
        keep = [i for i in range(len(header)) if i not in empty]
        self.blocks.append(("table", ([header[i] for i in keep], [[r[i] for i in keep] for r in rows])))
        if empty:
            self.p("Left out, no row has a value: " + ", ".join(header[i] for i in empty) + ".")

    def code(self, text: str) -> None:
        """A command to paste into a shell: a fenced block in Markdown, <pre> in HTML."""
        self.blocks.append(("code", text))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def markdown(self) -> str:
        out = []
        for kind, v in self.blocks:
            if kind == "h":
                out.append("#" * v[0] + " " + v[1])
            elif kind == "p":
                out.append(v)
            elif kind == "code":
                out += ["```bash", v, "```"]
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
               "<style>body{font-family:sans-serif;max-width:1240px;margin:auto;padding:0 12px}"
               "table{border-collapse:collapse;font-size:13px;margin-bottom:4px}"
               "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}"
               "th{background:#f3f3f3}pre{background:#f6f6f6;padding:8px;overflow-x:auto}"
               "img{max-width:100%}</style>"]  # fmt: skip
        for kind, v in self.blocks:
            if kind == "h":
                out.append(f"<h{v[0]}>{html.escape(v[1])}</h{v[0]}>")
            elif kind == "p":
                out.append(f"<p>{html.escape(v)}</p>")
            elif kind == "code":
                out.append(f"<pre><code>{html.escape(v)}</code></pre>")
            elif kind == "table":
                header, rows = v
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            else:
                data = base64.b64encode(v[0].read_bytes()).decode()
                out.append(f"<p><img alt='{html.escape(v[1])}' src='data:image/png;base64,{data}'></p>")
        return "\n".join(out)


def build_for_project(root: Path) -> dict[str, Any]:
    """The report stage: the project's tracking store (or server) -> reports/."""
    uri = tracking_uri(root)
    check_server(uri)  # a wrong URL or bad credentials: one line now, not minutes of retries
    progress.read(f"the benchmark runs in {uri}")
    with work():
        summary = build(uri, reports_dir(root), root / "results")
    progress.result(f"open {reports_dir(root) / 'report.html'}; browse every run with make ui")
    return summary


def build(uri: str, out_dir: Path, results: Path | None = None) -> dict[str, Any]:
    """Write the report; raise AccelbenchError with a clear message when the store has no benchmark runs.

    `results`: the project's results/ folder, where each workload's evaluate.json gives the quality beside speed.
    """
    recs = collect(uri)
    if not recs:
        raise AccelbenchError(
            f"{uri}: no finished benchmark runs in this MLflow store; run the benchmark stages first (dvc repro; "
            "`dvc repro --force` where dvc.lock came with a clone: git carries it, not the store)"
        )
    comps = compare(recs)
    with atomic_dir(out_dir) as tmp:
        doc = Doc()
        answers = _answer(doc, recs, comps, results)
        summary = {**_write(doc, recs, comps, tmp), "answers": answers}
        _terms(doc)
        (tmp / "report.md").write_text(doc.markdown())
        (tmp / "report.html").write_text(doc.html())
        write_json(tmp / "summary.json", summary)
        _readable_by_all(tmp)
    return summary


def _readable_by_all(folder: Path) -> None:
    """A temp folder is 0700: the report is for everyone on the host (a web server, a colleague)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


GPU_COMMAND = "dvc exp run -S study=gpu"  # params.yaml: studies.gpu (the device, both benchmark sides, GPU sizes)


def _quality(results: Path | None, workload: str, variant: str, models: list[str]) -> tuple[str, dict[str, Any]]:
    """'test/roc_auc 0.812, baseline 0.790: beats it' from evaluate.json (its verdict where present)."""
    evaluate_path = results / workload / "evaluate.json" if results else None
    if not (evaluate_path and evaluate_path.is_file()):
        return "not evaluated", {}
    best_path = results / workload / "best_params.json"
    best = read_json(best_path).get(variant) if best_path.is_file() else None
    q = headline(read_json(evaluate_path), variant, best, models)
    if q["value"] is None:
        return f"{q['metric']} not in evaluate.json", q
    text = f"{q['metric']} {q['value']:.3g}"
    if q["baseline"] is None:
        return text + " (no baseline scored)", q
    beats = q["beats"] if q["beats"] is not None else None
    if beats is None and best and q.get("judged", True):  # the verdict judged only the best variant
        higher = best.get("direction") == "maximize"
        beats = q["value"] > q["baseline"] if higher else q["value"] < q["baseline"]
    return text + f", baseline {q['baseline']:.3g}" + _judgement(beats, q.get("margin_ci95")), q


def _judgement(beats: bool | None, margin_ci95: list[float] | None) -> str:
    """The verdict's words: beaten only when the margin's interval lies clear of 0 (the margin is signed so that
    above 0 is better for the model)."""
    if beats is None:
        return ""
    if beats:
        return ": beats it"
    if margin_ci95 and margin_ci95[1] < 0:
        return ": loses to it"
    if margin_ci95:
        return f": no clear difference (margin's 95% interval {margin_ci95[0]:.3g} to {margin_ci95[1]:.3g})"
    return ": loses to it"


def _answer(doc: Doc, recs: list[Rec], comps: list[Comparison], results: Path | None) -> list[dict[str, Any]]:
    """The report's first lines: per workload and model, the plain and the best GPU/CPU speedup, quality beside."""
    doc.h(1, "accelbench: is the GPU worth it?")
    has_gpu = any(r.gpu for r in recs)
    if not has_gpu:
        doc.p("Only CPU runs are in this store: there is no GPU side to compare yet, so no speedup can be given. "
              "To get the answer, run this on a host with an NVIDIA GPU, logging to this store (same folder, "
              "or MLFLOW_TRACKING_URI pointing at a shared server), then rebuild the report with dvc repro report:")  # fmt: skip
        doc.code(GPU_COMMAND)
    measured = _measured(recs)
    rows, out = [], []
    for workload, variant in sorted({(r.t("workload"), r.t("variant")) for r in measured}):
        models = sorted({r.t("variant") for r in recs if r.t("workload") == workload})
        quality, q = _quality(results, workload, variant, models)
        points = [{**r.tags, **r.metrics, "batch_size": r.batch} for r in measured if r.t("workload") == workload]
        s = speedups(points, variant)
        plain = next((c for c in comps if (c.workload, c.variant) == (workload, variant)), None)
        plain_text = f"{plain.speedup:.2f}x (95% CI {plain.lo:.2f}-{plain.hi:.2f})" if plain else "no GPU measured"
        best_text = f"{s['best']:.2f}x (GPU {s['best_gpu']} against CPU {s['best_cpu']})" if s["best"] else "no GPU measured"
        rows.append([f"{workload} / {variant}", plain_text, best_text, quality])
        out.append({"workload": workload, "variant": variant, "plain": plain.speedup if plain else None,
                    "best": s["best"], "best_gpu": s["best_gpu"], "best_cpu": s["best_cpu"], "quality": q})  # fmt: skip
    doc.h(2, "The answer")
    doc.table(["workload / model", "plain speedup (same code, fp32, default batch)", "best speedup (each side's fastest setting)",
               "quality on the test split, against the best baseline"], rows)  # fmt: skip
    doc.p("Speedup is GPU samples/s divided by CPU samples/s in training steps: above 1x the GPU is faster. "
          "A setting reads batch size, precision, then the options on (see Terms at the end). Quality is the trained "
          "model's, from evaluate.json; a model that loses to its baseline is not worth speeding up yet.")  # fmt: skip
    return out


def _terms(doc: Doc) -> None:
    doc.h(2, "Terms")
    doc.table(["term", "meaning"], [
        ["samples/s", "training samples processed per second in timed training steps (warm-up excluded, device synchronised)"],
        ["95% CI", "the range the median lies in with 95% confidence, from the timed repeats"],
        ["plain speedup", "the same code on both devices: fp32, no compile, the default batch size from params.yaml"],
        ["best speedup", "the GPU's fastest measured point against the CPU's fastest, each at its own batch and setting"],
        ["b64", "batch size 64"],
        ["fp32 / bf16 / fp16", "the number format of the arithmetic (bf16 and fp16: autocast mixed precision)"],
        ["CL", "channels-last memory layout for image tensors"],
        ["compile", "torch.compile (its mode in brackets where not the default)"],
        ["fused", "the fused (single-kernel) optimiser step"],
        ["graphs", "CUDA graphs: a step's kernels replayed as one launch"],
        ["tuned batch", "the batch size this device's own Optuna study picked; the model itself stays as written"],
        ["input share", "the share of step time spent assembling batches, from the same steps on synthetic data"],
        ["J / 1k samples", "energy per 1,000 samples: NVML on GPUs, RAPL on CPUs where readable"],
    ])  # fmt: skip


def _write(doc: Doc, recs: list[Rec], comps: list[Comparison], out: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    tput = [r for r in recs if r.t("kind") == "throughput"]
    if comps:
        _summary(doc, comps, out)
    _measurements(doc, tput)
    stability = _stability(doc, tput, comps)
    _sweeps(doc, tput, comps, out)
    _time_to_target(doc, [r for r in recs if r.t("kind") == "time_to_target"])
    goals = _goals(doc, recs)
    ablation = _ablation(doc, recs)
    _frameworks(doc, tput)
    _scaling(doc, [r for r in recs if r.t("kind") == "scaling"], out)
    _circuits(doc, [r for r in recs if r.t("kind") == "circuits"])
    population = _population(doc, [r for r in recs if r.t("kind") == "population"])
    _hardware(doc, tput or recs)  # throughput runs carry the thread count
    doc.h(2, "Runs used")
    doc.table(["workload", "run", "run id", "device", "what was timed"],
              [[r.t("workload"), r.run_name, r.run_id, r.t("device_name"), r.t("timed")] for r in recs])  # fmt: skip
    return {
        "has_gpu": any(r.gpu for r in recs),
        "runs": [r.run_id for r in recs],
        "comparisons": [{"workload": c.workload, "variant": c.variant, "framework": c.framework, "speedup": c.speedup,
                         "ci95": [c.lo, c.hi], "ci_from": c.ci_from, "batch": c.cpu.batch, "crossover": c.crossover, "verdict": c.sentence,
                         "cpu_run": c.cpu.run_id, "gpu_run": c.gpu.run_id} for c in comps],
        "goals": goals,
        "ablation": ablation,
        "population": population,
        **stability,
    }  # fmt: skip


def _summary(doc: Doc, comps: list[Comparison], out: Path) -> None:
    doc.h(2, "Summary")
    doc.table(
        ["workload", "variant", "framework", "CPU", "GPU", "batch", "CPU samples/s", "GPU samples/s", "speedup (95% CI)", "verdict"],
        [[c.workload, c.variant, c.framework, c.cpu.t("device_name"), c.gpu.t("device_name"), str(c.cpu.batch),
          _fmt(c.cpu.tput) + _mark(c.cpu), _fmt(c.gpu.tput) + _mark(c.gpu), f"{c.speedup:.2f}x ({c.lo:.2f}-{c.hi:.2f})",
          c.sentence] for c in comps],
    )  # fmt: skip
    _speedup_png(comps, out / "speedup.png")
    doc.img(out / "speedup.png", "GPU/CPU speedup per workload")


def _measurements(doc: Doc, tput: list[Rec]) -> None:
    doc.h(2, "Measurements")
    doc.table(
        ["workload / model (framework)", "device", "batch", "samples/s (95% CI)", "step ms", "compute-only samples/s",
         "input share", "J / 1k samples", "peak GPU MB", "hyperparameters"],
        [[f"{r.t('workload')} / {r.t('variant')} ({r.t('framework')})", r.t("device_name"), str(r.batch),
          f"{_fmt(r.tput)} ({_fmt(r.metrics.get('bench/samples_per_s_ci_low'))}-{_fmt(r.metrics.get('bench/samples_per_s_ci_high'))})"
          + _mark(r),
          _fmt(r.metrics.get("bench/step_ms"), 2), _fmt(r.metrics.get("bench/compute_only_samples_per_s")),
          _fmt(100 * r.metrics["bench/input_share"], 1) + "%" if "bench/input_share" in r.metrics else "n/a",
          _fmt(r.metrics.get("bench/energy_j_per_1k_samples"), 2), _fmt(r.metrics.get("bench/peak_gpu_mb"), 1),
          r.t("hparams")] for r in tput],
    )  # fmt: skip
    doc.p("Energy is NVML's counter on GPUs and RAPL on the CPU where readable; n/a means the hardware exposed none.")


def _sweeps(doc: Doc, tput: list[Rec], comps: list[Comparison], out: Path) -> None:
    for workload in sorted({r.t("workload") for r in tput}):
        doc.h(2, f"{workload}: samples/s against batch size")
        rs = [r for r in tput if r.t("workload") == workload]
        _sweep_png(rs, [c for c in comps if c.workload == workload], out / f"sweep_{workload}.png")
        doc.img(out / f"sweep_{workload}.png", f"{workload} batch sweep")
        for c in (c for c in comps if c.workload == workload):
            line = sorted((r.batch, r.tput) for r in rs if (r.t("device_name"), r.t("variant"), r.t("framework"))
                          == (c.gpu.t("device_name"), c.variant, c.framework))  # fmt: skip
            stop = stats.scaling_stops([b for b, _ in line], [t for _, t in line])
            tail = f"; GPU throughput stops scaling after batch {stop}" if stop else ""
            doc.p(f"{workload}/{c.variant} ({c.framework}): {c.sentence}{tail}.")


def _time_to_target(doc: Doc, target: list[Rec]) -> None:
    if not target:
        return
    doc.h(2, "Time to target quality")
    doc.table(
        ["workload", "variant", "framework", "device", "target", "reached", "seconds", "epochs", "batch", "hyperparameters"],
        [[r.t("workload"), r.t("variant"), r.t("framework"), r.t("device_name"), f"{r.t('target_metric')} {r.t('target_value')}",
          "yes" if r.metrics.get("bench/target_reached") else "no", _fmt(r.metrics.get("bench/time_to_target_s"), 2),
          _fmt(r.metrics.get("bench/epochs_to_target")), str(r.batch), r.t("hparams")] for r in target],
    )  # fmt: skip


def _hardware(doc: Doc, recs: list[Rec]) -> None:
    doc.h(2, "Hardware")
    hosts = {}
    for r in recs:
        hosts.setdefault((r.t("hardware"), r.t("device_name")), r)
    doc.table(["device", "host CPU", "cores", "GPUs", "CUDA", "driver", "CPU threads used", "fingerprint"],
              [[r.t("device_name"), r.t("hw.cpu"), r.t("hw.cores"), r.t("hw.gpus"), r.t("hw.cuda"), r.t("hw.driver"),
                r.t("cpu_threads"), r.t("hardware")] for r in hosts.values()])  # fmt: skip


def _mark(r: Rec) -> str:
    """The flag beside a figure: which kind, the measured cause in the Stability section."""
    kinds = [k for k in ("contended", "unstable") if k in r.t("flag")]
    return f" ⚠ {'+'.join(kinds)}" if kinds else ""


def _stability(doc: Doc, tput: list[Rec], comps: list[Comparison]) -> dict[str, Any]:
    """Each figure's intervals and host readings with its flag; where an earlier run of the study is in the store,
    both runs' figures and whether they agree within 15%."""
    doc.h(2, "Stability: intervals, host load and run-to-run agreement")
    doc.p(f"Each figure is timed in interleaved intervals (the CPU's and the GPU's processes take turns, each "
          f"interval re-warmed); a speedup's CI spans those intervals. Flagged: unstable when the intervals are "
          f"more than {100 * stats.UNSTABLE_SPREAD:.0f}% apart, with the cause the host readings show; contended "
          "when other processes used the CPU while a CPU figure was timed: it is not the CPU's own speed.")  # fmt: skip
    m = lambda r, k, d=0: _fmt(r.metrics.get(k), d)  # noqa: E731
    doc.table(["workload", "variant", "framework", "device", "batch", "samples/s", "intervals", "spread", "steal % (max)",
               "other load, cores (max)", "MHz", "threads", "flag"],
              [[r.t("workload"), r.t("variant"), r.t("framework"), r.t("device_name"), str(r.batch), _fmt(r.tput),
                str(len(r.intervals) or 1), _pct(r.metrics.get("bench/interval_spread")),
                m(r, "bench/steal_pct_max", 1), m(r, "bench/others_cores_max", 2),
                f"{m(r, 'bench/cpu_mhz_min')}-{m(r, 'bench/cpu_mhz_max')}" if "bench/cpu_mhz_min" in r.metrics else "n/a",
                r.t("cpu_threads"), r.t("flag") or "-"] for r in tput])  # fmt: skip
    return {"stability": [{"workload": r.t("workload"), "variant": r.t("variant"), "device": r.t("device_name"),
                           "batch": r.batch, "flag": r.t("flag") or None, "run": r.run_id} for r in tput],
            "agreement": _agreement(doc, tput, comps)}  # fmt: skip


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def _agreement(doc: Doc, tput: list[Rec], comps: list[Comparison]) -> list[dict[str, Any]]:
    """This run's figures beside the previous run's: every throughput and every speedup measured by both."""
    rows, out = [], []
    pairs = [(f"{r.t('device_name')} samples/s", r, r.tput, r.previous.tput) for r in tput if r.previous]
    pairs += [("GPU/CPU speedup", c.cpu, c.speedup, speedup_ci(c.gpu.previous, c.cpu.previous)[0])
              for c in comps if c.gpu.previous and c.cpu.previous]  # fmt: skip
    for what, r, now, before in pairs:
        gap = stats.agreement(now, before)
        agree = gap <= stats.AGREEMENT
        digits = 2 if "speedup" in what else 0
        rows.append([r.t("workload"), r.t("variant"), r.t("framework"), str(r.batch), what, _fmt(before, digits), _fmt(now, digits),
                     f"{100 * gap:.1f}%",
                     "yes" if agree else f"⚠ no: the runs differ by {100 * gap:.0f}%"])  # fmt: skip
        out.append({"workload": r.t("workload"), "variant": r.t("variant"), "framework": r.t("framework"), "batch": r.batch,
                    "figure": what, "previous": before, "latest": now, "difference": gap, "agree": agree})  # fmt: skip
    if rows:
        doc.p(f"Two runs of the study are in this store: each figure from both, and whether they agree within "
              f"{100 * stats.AGREEMENT:.0f}% (difference as a share of the smaller).")  # fmt: skip
        doc.table(["workload", "variant", "framework", "batch", "figure", "previous run", "latest run", "difference",
                   f"agree within {100 * stats.AGREEMENT:.0f}%"], rows)  # fmt: skip
    return out


def _setting(r: Rec) -> str:
    """fp32, bf16+CL+compile+fused+graphs, bf16+compile(max-autotune-no-cudagraphs)...: how a measurement ran."""
    return setting_label(r.t)


def _measured(recs: list[Rec]) -> list[Rec]:
    """Runs with a throughput: the batch sweep and the ablation's settings that ran (at the tuned batch)."""
    return [r for r in recs if r.t("kind") in ("throughput", "ablation") and "bench/samples_per_s" in r.metrics]


def _pick(rs: list[Rec], how: str) -> Rec | None:
    """The fastest record at each side's tuned batch (ablation runs are at it), at the default batch, or anywhere."""
    role = lambda r: "tuned" if r.t("kind") == "ablation" else r.t("batch_role")  # noqa: E731
    if how == "tuned":  # a study that kept the default batch tags its sweep record "default": that counts too
        tuned = {r.batch for r in rs if role(r) == "tuned"}
        rs = [r for r in rs if r.batch in tuned] if tuned else [r for r in rs if role(r) == "default"]
    elif how == "default":
        rs = [r for r in rs if role(r) == "default"]
    return max(rs, key=lambda r: r.tput, default=None)


def _goals(doc: Doc, recs: list[Rec]) -> list[dict[str, Any]]:
    """Each workload's GPU goal (params: <workload>.benchmark.gpu_speedup_goal, goal_batch, gpu_util_goal_pct)
    against the same host's CPU, each side at the batch and settings the goal names."""
    measured = _measured(recs)
    groups: dict[tuple, list[Rec]] = defaultdict(list)
    for r in measured:
        groups[(r.t("workload"), r.t("variant"), r.t("framework"))].append(r)
    rows, out = [], []
    for (workload, variant, framework), rs in sorted(groups.items()):
        tagged = max((r for r in rs if r.t("goal_speedup")), key=lambda r: r.start, default=None)
        if tagged is None:
            continue
        goal, how, util_goal = float(tagged.t("goal_speedup")), tagged.t("goal_batch") or "tuned", tagged.t("goal_util_pct")
        for gpu_name in sorted({r.t("device_name") for r in rs if r.gpu}):
            gpus = [r for r in rs if r.t("device_name") == gpu_name]
            g, c = _pick(gpus, how), _pick(_cpu_side([r for r in rs if not r.gpu], gpus[0].t("hardware")), how)
            if not (g and c):
                continue
            speedup = g.tput / c.tput
            util = g.metrics.get("bench/gpu_util_pct")
            util_met = None if not util_goal or util is None else util >= float(util_goal)
            rows.append([workload, variant, framework, gpu_name, f"≥ {goal:g}x ({how} batch)",
                         f"b{c.batch} {_setting(c)}: {_fmt(c.tput)}", f"b{g.batch} {_setting(g)}: {_fmt(g.tput)}",
                         f"{speedup:.2f}x", "yes" if speedup >= goal else "no",
                         f"{_fmt(util)}% (≥ {util_goal}%)" if util_goal else _fmt(util) + ("%" if util is not None else ""),
                         {True: "yes", False: "no", None: "n/a"}[util_met]])  # fmt: skip
            out.append({"workload": workload, "variant": variant, "framework": framework, "gpu": gpu_name, "goal": goal,
                        "batch": how, "speedup": speedup, "met": speedup >= goal, "gpu_util_pct": util,
                        "util_met": util_met, "cpu_run": c.run_id, "gpu_run": g.run_id})  # fmt: skip
    if rows:
        doc.h(2, "Goals: GPU against the same host's CPU")
        doc.table(["workload", "variant", "framework", "GPU", "goal (GPU/CPU samples/s)", "CPU: batch setting samples/s",
                   "GPU: batch setting samples/s", "GPU/CPU", "met", "GPU util (goal)", "util met"], rows)  # fmt: skip
        doc.p("Epoch time and tokens/s scale with samples/s on a fixed split, so one ratio serves every goal; a goal "
              "below 1 bounds how much slower the GPU may be (0.833: its epoch at most 1.2x the CPU's). Each side is "
              "its fastest measured setting at the batch the goal names (tuned: the batch its own Optuna study "
              "picked; best: any batch and setting measured).")  # fmt: skip
    return out


def _ablation(doc: Doc, recs: list[Rec]) -> list[dict[str, Any]]:
    abl = [r for r in recs if r.t("kind") == "ablation"]
    if not abl:
        return []
    order = lambda r: (r.t("setting") != "baseline", r.t("setting") == "all", r.t("setting"))  # noqa: E731
    abl.sort(key=lambda r: (r.t("workload"), r.t("variant"), r.t("framework"), r.t("device_name"), order(r)))
    rows, out = [], []
    for r in abl:
        m = r.metrics
        quality = (f"{r.t('quality_metric')} {m['bench/quality']:.4g} after {r.t('quality_epochs')} epochs"
                   if "bench/quality" in m else "n/a")  # fmt: skip
        speed = m.get("bench/speedup_vs_baseline")
        rows.append([r.t("workload"), r.t("variant"), r.t("framework"), r.t("device_name"), str(r.batch), r.t("setting"),
                     _fmt(m.get("bench/samples_per_s")), f"{speed:.2f}x" if speed else "n/a",
                     _fmt(m.get("bench/gpu_util_pct")), _fmt(m.get("bench/fit_epoch_s"), 4), quality,
                     r.t("skipped") or ""])  # fmt: skip
        out.append({"workload": r.t("workload"), "variant": r.t("variant"), "device": r.t("device_name"),
                    "setting": r.t("setting"), "samples_per_s": m.get("bench/samples_per_s"), "speedup": speed,
                    "quality": m.get("bench/quality"), "skipped": r.t("skipped") or None, "run": r.run_id})  # fmt: skip
    doc.h(2, "Ablation: what each optimisation bought")
    doc.table(["workload", "variant", "framework", "device", "batch", "setting", "samples/s", "vs baseline", "GPU util %",
               "epoch s (fit)", "quality (validation)", "not measured because"], rows)  # fmt: skip
    doc.p("Each setting changes one option of the baseline (the params as run), 'all' every option that applies; "
          "samples/s as in the throughput runs, at the tuned batch; quality from a training run under the same "
          "setting. Dropout draws other random numbers under CUDA graphs, so small quality differences are noise.")  # fmt: skip
    return out


def _frameworks(doc: Doc, tput: list[Rec]) -> None:
    by = defaultdict(dict)
    for r in tput:
        by[(r.t("workload"), r.t("variant"), r.t("device_name"), r.batch)][r.t("framework")] = r.tput
    rows = [[w, v, d, str(b), _fmt(f.get("torch")), _fmt(f.get("tensorflow"))] for (w, v, d, b), f in sorted(by.items()) if len(f) > 1]
    if rows:
        doc.h(2, "PyTorch against TensorFlow")
        doc.table(["workload", "variant", "device", "batch", "torch samples/s", "tensorflow samples/s"], rows)


def _scaling(doc: Doc, recs: list[Rec], out: Path) -> None:
    """Samples/s and efficiency (N-rank / N x 1-rank throughput) against the number of data-parallel ranks."""
    if not recs:
        return
    lines: dict[tuple, list[Rec]] = defaultdict(list)
    for r in recs:
        lines[(r.t("workload"), r.t("variant"), r.t("framework"), r.t("device_name"), r.t("hardware"))].append(r)
    doc.h(2, "Scaling")
    doc.p("Data-parallel training throughput on one host: torch DDP ranks under torchrun, TensorFlow MirroredStrategy "
          "replicas. Efficiency = N-rank samples/s / (N x 1-rank samples/s); the 1-rank point runs the same code path.")  # fmt: skip
    rows = []
    for key, rs in sorted(lines.items()):
        for r in sorted(rs, key=lambda r: int(r.t("world_size"))):
            rows.append([r.t("workload"), r.t("variant"), r.t("framework"), r.t("device_name"), r.t("world_size"),
                         r.t("dist.backend") or "none", str(r.batch), r.t("per_rank_batch"), _fmt(r.tput),
                         f"{r.metrics.get('bench/scaling_speedup', float('nan')):.2f}x",
                         _fmt(100 * r.metrics.get("bench/scaling_efficiency", float("nan")), 1) + "%"])  # fmt: skip
    doc.table(["workload", "variant", "framework", "device", "ranks", "backend", "global batch", "batch per rank",
               "samples/s", "speedup", "efficiency"], rows)  # fmt: skip
    _scaling_png(lines, out / "scaling.png")
    doc.img(out / "scaling.png", "data-parallel scaling")


def _scaling_png(lines: dict[tuple, list[Rec]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (tp, eff) = plt.subplots(1, 2, figsize=(10, 4))
    for (workload, variant, framework, device, _), rs in sorted(lines.items()):
        rs = sorted(rs, key=lambda r: int(r.t("world_size")))
        ranks = [int(r.t("world_size")) for r in rs]
        label = f"{workload}/{variant} {framework} {device}"
        line = tp.plot(ranks, [r.tput for r in rs], marker="o", label=label)[0]
        one = next((r.tput for r in rs if r.t("world_size") == "1"), None)
        if one:
            tp.plot(ranks, [one * n for n in ranks], ls=":", color=line.get_color())  # ideal: N x 1-rank
        eff.plot(ranks, [100 * r.metrics.get("bench/scaling_efficiency", float("nan")) for r in rs], marker="o", label=label)
    tp.set(xlabel="ranks (GPUs or CPU processes)", ylabel="training samples/s", title="Throughput (dotted: ideal)")
    eff.axhline(100, color="k", lw=0.8)
    eff.set(xlabel="ranks (GPUs or CPU processes)", ylabel="efficiency %", title="N-rank / (N x 1-rank) throughput")
    ticks = sorted({int(r.t("world_size")) for rs in lines.values() for r in rs})
    for ax in (tp, eff):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    eff.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _circuits(doc: Doc, circ: list[Rec]) -> None:
    """Circuits simulated per second, one table per device, each figure beside the goal its record carries."""
    if not circ:
        return
    doc.h(2, "Quantum circuits")
    doc.p("Circuits (one per patch of each image) simulated per second, fp32, median of the timed passes, warm-up "
          "and the copy of the images to the device excluded. Trainable: circuit evaluations per second with "
          "gradients (forward and backward to the circuit weights). The set time is one pass over every image; "
          "the goals are for an H100 GPU.")  # fmt: skip
    order = {"fixed": 0, "trainable": 1, "patch3": 2}
    cpus: dict[tuple, Rec] = {}  # the CPU's best setting (eager or compiled) per circuit
    for r in sorted((r for r in circ if not r.gpu), key=lambda r: r.metrics.get("bench/circuits_per_s", 0.0)):
        cpus[(r.t("hardware"), r.t("mode"), r.t("simulator"))] = r
    for device in sorted({r.t("device_name") for r in circ}):
        rows = []
        for r in sorted((r for r in circ if r.t("device_name") == device),
                        key=lambda r: (order.get(r.t("mode"), 9), r.t("simulator"), r.t("compile"))):  # fmt: skip
            goals = r.gpu  # the goals are a GPU's: a CPU row shows none
            rate, goal = r.metrics.get("bench/circuits_per_s"), _float(r.t("goal_circuits_per_s")) if goals else None
            set_ms, set_goal = r.metrics.get("bench/set_ms"), _float(r.t("goal_set_ms")) if goals else None
            cpu = cpus.get((r.t("hardware"), r.t("mode"), r.t("simulator"))) if r.gpu else None
            rows.append([
                r.t("mode"), r.t("simulator"), r.t("compile"), r.t("qubits"), r.t("patches"),
                f"{r.t('images')} x {r.t('side')}x{r.t('side')}", _rate(rate), _goal(rate, goal, ">=", _rate(goal)),
                _fmt(set_ms, 2), _goal(-set_ms if set_ms else None, -set_goal if set_goal else None, "<", _fmt(set_goal)),
                f"{rate / cpu.metrics['bench/circuits_per_s']:,.0f}x" if cpu and rate else "n/a",
            ])  # fmt: skip
        doc.h(3, f"Quantum circuits: {device}")
        doc.table(["mode", "simulator", "compile", "qubits", "patches", "images", "circuits/s", "goal", "set ms",
                   "set goal ms", "vs same host's CPU"], rows)  # fmt: skip


def _float(text: str) -> float | None:
    return float(text) if text not in ("", "None") else None


def _rate(v: float | None) -> str:
    if v is None:
        return "n/a"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f}"


def _goal(value: float | None, goal: float | None, sign: str, text: str) -> str:
    """'≥ 2.00 G: met' or '...: missed'; '' where the measurement has no goal."""
    if goal is None:
        return ""
    return f"{sign} {text}: " + ("n/a" if value is None else "met" if value >= goal else "missed")


# The goals for population tuning (diabetes on a data-centre GPU): the population's size, epochs, wall time and speedup.
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
