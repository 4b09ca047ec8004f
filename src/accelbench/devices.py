"""Resolve cpu / cuda / cuda:N / auto for a framework; describe the hardware; seed everything."""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import random
import re
import statistics
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from .errors import DeviceError

_SPEC = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Device:
    """A resolved device: `type` is cpu or cuda; `index` the GPU ordinal."""

    type: str
    index: int = 0
    name: str = ""

    @property
    def torch(self) -> str:
        return "cpu" if self.type == "cpu" else f"cuda:{self.index}"

    @property
    def label(self) -> str:
        """Short name used in run and study names: cpu, cuda, cuda1..."""
        return "cpu" if self.type == "cpu" else ("cuda" if self.index == 0 else f"cuda{self.index}")


def resolve(spec: str, framework: str, key: str = "device") -> Device:
    """Turn a params device string into a Device the framework can use; never fall back silently. `key` is the
    params.yaml key the string came from, for the error message."""
    if not _SPEC.match(spec):
        raise DeviceError(f"params.yaml: {key}: '{spec}' is not one of cpu, cuda, cuda:N, auto")
    gpus = _framework_gpu_count(framework) if spec != "cpu" else 0
    if spec == "cpu" or (spec == "auto" and gpus == 0):
        return Device("cpu", 0, cpu_name())
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if gpus == 0:
        hint = "use device=cpu" if key == "device" else f"list only this machine's devices in {key}"
        raise DeviceError(
            f"params.yaml: {key}: '{spec}' requested but {framework} sees no CUDA GPU on this machine "
            f"({hint}, or install the framework's CUDA build)"
        )
    if index >= gpus:
        raise DeviceError(f"params.yaml: {key}: '{spec}' requested but only {gpus} GPU(s) are visible")
    return Device("cuda", index, gpu_names()[index] if index < len(gpu_names()) else f"cuda:{index}")


def _framework_gpu_count(framework: str) -> int:
    if framework == "torch":
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


@cache
def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cache
def _nvml_gpus() -> tuple[dict[str, Any], ...]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: no NVIDIA GPU to describe
        return ()
    driver = pynvml.nvmlSystemGetDriverVersion()
    gpus = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        gpus.append(
            {
                "name": pynvml.nvmlDeviceGetName(h),
                "memory_gb": round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30, 1),
                "driver": driver,
            }
        )
    return tuple(gpus)


def gpu_names() -> list[str]:
    return [g["name"] for g in _nvml_gpus()]


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


