"""What a stage tells the person waiting for it: a start line, what it read, progress, a result line.

In a terminal progress is a live tqdm bar; in a log (no tty: DVC piped to a file, CI) it is one line at most
every ACCELBENCH_PROGRESS_S seconds (default 10), so a long step never leaves minutes of silence and a short
one adds no noise. Everything goes to stderr, which DVC passes through unbuffered.
"""
from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")

# Lines a user can do nothing about: MLflow's system-metrics monitor announcing each start and stop and
# "Skip logging GPU metrics" on a CPU host.
QUIET_LOGGERS = ("mlflow.system_metrics", "mlflow.system_metrics.system_metrics_monitor",
                 "mlflow.system_metrics.metrics.gpu_monitor",
                 "mlflow.store.db.utils", "alembic.runtime.migration",  # a new store's table creation, line by line
                 "optuna")  # each throwaway study the benchmark times, each trial finished  # fmt: skip


def interval_s() -> float:
    return float(os.environ.get("ACCELBENCH_PROGRESS_S", "10"))


def say(text: str) -> None:
    print(f"accelbench {text}", file=sys.stderr, flush=True)


ERROR_MARK = ": error: "


def error_line(stage: str, message: object) -> str:
    """A stage's one error line, as cli prints it and as a parent finds it in a child's stderr."""
    return f"accelbench {stage}{ERROR_MARK}{message}"


def error_message(line: str, stage: str | None = None) -> str | None:
    """The message of an error line (of `stage`'s only, if given); None for any other line (start, read,
    progress, result)."""
    head, mark, message = line.rstrip("\n").partition(ERROR_MARK)
    if mark and head.startswith("accelbench ") and (stage is None or head == f"accelbench {stage}"):
        return message
    return None


def last_error(stderr: str) -> str | None:
    """The message of the last error line a child process wrote, None if it wrote none (a crash)."""
    messages = [m for m in map(error_message, stderr.splitlines()) if m is not None]
    return messages[-1] if messages else None


KEPT_LINES = 1000  # of a child's stderr: a failure is reported from its end
DRAIN_WAIT_S = 10.0  # after a child's exit: a process it left behind may hold its stderr open
_ECHO_LOCK = threading.Lock()  # one line at a time from several children


class Drain:
    """A thread that reads a helper process's stderr (a benchmark child, a tuning worker) without pause, keeps its
    last lines and echoes each line on this process's stderr while `echo` is set (always, without one), so the
    helper's progress shows while it runs. Reading at once, not after the child ends, is also what keeps a child
    from blocking on a full pipe; only a stalled reader of our own stderr could stall it, as it would stall this
    process. The child's error line is kept, not echoed: the parent reports it as its own."""

    def __init__(self, pipe: IO[str], echo: threading.Event | None = None) -> None:
        if echo is None:
            echo = threading.Event()
            echo.set()
        self._lines: collections.deque[str] = collections.deque(maxlen=KEPT_LINES)
        self._thread = threading.Thread(target=self._read, args=(pipe, echo), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str], echo: threading.Event) -> None:
        with pipe:
            for line in pipe:
                self._lines.append(line)
                if echo.is_set() and error_message(line) is None:
                    with _ECHO_LOCK:
                        sys.stderr.write(line)
                        sys.stderr.flush()

    def text(self) -> str:
        """What the child wrote (its last KEPT_LINES lines), once it has closed its stderr."""
        self._thread.join(DRAIN_WAIT_S)
        return "".join(self._lines)


def quiet_noise() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class LogBar:
    """tqdm's interface (update, set_postfix_str, close) for logs: a line at most every `interval_s()` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.postfix = ""
        self._start = time.monotonic()
        self._initial = initial
        self._last_line = self._start

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last_line >= interval_s():
            self._last_line = now
            say(self.line(now))

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def line(self, now: float) -> str:
        done = self.n - self._initial
        elapsed = now - self._start
        per = elapsed / done if done else None
        parts = [f"{self.desc}: {self.unit} {self.n}" + (f"/{self.total}" if self.total else "")]
        if per is not None:
            parts.append(f"{_duration(per)}/{self.unit}")
            if self.total:
                parts.append(f"ETA {_duration(per * (self.total - self.n))}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def close(self) -> None:
        pass

    def __enter__(self) -> LogBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def bar(total: int | None, desc: str, unit: str, initial: int = 0) -> Any:
    """A live tqdm bar where stderr is a terminal, else a LogBar."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=False)
    return LogBar(total, desc, unit, initial)


def track(items: Iterable[T], total: int | None, desc: str, unit: str, initial: int = 0) -> Iterator[T]:
    """`for x in track(range(a, b), ...)`: the loop's progress as a bar or as log lines."""
    with bar(total, desc, unit, initial) as b:
        for item in items:
            yield item
            b.update(1)


class Stage:
    """The start and result lines of one stage call; inside it, `read()` and `result()` speak for the stage."""

    def __init__(self, stage: str, workload: str | None = None, announce: bool = True):
        """`announce=False`: a helper process of a stage (benchmark child, tuning worker); its parent speaks."""
        self.label = f"{stage} {workload}" if workload else stage
        self.announce = announce
        self.outcome = ""
        self._start = time.monotonic()

    def __enter__(self) -> Stage:
        global _ACTIVE
        _ACTIVE = self
        quiet_noise()
        if self.announce:
            say(f"{self.label}: start")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        global _ACTIVE
        _ACTIVE = None
        if exc_type is None and self.announce:
            took = _duration(time.monotonic() - self._start)
            say(f"{self.label}: done in {took}" + (f"; {self.outcome}" if self.outcome else ""))


_ACTIVE: Stage | None = None


def _label() -> str:
    return _ACTIVE.label if _ACTIVE else os.path.basename(sys.argv[0])


def read(text: str) -> None:
    """One line on what the stage read: the file, its format, rows, anything skipped or filled."""
    say(f"{_label()}: read {text}")


def note(text: str) -> None:
    say(f"{_label()}: {text}")


def result(text: str) -> None:
    """What the stage produced, said on its closing line."""
    if _ACTIVE:
        _ACTIVE.outcome = text
