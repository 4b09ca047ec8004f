"""The one error boundary of every stage: a clear line on stderr and an exit code that says why."""
from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from . import progress
from .errors import AccelbenchError, ConfigError, Interrupted
from .project import load_config, project_root
from .stage_times import quick_teardown, record_at_exit
from .workloads import get_workload

EXIT_ERROR = 2

OnFailure = Callable[[str, str, AccelbenchError], None]  # (workload, stage, error): e.g. leave a FAILED MLflow run


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def main(stage: str, fn: Callable[..., None], extra_args: tuple[str, ...] = (), on_failure: OnFailure | None = None) -> None:
    """`python stages/<stage>.py <workload>`: load params, run the stage, turn errors into exit codes.

    `extra_args` names further positional arguments passed on to `fn` (used by the benchmark's child process
    and tuning workers, helpers whose parent prints the stage's start and result lines).
    `on_failure` records an error that stopped the stage; stages that log to MLflow pass tracking's.
    """
    signal.signal(signal.SIGTERM, _raise_interrupted)
    quick_teardown()
    root = project_root()
    args = sys.argv[1:]
    name = args[0] if len(args) == 1 + len(extra_args) else None
    if not extra_args:  # a stage, not one of its worker processes (they are inside the stage's wall time)
        record_at_exit(root, stage, name)
    try:
        if name is None:
            raise ConfigError(f"usage: python stages/{stage}.py <workload> {' '.join(extra_args)}".rstrip())
        wl = get_workload(name)
        try:
            cfg = load_config(root / "params.yaml")
            if name not in cfg.workloads:
                raise ConfigError(f"params.yaml: workloads: '{name}' is not listed (listed: {cfg.workloads})")
            with progress.Stage(stage, name, announce=not extra_args):
                fn(cfg, wl, root, *args[1:])
        except AccelbenchError as exc:
            if on_failure is not None:
                on_failure(name, stage, exc)
            raise
    except AccelbenchError as exc:
        print(progress.error_line(stage, exc), file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        print(f"accelbench {stage}: interrupted (SIGINT)", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Interrupted as exc:
        print(f"accelbench {stage}: interrupted (signal {exc.signum})", file=sys.stderr)
        sys.exit(128 + exc.signum)


def main_child(stage: str, fn: Callable[..., None], on_failure: OnFailure | None = None) -> None:
    main(stage, fn, extra_args=("framework", "device", "out.json"), on_failure=on_failure)


def main_global(stage: str, fn: Callable[..., None]) -> None:
    """Stages that span workloads (hardware, report): same error boundary, no workload argument."""
    quick_teardown()
    root = project_root()
    record_at_exit(root, stage, None)
    try:
        with progress.Stage(stage):
            fn(root)
    except AccelbenchError as exc:
        print(progress.error_line(stage, exc), file=sys.stderr)
        sys.exit(EXIT_ERROR)