@cache
def hardware_info() -> dict[str, Any]:
    """What the timings depend on. No timestamps: it changes only when the machine does. torch is imported
    (and cuDNN loaded) only where NVML sees a GPU: on a CPU machine the build's CUDA version is read from its file."""
    gpus = list(_nvml_gpus())
    cuda = _torch_build_cuda()
    tf_version = _version("tensorflow") or _version("tensorflow-cpu")
    return {
        "cpu": {
            "model": cpu_name(),
            "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(logical=True),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        },
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
        "cuda": cuda,
        "cudnn": _cudnn_version(cuda) if gpus else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "frameworks": {"torch": _version("torch"), "tensorflow": tf_version, "keras": _version("keras")},
    }


@cache  # base_tags asks once per run, and a tuning stage opens a run per trial
def recorded_hardware(path: Path) -> dict[str, Any]:
    """The hardware stage's record (results/hardware.json) where it exists: reading it probes nothing."""
    return json.loads(path.read_text()) if path.is_file() else hardware_info()


def _torch_build_cuda() -> str | None:
    """torch.version.cuda without importing torch: torch/version.py is a generated file of plain assignments."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    found = re.search(r"^cuda(?::[^=]*)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return found.group(1) if found else None


def _cudnn_version(build: str | None) -> int | None:
    """torch.backends.cudnn.version()'s number, read from the version of the nvidia-cudnn wheel that torch's CUDA
    build loads where there is one: importing torch and starting CUDA for it took 3.7 s of the hardware stage
    on the H200 host. `build`: torch's CUDA version (_torch_build_cuda)."""
    version = _version(f"nvidia-cudnn-cu{build.split('.')[0]}") if build else None
    if version is not None:
        major, minor, patch = (int(part) for part in version.split(".")[:3])
        return major * (10000 if major >= 9 else 1000) + minor * 100 + patch  # cuDNN's own CUDNN_VERSION
    import torch

    return torch.backends.cudnn.version() if torch.cuda.is_available() else None


def fingerprint(info: dict[str, Any] | None = None) -> str:
    """Short stable hash of the machine (CPU, RAM, GPUs, CUDA), ignoring library versions."""
    info = info or hardware_info()
    key = {k: info[k] for k in ("cpu", "ram_gb", "gpus", "cuda")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def seed_everything(seed: int, framework: str) -> None:
    random.seed(seed)
    np.random.seed(seed)
    if framework == "torch":
        import torch

        torch.manual_seed(seed)
    else:
        import keras

        keras.utils.set_random_seed(seed)


@dataclass(frozen=True)
class Runtime:
    """Everything about *how* a model runs, as opposed to *what* it is."""

    device: Device
    framework: str
    precision: str = "fp32"
    compile: bool = False
    seed: int = 42
    cpu_threads: int | None = None
    deterministic: bool = False
    channels_last: bool = False
    cuda_graphs: bool = False  # torch on CUDA: training steps replayed from captured CUDA graphs
    fused_optimizer: bool = False  # torch: AdamW as one fused kernel (CPU and CUDA)
    compile_mode: str = "default"  # torch.compile's mode for the model, when compile is on
    world_size: int = 1  # data-parallel ranks (torch processes, TF replicas) one training step spans
    rank: int = 0  # this process's rank; only rank 0 logs and writes outputs
    process_group: bool = False  # torch: a torch.distributed group is up (torchrun), so the model is DDP-wrapped

    @classmethod
    def from_config(cls, cfg: Any, device: Device, framework: str, cpu_threads: int | None) -> Runtime:
        """The runtime options params.yaml's shared base sets (`cfg`: a config.Config), on `device`."""
        return cls(device, framework, cfg.precision, cfg.compile, cfg.seed, cpu_threads, deterministic=cfg.deterministic,
                   channels_last=cfg.channels_last, cuda_graphs=cfg.cuda_graphs, fused_optimizer=cfg.fused_optimizer,
                   compile_mode=cfg.compile_mode)  # fmt: skip

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def tags(self) -> dict[str, str]:
        return {
            "device": self.device.label,
            "device_name": self.device.name,
            "framework": self.framework,
            "precision": self.precision,
            "compile": str(self.compile).lower(),
            "compile_mode": self.compile_mode,
            "channels_last": str(self.channels_last).lower(),
            "world_size": str(self.world_size),
            "cuda_graphs": str(self.cuda_graphs).lower(),
            "fused_optimizer": str(self.fused_optimizer).lower(),
        }


def energy_counter(device: Device):
    """A callable returning cumulative joules for `device`, or None where the hardware exposes no counter.

    GPUs: NVML's total-energy counter (Volta and later). CPU: Linux RAPL package counters, when readable
    (often root-only); they count the whole socket, so other processes' work is included.
    """
    if device.type == "cuda":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception:  # older GPU or no NVML: say n/a rather than guess
            return None
        return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
    zones = [p / "energy_uj" for p in Path("/sys/class/powercap").glob("intel-rapl:[0-9]")]
    try:
        for z in zones:
            int(z.read_text())
    except (OSError, ValueError):
        return None
    if not zones:
        return None
    return lambda: sum(int(z.read_text()) for z in zones) / 1e6


class UtilisationSampler:
    """NVML's GPU utilisation, read from the driver's own sample buffer: each sample is the share of the period
    (1/6 s to 1 s, by product) up to its timestamp in which a kernel ran. start() marks the newest sample; the
    next one straddles the start (it still sees the idle time before it) and is dropped. `wants_more` asks the
    caller to keep the same work going until `min_s` have passed and `min_samples` whole periods after that one
    have ended (at most `max_s`). It reads the clock, not NVML: a buffer read costs milliseconds in which the
    GPU would idle, and the readings would count that."""

    def __init__(self, handle: Any, min_s: float = 0.5, min_samples: int = 3, max_s: float = 5.0) -> None:
        self.handle, self.min_s, self.min_samples, self.max_s = handle, min_s, min_samples, max(max_s, min_s)
        self._t0, self._until, self._period_s = 0.0, 0.0, 1.0
        self._since = 0

    def start(self) -> None:
        stamps = [ts for ts, _ in self._samples_after(0)][-11:]
        self._t0 = time.perf_counter()
        self._since = stamps[-1] if stamps else 0
        if len(stamps) < 2:  # no period to go by: the longest wait
            self._until = self.max_s
            return
        self._period_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:])) / 1e6
        last_end = self._since / 1e6 + (self.min_samples + 1) * self._period_s  # NVML stamps are epoch µs
        self._until = min(self.max_s, max(self.min_s, last_end - time.time()))

    def wants_more(self) -> bool:
        return time.perf_counter() - self._t0 < self._until

    def stop(self) -> list[float]:
        """The samples whose whole period fell after start() and before now; the last may take a moment to be
        listed (its period is over: the GPU may idle meanwhile)."""
        now = time.time() * 1e6
        deadline = time.perf_counter() + self._period_s
        while True:
            samples = [(ts, v) for ts, v in self._samples_after(self._since) if ts <= now]
            if len(samples) > self.min_samples or time.perf_counter() > deadline:
                return [float(value) for _, value in samples[1:]]
            time.sleep(0.01)

    def _samples_after(self, since: int) -> list[tuple[int, int]]:
        """(timestamp in µs, utilisation %) of the buffered samples newer than `since`, oldest first."""
        import pynvml

        try:
            _, samples = pynvml.nvmlDeviceGetSamples(self.handle, pynvml.NVML_GPU_UTILIZATION_SAMPLES, since)
        except pynvml.NVMLError_NotFound:  # no sample newer than `since` yet
            return []
        return sorted((s.timeStamp, s.sampleValue.uiVal) for s in samples if s.timeStamp > since)


def utilisation_sampler(device: Device, **kwargs: float) -> UtilisationSampler | None:
    """A sampler for a CUDA device through NVML; None on the CPU or where NVML is missing (n/a, not zero)."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index)
        sampler = UtilisationSampler(handle, **kwargs)
        sampler.start()  # a GPU without the sample buffer fails here
    except Exception:  # no NVML or a GPU without the counter: say n/a rather than guess
        return None
    return sampler
