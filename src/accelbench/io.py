"""Outputs appear whole or not at all: write to a temp path beside the target, then rename."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

SPLITS = ("train", "val", "test")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temp folder; on success it replaces `target`, on failure it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN; DVC and browsers choke on it
    return obj


def write_json(path: Path, obj: Any, sort_keys: bool = True) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: Path) -> Any:
    """A file a stage wrote, or one line naming it where it is not JSON (cut short, edited by hand)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); run the stage that writes it again") from exc


@dataclass
class Prepared:
    """Decoded, model-ready arrays per split plus what preparation learned (scalers, vocab, classes)."""

    splits: dict[str, dict[str, np.ndarray]]
    meta: dict[str, Any]

    def n(self, split: str) -> int:
        return len(self.splits[split]["y"])


def save_prepared(out_dir: Path, prepared: Prepared) -> None:
    with atomic_dir(out_dir) as tmp:
        for split, arrays in prepared.splits.items():
            np.savez(tmp / f"{split}.npz", **arrays)
        write_json(tmp / "meta.json", prepared.meta)


def load_prepared(in_dir: Path) -> Prepared:
    in_dir = Path(in_dir)
    if not (in_dir / "meta.json").is_file():
        raise DataError(f"{in_dir}: no prepared data (run the prepare stage first)")
    splits = {}
    for split in SPLITS:
        with np.load(in_dir / f"{split}.npz") as z:
            splits[split] = {k: z[k] for k in z.files}
    return Prepared(splits, read_json(in_dir / "meta.json"))
