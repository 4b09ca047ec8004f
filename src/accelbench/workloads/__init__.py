"""Workload registry. A workload is one module here exposing `WORKLOAD`, plus one params section.

Nothing in the core names a workload: stages look them up by name.
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .. import verdict as vd
from ..config import WorkloadParams
from ..errors import ConfigError, DataError
from ..io import Prepared
from ..tasks import Task


@dataclass
class Baseline:
    """A non-neural reference: its metrics (None where it cannot have one, e.g. persistence's direction)
    and its test-split outputs in the task's form, item by item, for the verdict's paired bootstrap."""

    metrics: dict[str, float | None]
    test_logits: np.ndarray


class Workload:
    """Base class: data sources, preparation, EDA and one model per framework."""

    name: ClassVar[str]
    Params: ClassVar[type[WorkloadParams]] = WorkloadParams
    frameworks: ClassVar[tuple[str, ...]] = ("torch", "tensorflow")
    # Data-parallel training (distributed.gpus/nodes > 1); a workload that cannot gain from it says why
    data_parallel: ClassVar[bool] = True
    single_device_reason: ClassVar[str] = ""
    # Variants that are references, not candidates (quantum's raw pixels): the verdict counts them as baselines
    reference_variants: ClassVar[tuple[str, ...]] = ()

    def task(self, meta: dict[str, Any]) -> Task:
        raise NotImplementedError

    def ingest(self, params: WorkloadParams, out_dir: Path) -> dict[str, Any]:
        """Fetch or read the source data into `out_dir` (raw, in the original format); return a summary."""
        raise NotImplementedError

    def eda(self, params: WorkloadParams, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
        """Write PNG plots and return a JSON-able summary of the raw data."""
        return {}

    def prepare(self, params: WorkloadParams, raw_dir: Path, seed: int) -> Prepared:
        raise NotImplementedError

    def variants(self, params: WorkloadParams) -> dict[str, dict[str, Any]]:
        """The models this workload compares: name -> dotted param overrides. Each variant gets its
        own study, MLflow run, model folder and entry in the stage's metrics JSON."""
        return {"model": {}}

    def precompute(self, params: WorkloadParams, prepared: Prepared, runtime: Any) -> tuple[Prepared, dict[str, float]]:
        """Turn prepared arrays into the model's inputs on the runtime's device, once per variant before
        fit and predict (a fixed feature extractor, e.g. a quantum circuit); return them and metrics to
        log (its timings). Called by tune (per trial), train and evaluate. Default: inputs as prepared."""
        return prepared, {}

    def stacks(self, params: WorkloadParams) -> bool:
        """Whether `population_model` can stack these params' models (tune.strategy auto asks, cheaply)."""
        return False

    def population_model(
        self, params: WorkloadParams, prepared: Prepared, runtime: Any
    ) -> tuple[Callable[[WorkloadParams], Any], Prepared] | None:
        """For population tuning: a builder of the torch module each trial trains (from the trial's params)
        and the inputs it reads on the runtime's device, e.g. a classical head and its precomputed features.
        Members share every shape-changing key: one model is built from the seed and stacked, and each
        member's `model.dropout` becomes the rate of its `models.layers.RateDropout` layers (plain nn.Dropout is
        refused). None: the models cannot be stacked into one vmapped model (the default; the LSTMs, say)."""
        return None

    def evaluate_extra(
        self, params: WorkloadParams, prepared: Prepared, split: str, logits: Any, out_dir: Path, prefix: str
    ) -> dict[str, float]:
        """Workload-specific scores and plots beside the task's (baselines, sample grids)."""
        return {}

    def run_tags(self, params: WorkloadParams, runtime: Any) -> dict[str, str]:
        """Extra tags for training runs (e.g. whether fused cuDNN kernels are eligible)."""
        return {}

    def baselines(self, params: WorkloadParams, prepared: Prepared, out_dir: Path) -> dict[str, Baseline]:
        """Non-neural references scored on the same splits (persistence, TF-IDF + LR). Each is logged as
        its own MLflow run and its metrics sit beside the variants in evaluate.json."""
        return {}

    def verdict_metric(self, meta: dict[str, Any]) -> tuple[str, bool]:
        """The test metric the verdict compares, and whether higher is better: the tuning objective's."""
        task = self.task(meta)
        return "test/" + task.objective.split("/", 1)[1], task.direction == "maximize"

    def item_score(self, meta: dict[str, Any], arrays: dict[str, np.ndarray], logits: np.ndarray, idx: np.ndarray, metric: str) -> float:
        """`metric` on the test items `idx` (with repeats: a bootstrap resample)."""
        value = self.task(meta).score(arrays["y"][idx], logits[idx], metric)
        return float("nan") if value is None else float(value)

    def verdict_note(self, params: WorkloadParams, meta: dict[str, Any], beats: bool, margin: float, n_items: int) -> str:
        """Why the model wins or loses, in words, and what to run for a fairer size. `meta`: the prepared data's,
        with what was read in meta["source"]."""
        return vd.generic_note(beats, margin, n_items)

    def verdict(self, params: WorkloadParams, prepared: Prepared, models: dict[str, tuple[dict[str, Any], np.ndarray]],
                baselines: dict[str, Baseline], seed: int) -> dict[str, Any] | None:  # fmt: skip
        """evaluate.json's `verdict`: the best model (by validation) against the best reference; None
        when there is nothing to compare with. `models`: variant -> (metrics, test logits)."""
        metric, higher = self.verdict_metric(prepared.meta)
        refs = {n: v for n, v in models.items() if n in self.reference_variants}
        refs.update({n: (b.metrics, b.test_logits) for n, b in baselines.items()})
        candidates = {n: v for n, v in models.items() if n not in self.reference_variants}
        if not refs or not candidates:
            return None
        test = prepared.splits["test"]
        val_metric = "val/" + metric.split("/", 1)[1]

        def side(name: str, metrics: dict[str, Any], logits: np.ndarray) -> vd.Side:
            val = metrics.get(val_metric)
            score = lambda idx: self.item_score(prepared.meta, test, logits, idx, metric)  # noqa: E731
            return vd.Side(name, float("nan") if val is None else float(val), score)

        note = lambda beats, margin, n: self.verdict_note(params, prepared.meta, beats, margin, n)  # noqa: E731
        return vd.verdict(metric, higher, [side(n, *v) for n, v in candidates.items()],
                          [side(n, *v) for n, v in refs.items()], prepared.n("test"), seed, note)  # fmt: skip

    def extra_benchmarks(self, params: WorkloadParams, runtime: Any, bench: Any) -> list[dict[str, Any]]:
        """Timed measurements of the workload's own beside the training-step sweep (e.g. circuits/s of a
        simulator), run by the benchmark stage on each device with `bench` (the global benchmark params).
        Each record: `kind`, `variant`, `batch_size`, `timed`, tag-like values, `bench/...` metrics and
        optionally `repeats` {metric: per-repeat values}; the stage logs each as an MLflow run (stage=benchmark)
        and adds it to benchmark.json. Default: none."""
        return []

    def build_model(self, framework: str, params: WorkloadParams, meta: dict[str, Any]) -> Any:
        if framework not in self.frameworks:
            raise ConfigError(f"workload '{self.name}' has no {framework} model (supported: {list(self.frameworks)})")
        return getattr(self, f"build_{framework}")(params, meta)


@cache
def available() -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_")))


def get_workload(name: str) -> Workload:
    if name not in available():
        raise ConfigError(f"unknown workload '{name}' (known: {', '.join(available())})")
    return importlib.import_module(f".{name}", __name__).WORKLOAD


def kaggle_download(handle: str, competition: bool = False) -> Path:
    """The local folder of a Kaggle dataset (or competition) through kagglehub, or one clear DataError."""
    kind = "competition" if competition else "dataset"
    try:
        import kagglehub

        fetch = kagglehub.competition_download if competition else kagglehub.dataset_download
        return Path(fetch(handle))
    except Exception as exc:  # credentials, network, unknown handle, rules not accepted: all end here
        raise DataError(
            f"kaggle {kind} '{handle}': download failed ({type(exc).__name__}: {exc}); "
            "set KAGGLE_USERNAME/KAGGLE_KEY (and accept a competition's rules) or use data.source=path"
        ) from exc


def kaggle_file(handle: str, filename: str, competition: bool = False) -> Path:
    """The first `filename` anywhere in the downloaded Kaggle folder."""
    folder = kaggle_download(handle, competition)
    found = sorted(folder.rglob(filename))
    if not found:
        raise DataError(f"kaggle {'competition' if competition else 'dataset'} '{handle}': no {filename} in {folder}")
    return found[0]
