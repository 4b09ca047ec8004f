"""Each stage's wall time and the work inside it, so that a stage's fixed cost (imports, store, teardown) stays
a measured figure: `python -m accelbench.stage_times` prints the last record of every stage.

A stage process appends one JSON line to .accelbench/stage_times.jsonl when it exits; wall time counts from the
process's creation, so interpreter start-up and imports are in it. What follows the record, the interpreter's
teardown, is kept short by `quick_teardown` (every stage process calls it), so the record misses little of it.
"""
from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from .timing import work_seconds

LOG = Path(".accelbench") / "stage_times.jsonl"
# The fixed-cost goals (seconds): stages that train nothing, and stages that import torch
GOAL_S = {"data": 1.5, "torch": 3.0}
_started_at: float | None = None  # a warm stage (preload.py): when the stage process that asked for it started
DATA_STAGES = {"hardware", "ingest", "eda", "prepare", "summary", "report"}


def quick_teardown() -> None:
    """Freeze the heap as the process exits: the interpreter's teardown then skips collecting every object that
    torch and mlflow made (0.4 s per stage on 2 cores, after the record's clock stopped). Registered first, it
    runs after the record and after the exit handlers registered later; the operating system frees the memory."""
    atexit.register(gc.freeze)


def record_at_exit(root: Path, stage: str, workload: str | None) -> None:
    """Register the record written when this stage process exits (after MLflow's own exit handlers ran)."""
    atexit.register(_append, root / LOG, stage, workload)


def process_age_s() -> float:
    """Seconds since this process was created. Linux: its start tick against the boot clock, to 10 ms; psutil's
    create_time adds the start tick to the boot time as a whole second, which put up to 1 s into every wall."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError, IndexError):
        return time.time() - psutil.Process().create_time()


def started_at(boot_s: float) -> None:
    """Count this stage's wall time from `boot_s` (CLOCK_BOOTTIME): a warm child's own age starts at its fork."""
    global _started_at
    _started_at = boot_s


def _append(path: Path, stage: str, workload: str | None) -> None:
    wall = process_age_s() if _started_at is None else time.clock_gettime(time.CLOCK_BOOTTIME) - _started_at
    row = {"stage": stage, "workload": workload, "wall_s": round(wall, 3), "work_s": round(work_seconds(), 3),
           "warm": _started_at is not None,
           "end": round(time.time(), 3), "pid": os.getpid(), "rank": os.environ.get("RANK", "0")}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one short write in append mode: concurrent stages do not interleave lines
        f.write(json.dumps(row) + "\n")


def latest(path: Path) -> list[dict[str, Any]]:
    """The last record of each (stage, workload), in the order they last ran; rank 0 only."""
    rows: dict[tuple[str, str | None], dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        if row.get("rank", "0") == "0":
            rows.pop((row["stage"], row["workload"]), None)
            rows[(row["stage"], row["workload"])] = row
    return list(rows.values())


def goal(stage: str) -> float:
    return GOAL_S["data"] if stage in DATA_STAGES else GOAL_S["torch"]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<22} {'wall s':>8} {'work s':>8} {'fixed s':>8} {'goal s':>7}  ok"]
    for r in rows:
        name = f"{r['stage']}@{r['workload']}" if r["workload"] else r["stage"]
        fixed = r["wall_s"] - r["work_s"]
        ok = "yes" if fixed <= goal(r["stage"]) else "NO"
        lines.append(f"{name:<22} {r['wall_s']:>8.2f} {r['work_s']:>8.2f} {fixed:>8.2f} {goal(r['stage']):>7.1f}  {ok}")
    wall = sum(r["wall_s"] for r in rows)
    fixed = sum(r["wall_s"] - r["work_s"] for r in rows)
    lines.append(f"{len(rows)} stages: {wall:.1f} s of wall time, {fixed:.1f} s of it fixed cost")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else LOG
    rows = latest(path)
    if not rows:
        print(f"{path}: no stage records yet (run `dvc repro` first)", file=sys.stderr)
        return 2
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
