"""The one error boundary of every stage: a clear line on stderr and an exit code that says why."""
from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from . import tracking
from .config import Config, load_config
from .errors import AccelbenchError, ConfigError, Interrupted
from .workloads import Workload, get_workload

EXIT_ERROR = 2


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def main(stage: str, fn: Callable[..., None], extra_args: tuple[str, ...] = ()) -> None:
    """`python stages/<stage>.py <workload>`: load params, run the stage, turn errors into exit codes.

    `extra_args` names further positional arguments passed on to `fn` (used by the benchmark's child process).
    """
    signal.signal(signal.SIGTERM, _raise_interrupted)
    root = tracking.project_root()
    args = sys.argv[1:]
    name = args[0] if len(args) == 1 + len(extra_args) else None
    try:
        if name is None:
            raise ConfigError(f"usage: python stages/{stage}.py <workload> {' '.join(extra_args)}".rstrip())
        wl = get_workload(name)
        try:
            cfg = load_config(root / "params.yaml")
            if name not in cfg.workloads:
                raise ConfigError(f"params.yaml: workloads: '{name}' is not listed (listed: {cfg.workloads})")
            fn(cfg, wl, root, *args[1:])
        except AccelbenchError as exc:
            # failed before its run began: still leave a FAILED trace (relaunched ranks leave their own)
            quiet_rank = os.environ.get("RANK", "0") != "0"  # rank 0 speaks for a data-parallel run
            if not tracking.RUNS_STARTED and not getattr(exc, "recorded", False) and not quiet_rank:
                tracking.record_failed_run(name, stage, str(exc))
            raise
    except AccelbenchError as exc:
        print(f"accelbench {stage}: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        print(f"accelbench {stage}: interrupted (SIGINT)", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Interrupted as exc:
        print(f"accelbench {stage}: interrupted (signal {exc.signum})", file=sys.stderr)
        sys.exit(128 + exc.signum)


def main_child(stage: str, fn: Callable[..., None]) -> None:
    main(stage, fn, extra_args=("framework", "device", "out.json"))


def main_global(stage: str, fn: Callable[..., None]) -> None:
    """Stages that span workloads (hardware, report): same error boundary, no workload argument."""
    try:
        fn(tracking.project_root())
    except AccelbenchError as exc:
        print(f"accelbench {stage}: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
