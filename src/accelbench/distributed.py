"""Data-parallel runs: which workloads may, how a stage re-executes itself under torchrun, and the rules.

PyTorch: the stage process re-executes itself as `python -m torch.distributed.run ... stages/<stage>.py <w>`;
each rank joins a torch.distributed group (NCCL on GPUs, gloo on CPUs) and the one training loop wraps the
model in DistributedDataParallel. TensorFlow: one process per host drives a MirroredStrategy over its GPUs
(or logical CPU devices), MultiWorkerMirroredStrategy across hosts, whose addresses are swapped through a
store at `distributed.rdzv_endpoint`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from . import progress
from .config import Config, DistributedConfig, TrainParams
from .devices import Device, Runtime, gpu_names, resolve
from .errors import AccelbenchError, ConfigError, DeviceError

# NVLink SHARP / multicast stays off in every process we start (the lent multi-GPU hosts do not support it)
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

_GROUP_TAGS: dict[str, str] = {}  # what this process's group looks like, for the run's tags


class RanksFailed(AccelbenchError):
    """The ranks of a relaunched stage failed; rank 0 has already recorded its run (or its failure)."""

    recorded = True


def child_env(root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, **MULTICAST_OFF, "DVC_ROOT": str(root), **extra}


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def for_workload(cfg: Config, wl) -> Config:
    """A workload that stays on one device runs there and says why (stderr and its train run's tags), so a
    pipeline-wide `-S distributed.gpus=N` spreads the workloads that can use it and leaves the rest whole."""
    if cfg.distributed.world_size == 1 or wl.data_parallel:
        return cfg
    _GROUP_TAGS["dist.single_device_reason"] = wl.single_device_reason
    print(f"accelbench: {wl.name} stays on one device ({cfg.distributed.world_size} ranks asked): "
          f"{wl.single_device_reason}", file=sys.stderr)  # fmt: skip
    return dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, gpus=1, nodes=1, node_rank=0))


def needs_relaunch(cfg: Config, framework: str) -> bool:
    """torch with several ranks, not yet inside torchrun: the stage must re-execute itself under it."""
    return framework == "torch" and cfg.distributed.world_size > 1 and not under_torchrun()


def torchrun_args(d: DistributedConfig, nproc: int | None = None) -> list[str]:
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc or d.gpus)]
    if d.nodes == 1:
        return args + ["--standalone"]
    # static rendezvous: node_rank is ours to give, rdzv_endpoint is node 0's host:port
    return args + ["--nnodes", str(d.nodes), "--node-rank", str(d.node_rank), "--rdzv-endpoint", str(d.rdzv_endpoint)]


def run_ranks(cmd: list[str], root: Path, stage: str, env: dict[str, str] | None = None) -> None:
    """Run `cmd` (torchrun and its ranks), stderr streamed through; raise with the first rank's error line."""
    proc = subprocess.Popen(cmd, cwd=root, env=env or child_env(root), stderr=subprocess.PIPE, text=True)
    first: str | None = None  # the first rank's error: the stage prints it, once, as its own error line
    try:
        for line in proc.stderr:
            message = progress.error_message(line, stage)
            if message is not None and first is None:
                first = message
            elif message is None or message != first:  # not another rank's copy of that one
                sys.stderr.write(line)
        proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: torchrun passes the signal on to its ranks
            proc.terminate()
            proc.wait()
    if proc.returncode != 0:
        raise RanksFailed(first if first is not None else f"{' '.join(cmd[1:5])}... exited {proc.returncode}")


def relaunch(cfg: Config, stage: str, workload: str, root: Path) -> None:
    """Re-execute `stages/<stage>.py <workload>` under torchrun with this host's ranks."""
    run_ranks([*torchrun_args(cfg.distributed), str(root / "stages" / f"{stage}.py"), workload], root, stage)


def backend(d: DistributedConfig, device: Device) -> str:
    return d.backend if d.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")


def join(cfg: Config, runtime: Runtime) -> Runtime:
    """Inside a data-parallel run: the runtime of this rank (torch: its process group joined)."""
    d = cfg.distributed
    if runtime.framework == "tensorflow":
        if d.world_size > 1:
            _GROUP_TAGS.update(_tf_cluster(d, runtime))
        return dataclasses.replace(runtime, world_size=d.world_size, rank=d.node_rank)
    if not under_torchrun():
        return runtime
    import torch
    import torch.distributed as dist

    local_rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = runtime.device
    if device.type == "cuda":
        if cfg.device.startswith("cuda:"):
            raise ConfigError(f"params.yaml: device: '{cfg.device}': a data-parallel run puts rank i on cuda:i; use device=cuda")
        device = resolve(f"cuda:{local_rank}", "torch")
        torch.cuda.set_device(device.index)
    chosen = backend(d, device)
    if not dist.is_initialized():
        dist.init_process_group(chosen, device_id=torch.device(device.torch) if device.type == "cuda" else None)
    names: list[str | None] = [None] * world
    dist.all_gather_object(names, f"{socket.gethostname()}/{device.torch} {device.name}")
    _GROUP_TAGS.update({"dist.backend": chosen, "dist.nodes": str(world // int(os.environ.get("LOCAL_WORLD_SIZE", world))),
                        "dist.devices": "; ".join(f"{i}:{n}" for i, n in enumerate(names))})  # fmt: skip
    return dataclasses.replace(runtime, device=device, world_size=world, rank=dist.get_rank(), process_group=True)


def group_tags() -> dict[str, str]:
    return dict(_GROUP_TAGS)


def leave() -> None:
    if "torch.distributed" not in sys.modules:  # never joined a group (a TensorFlow stage loads no torch)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def effective_train(train: TrainParams, world: int, d: DistributedConfig) -> TrainParams:
    """The global batch and learning rate of a `world`-rank run: batch split or multiplied, lr scaled to it.

    lr_scaling follows the global batch's growth over train.batch_size (Goyal et al.: linear; Krizhevsky: sqrt),
    so with global_batch: true the global batch, and with it the lr, stay as written.
    """
    global_batch = train.batch_size if d.global_batch else train.batch_size * world
    if global_batch % world:
        raise ConfigError(
            f"params.yaml: train.batch_size: {train.batch_size} does not split evenly over {world} ranks "
            "(distributed.global_batch: true); pick a multiple of the world size"
        )
    growth = global_batch / train.batch_size
    factor = {"none": 1.0, "linear": growth, "sqrt": math.sqrt(growth)}[d.lr_scaling]
    return dataclasses.replace(train, batch_size=global_batch, lr=train.lr * factor)


def _tf_cluster(d: DistributedConfig, runtime: Runtime) -> dict[str, str]:
    """Several hosts: every worker posts its address to a store at rdzv_endpoint and reads the others',
    which is what TF_CONFIG needs (MultiWorkerMirroredStrategy has no rendezvous of its own)."""
    host = socket.gethostname()
    if runtime.device.type == "cuda":
        names = [f"{host}/GPU:{i} {n}" for i, n in enumerate(gpu_names()[runtime.device.index :][: d.gpus])]
    else:
        names = [f"{host}/CPU:{i} {runtime.device.name}" for i in range(d.gpus)]
    strategy = "MirroredStrategy" if d.nodes == 1 else "MultiWorkerMirroredStrategy"
    tags = {"dist.backend": f"tf.distribute.{strategy}", "dist.nodes": str(d.nodes),
            "dist.devices": "; ".join(f"{i}:{n}" for i, n in enumerate(names))}  # fmt: skip
    if d.nodes == 1:
        return tags
    workers = swap_addresses(d)
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": d.node_rank}})
    return {**tags, "dist.workers": ", ".join(workers)}


def swap_addresses(d: DistributedConfig) -> list[str]:
    """Each host's `address:port` for its TF worker, in node_rank order, through a TCPStore that node 0 serves."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    host, port = str(d.rdzv_endpoint).rsplit(":", 1)
    store = TCPStore(host, int(port), d.nodes, is_master=d.node_rank == 0, timeout=timedelta(minutes=10))
    store.set(f"worker{d.node_rank}", f"{_reachable_address(host)}:{_free_port()}")
    workers = [store.get(f"worker{i}").decode() for i in range(d.nodes)]
    store.set(f"read{d.node_rank}", "1")
    if d.node_rank == 0:  # node 0 serves the store: it may leave only once every host has read it
        store.wait([f"read{i}" for i in range(d.nodes)])
    return workers


def _reachable_address(peer: str) -> str:
    """This host's address on the interface that routes to `peer` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def local_gpus_needed(cfg: Config, ranks: int | None = None) -> None:
    """Fail before launching ranks that would find no GPU of their own."""
    ranks = ranks or cfg.distributed.gpus
    if cfg.device == "cuda" and len(gpu_names()) < ranks:
        raise DeviceError(f"params.yaml: distributed.gpus: {ranks} ranks asked for, {len(gpu_names())} GPU(s) on this host")
