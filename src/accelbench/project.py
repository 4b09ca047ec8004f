"""The project on disk: where each stage reads and writes, and params.yaml with every workload's section."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from .config import Config, parse, with_study
from .errors import ConfigError
from .workloads import available, get_workload


def project_root() -> Path:
    """DVC sets DVC_ROOT for every stage, also in queued/temp experiments, so all write to one project."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def raw_dir(root: Path, name: str) -> Path:
    return root / "data" / "raw" / name


def prepared_dir(root: Path, name: str) -> Path:
    return root / "data" / "prepared" / name


def results_dir(root: Path, name: str) -> Path:
    return root / "results" / name


def model_dir(root: Path, name: str) -> Path:
    return root / "models" / name


def checkpoint_dir(root: Path, name: str) -> Path:
    return root / "checkpoints" / name


def hardware_file(root: Path) -> Path:
    return root / "results" / "hardware.json"


def reports_dir(root: Path) -> Path:
    return root / "reports"


def load_config(path: Path | str = "params.yaml") -> Config:
    """Read and validate params.yaml; raise ConfigError naming the key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = with_study(raw, path)
    global_keys = {f.name for f in dataclasses.fields(Config)} - {"sections"}
    known = available()
    sections = {}
    for key in raw:
        if key in global_keys:
            continue
        if key not in known:
            raise ConfigError(
                f"{path}: unknown key '{key}' (expected a global key {sorted(global_keys)} "
                f"or a workload {sorted(known)})"
            )
        sections[key] = parse(get_workload(key).Params, raw[key], f"{path}: {key}")
    glob = {k: v for k, v in raw.items() if k in global_keys}
    if "workloads" not in glob:
        raise ConfigError(f"{path}: missing key 'workloads' (the list of workloads to run)")
    cfg = parse(Config, glob, str(path), sep=": ")
    for name in cfg.workloads:
        if name not in known:
            raise ConfigError(f"{path}: workloads: unknown workload '{name}' (known: {sorted(known)})")
        sections.setdefault(name, get_workload(name).Params())
    return dataclasses.replace(cfg, sections=sections)


