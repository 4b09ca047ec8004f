"""The only training loops: one per framework, the same interface.

    setup(runtime)                              threads, visible devices, precision policy
    fit(model, task, prepared, train, runtime, on_epoch, desc, checkpoint) -> FitResult
    bench(model, task, prepared, train, runtime, spec: BenchSpec) -> BenchResult
    predict(model, arrays, inputs, runtime) -> logits as a NumPy array
    save(model, folder) / load(folder, model_or_builder, runtime)
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..devices import Runtime, UtilisationSampler

from ..timing import IntervalPlan, median, spread, steady

FRAMEWORKS = ("torch", "tensorflow")

OnEpoch = Callable[[int, dict[str, float]], None]


def get_engine(framework: str) -> ModuleType:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}")
    return importlib.import_module(f".{framework}", __name__)


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_s: list[float] = field(default_factory=list)
    fit_s: float = 0.0
    to_device_s: float = 0.0
    data_epoch_s: float | None = None  # one epoch of batch assembly alone (gather + copy), no model
    n_train: int = 0
    peak_gpu_mb: float | None = None
    resumed_from: int = 0  # epochs restored from a checkpoint (0: trained from scratch)
    n_params: int | None = None  # trainable parameters: what a "bigger model" costs, beside its time
    cuda_graphs: str = "off"  # on | off | n/a: <why the steps ran eagerly>
    interval_of: list[int] | None = None  # the interval of each repeat, when they were timed in several

    def summary(self, warmup_epochs: int = 1, units_per_sample: dict[str, float] | None = None) -> dict[str, float]:
        """Timing metrics under the design's names; the first epoch (warm-up) is excluded when others exist.

        `units_per_sample` (prepared meta, e.g. {"tokens": 23.4}) adds `throughput/<unit>_per_s` beside samples/s.
        """
        epochs = steady(self.epoch_s, warmup_epochs)
        med = median(epochs)
        out = {
            "time/fit_s": self.fit_s,
            "time/epoch_s": med,
            "time/epoch_iqr_s": spread(epochs),
            "time/first_epoch_s": self.epoch_s[0] if self.epoch_s else float("nan"),
            "time/to_device_s": self.to_device_s,
            "throughput/samples_per_s": self.n_train / med if med > 0 else float("nan"),
            "mem/peak_host_mb": _peak_rss_mb(),
        }
        if self.data_epoch_s is not None:
            out["time/data_epoch_s"] = self.data_epoch_s
            out["time/data_share"] = self.data_epoch_s / med if med > 0 else float("nan")
        for unit, per_sample in (units_per_sample or {}).items():
            out[f"throughput/{unit}_per_s"] = out["throughput/samples_per_s"] * per_sample
        if self.peak_gpu_mb is not None:
            out["mem/peak_gpu_mb"] = self.peak_gpu_mb
        if self.n_params is not None:
            out["model/params"] = self.n_params
        return out


@dataclass(frozen=True)
class BenchSpec:
    """What one timed measurement runs: `repeats` x `steps` training steps at the global `batch_size`, after
    `warmup` untimed steps.

    `synthetic` reuses one pre-gathered batch: the compute-only ceiling that the real loop is compared with.
    `min_repeat_s` makes a timed repeat run its steps again until it lasts that long. `intervals` splits the
    repeats into intervals with hooks at their edges (one interval of `repeats` when None). `energy` reads a
    joule counter around each repeat. `utilisation` samples GPU use during the timed repeats (torch engine
    only: the benchmark stage gives the tensorflow engine none).
    """

    batch_size: int
    steps: int
    warmup: int
    repeats: int
    synthetic: bool = False
    min_repeat_s: float = 0.0
    intervals: IntervalPlan | None = None
    energy: Callable[[], float] | None = None
    utilisation: UtilisationSampler | None = None

    def plan(self) -> IntervalPlan:
        return self.intervals or IntervalPlan([self.repeats])


@dataclass
class BenchResult:
    """Wall time of each repeat of `steps` optimiser steps at `batch_size`, the warm-up apart."""

    batch_size: int
    steps: int
    repeat_s: list[float]
    warmup_s: float
    to_device_s: float
    energy_j: list[float] | None = None
    peak_gpu_mb: float | None = None
    gpu_util_pct: list[float] | None = None  # NVML samples over the timed repeats; None where not a CUDA GPU
    cuda_graphs: str = "off"  # on | off | n/a: <why the steps ran eagerly>
    interval_of: list[int] | None = None  # the interval of each repeat, when they were timed in several

    def samples_per_s(self) -> list[float]:
        return [self.steps * self.batch_size / t for t in self.repeat_s]


def oom_message(detail: str, batch_size: int, runtime: "Runtime") -> str:
    asked = re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", detail)
    return (
        f"out of memory on {runtime.device.name} at batch_size={batch_size}: "
        f"{asked.group(0) if asked else 'allocation size not reported'}; lower the batch size or use precision=bf16"
    )


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
