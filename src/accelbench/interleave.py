"""Turns between the benchmark's device processes, so that their timed intervals interleave.

The parent starts one process per device and hands a single turn round them: only the holder runs, and it
hands the turn on at the end of each timed interval. A slow spell of the host then hits the CPU's and the
GPU's intervals alike, and no process times while another computes. Each child talks to the parent over two
pipes whose descriptors it finds in $ACCELBENCH_TURN_FDS ("<go read fd>,<done write fd>"); without it (a child
started by hand) a turn is always its own.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO

TURN_ENV = "ACCELBENCH_TURN_FDS"
SESSION_ENV = "ACCELBENCH_BENCH_SESSION"  # one id per benchmark stage call: the report tells two runs apart by it


@dataclass
class _Child:
    proc: subprocess.Popen
    go: IO[str]
    done: IO[str]
    stderr: IO[str]

    def take_turn(self) -> bool:
        """Let the child run until it hands the turn back (True) or exits (False)."""
        try:
            self.go.write("go\n")
            self.go.flush()
        except BrokenPipeError:  # it ended before its turn came (e.g. a failed import)
            return False
        return self.done.readline() != ""

    def error_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()


def run_in_turns(cmds: list[list[str]], cwd: Path, env: dict[str, str], log_dir: Path) -> list[tuple[int, str]]:
    """Run the commands as children taking turns round-robin; the exit code and stderr of each child that ended
    on its own, in order. The first child that fails ends the others (SIGTERM: their runs end KILLED), which are
    left out of the answer: the failure is the first child's to report."""
    children = [_start(cmd, cwd, env, log_dir / f"child{i}.stderr") for i, cmd in enumerate(cmds)]
    active, i = list(children), 0
    try:
        while active:
            child = active[i % len(active)]
            if child.take_turn():
                i += 1
                continue
            active.remove(child)
            if child.proc.wait() != 0:
                break
    finally:
        ended = [c for c in children if c.proc.poll() is None]
        for child in children:
            if child in ended:
                child.proc.terminate()
            child.proc.wait()
            child.go.close()
            child.done.close()
    return [(c.proc.returncode, c.error_text()) for c in children if c not in ended]


def _start(cmd: list[str], cwd: Path, env: dict[str, str], stderr_path: Path) -> _Child:
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    stderr = open(stderr_path, "w+")  # a file, not a pipe: a child blocked on a full pipe would hold the turn
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, TURN_ENV: f"{go_r},{done_w}"}, stderr=stderr,
                            pass_fds=(go_r, done_w))  # fmt: skip
    os.close(go_r)  # the parent keeps only its ends: the child's exit then reads as end-of-file
    os.close(done_w)
    return _Child(proc, os.fdopen(go_w, "w"), os.fdopen(done_r), stderr)


class Turn:
    """The child's side: wait() for the turn before any work, hand_on() at the end of each timed interval."""

    def __init__(self, fds: str | None) -> None:
        self._go = self._done = None
        if fds:
            go_fd, done_fd = (int(x) for x in fds.split(","))
            self._go, self._done = os.fdopen(go_fd), os.fdopen(done_fd, "w")

    def wait(self) -> None:
        if self._go is not None:
            self._go.readline()

    def hand_on(self) -> None:
        if self._done is not None:
            self._done.write("y\n")
            self._done.flush()
            self.wait()


_TURN: Turn | None = None


def turn() -> Turn:
    """This process's turn, from the environment its parent set (one per process)."""
    global _TURN
    if _TURN is None:
        _TURN = Turn(os.environ.get(TURN_ENV))
    return _TURN
