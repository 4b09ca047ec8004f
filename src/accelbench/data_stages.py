"""The stages that train nothing: hardware, ingest, eda, prepare.

They import no deep-learning framework and open no MLflow store: their record is the files DVC tracks
(hardware.json, source.json, eda.json, meta.json), which the training stages log into their MLflow runs.
"""
from __future__ import annotations

from pathlib import Path

from . import devices, preload
from .config import Config
from .errors import DataError
from .io import SPLITS, atomic_dir, read_json, save_prepared, write_json
from .project import hardware_file, prepared_dir, raw_dir, results_dir
from .timing import work
from .workloads import Workload


def hardware(root: Path) -> None:
    preload.prestart()  # the warm processes import while the first data stages run
    with work():
        info = devices.hardware_info()
        write_json(hardware_file(root), info)
    gpus = ", ".join(g["name"] for g in info["gpus"]) or "no GPU"
    print(f"hardware: {info['cpu']['model']} ({info['cpu']['physical_cores']} cores), {info['ram_gb']} GB RAM, {gpus}")


def ingest(cfg: Config, wl: Workload, root: Path) -> None:
    with atomic_dir(raw_dir(root, wl.name)) as tmp, work():
        summary = wl.ingest(cfg.params(wl.name), tmp)
        write_json(tmp / "source.json", summary)
    print(f"ingest {wl.name}: {summary['rows']} rows from {summary['origin']} (source: {summary['source']})")


def eda(cfg: Config, wl: Workload, root: Path) -> None:
    out = results_dir(root, wl.name) / "eda"
    with atomic_dir(out) as tmp, work():
        write_json(tmp / "eda.json", wl.eda(cfg.params(wl.name), raw_dir(root, wl.name), tmp))
    print(f"eda {wl.name}: summary and plots in {out.relative_to(root)}")


def prepare(cfg: Config, wl: Workload, root: Path) -> None:
    raw = raw_dir(root, wl.name)
    with work():
        prepared = wl.prepare(cfg.params(wl.name), raw, cfg.seed)
        for split in SPLITS:
            if prepared.n(split) == 0:
                raise DataError(f"{raw}: the {split} split is empty; more rows are needed")
        prepared.meta["source"] = read_json(raw / "source.json") if (raw / "source.json").is_file() else None
        save_prepared(prepared_dir(root, wl.name), prepared)
    rows = ", ".join(f"{s} {prepared.n(s)}" for s in SPLITS)
    print(f"prepare {wl.name}: {rows} rows in {prepared_dir(root, wl.name).relative_to(root)}")
