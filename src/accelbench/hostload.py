"""What else the host did while a figure was timed: steal time, the CPU clock, and other processes' load.

Read from psutil at the edges of each timed interval, where the OS exposes them (steal: Linux guests; clock:
where cpufreq or /proc/cpuinfo reports one). A value the OS does not give is None, never a made-up zero.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# psutil's busy fields; guest time is already inside user/nice on Linux, and steal is reported on its own
_BUSY = ("user", "nice", "system", "irq", "softirq")


def logical_cores() -> int:
    return psutil.cpu_count(logical=True) or 1


def physical_cores() -> int:
    """The thread count a fair CPU run uses: one per physical core (SMT siblings share one core's units)."""
    return psutil.cpu_count(logical=False) or logical_cores()


def native_bf16(cpuinfo: str | None = None) -> str | None:
    """None when the CPU computes bf16 natively (AMX or AVX512-BF16 in /proc/cpuinfo's flags), else why not."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.exists():
            return "no /proc/cpuinfo to read the CPU's bf16 support from"
        cpuinfo = path.read_text()
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    if flags & {"amx_bf16", "avx512_bf16"}:
        return None
    return "this CPU has no native bf16 (neither amx_bf16 nor avx512_bf16 in /proc/cpuinfo): it would time an emulation"


def thread_settings() -> dict[str, str]:
    """The environment that sets a CPU run's threads, as it was ('unset' where not set)."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_AFFINITY", "OMP_PROC_BIND")
    return {k.lower(): os.environ.get(k, "unset") for k in keys}


def _clock_mhz() -> float | None:
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError):
        return None
    return float(freq.current) if freq and freq.current else None


@dataclass
class HostProbe:
    """One reading per interval: begin() and end() around it; `readings` holds one dict per interval."""

    readings: list[dict[str, float | None]] = field(default_factory=list)
    _start: tuple | None = None

    def begin(self) -> None:
        me = psutil.Process()
        self._start = (time.perf_counter(), psutil.cpu_times(), me.cpu_times(), _clock_mhz())

    def end(self) -> None:
        if self._start is None:
            return
        t0, sys0, me0, mhz0 = self._start
        wall = time.perf_counter() - t0
        sys1, me1, mhz1 = psutil.cpu_times(), psutil.Process().cpu_times(), _clock_mhz()
        busy = sum(getattr(sys1, k, 0.0) - getattr(sys0, k, 0.0) for k in _BUSY)
        ours = (me1.user - me0.user) + (me1.system - me0.system)
        steal = getattr(sys1, "steal", None)
        clocks = [m for m in (mhz0, mhz1) if m]
        self.readings.append({
            "wall_s": wall,
            "ours_cores": ours / wall if wall > 0 else None,
            # the OS counts CPU time in ticks (10 ms): a negative difference is rounding, not negative load
            "others_cores": max(0.0, busy - ours) / wall if wall > 0 else None,
            "steal_pct": 100 * (steal - sys0.steal) / (wall * logical_cores()) if steal is not None and wall > 0 else None,
            "mhz": sum(clocks) / len(clocks) if clocks else None,
        })  # fmt: skip
        self._start = None
