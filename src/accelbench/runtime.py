"""The one place a stage turns params into the Runtime it trains on: framework, device, threads, data parallelism, seed."""
from __future__ import annotations

import dataclasses

from . import devices, distributed
from .config import Config
from .devices import Runtime
from .engines import get_engine
from .errors import ConfigError
from .workloads import Workload


def framework_for(cfg: Config, wl: Workload) -> str:
    framework = cfg.params(wl.name).framework or cfg.framework
    if framework not in wl.frameworks:
        raise ConfigError(
            f"params.yaml: framework: '{wl.name}' has no {framework} model "
            f"(supported: {list(wl.frameworks)}; set {wl.name}.framework to override)"
        )
    return framework


def runtime_for(cfg: Config, wl: Workload, data_parallel: bool = False, device_key: str = "device") -> Runtime:
    """`data_parallel`: this process is (a rank of) a `distributed` run: train and benchmark, not tune/evaluate.
    `device_key`: where cfg.device came from in params.yaml, for the error message (a benchmark child's is one
    of benchmark.devices)."""
    framework = framework_for(cfg, wl)
    device = devices.resolve(cfg.device, framework, device_key)
    runtime = Runtime.from_config(cfg, device, framework, cfg.cpu_threads)
    if data_parallel:
        runtime = distributed.join(cfg, runtime)
    get_engine(runtime.framework).setup(runtime)
    devices.seed_everything(cfg.seed + runtime.rank, framework)  # rank 0 as a single process; own dropout elsewhere
    return runtime


def on_device(cfg: Config, wl: Workload, spec: str, framework: str, cpu_threads: int | None) -> Config:
    """`cfg` with the device, framework and CPU threads that one benchmark child measures, or a tuning worker
    trains on."""
    cfg = dataclasses.replace(cfg, device=spec, framework=framework, cpu_threads=cpu_threads)
    return dataclasses.replace(cfg, sections={**cfg.sections, wl.name: dataclasses.replace(cfg.params(wl.name), framework=framework)})
