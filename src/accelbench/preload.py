"""Training stages start warm: a background process that has already imported the stage's framework (torch or
TensorFlow), MLflow, scikit-learn, Optuna and this package forks one child per stage, so that a stage pays a fork
instead of 4-5 s of imports (2 cores).

`python stages/train.py <workload>` asks the warm process that matches its framework, interpreter, installed
packages, source files and import-time environment. The hardware stage starts the ones the listed workloads need;
a stage that finds none starts one (detached; it exits after IDLE_S with no stage running) and runs in-process
itself. A warm process holds one framework: a TensorFlow stage loads no torch. The forked child takes
the stage's argv, directory, environment and standard streams (passed as file descriptors), so it behaves as the
stage process would; its exit status becomes the stage's. Signals to the stage process are passed on to the child,
and a stage process that dies (SIGKILL) takes its child with it. ACCELBENCH_PRELOAD=0 runs every stage in-process.

The warm process only imports: no thread of its own, no MLflow store, no CUDA (a CUDA context does not survive a
fork), so each child starts as clean as a new interpreter would, less the imports.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENABLE_ENV = "ACCELBENCH_PRELOAD"
IDLE_S = float(os.environ.get("ACCELBENCH_PRELOAD_IDLE_S", "120"))
# stage -> (module, function); the stage scripts' own imports, made once in the warm process
STAGES = {"tune": ("accelbench.pipeline", "tune"), "train": ("accelbench.pipeline", "train"),
          "benchmark": ("accelbench.benchmark", "run"), "ingest": ("accelbench.data_stages", "ingest"),
          "eda": ("accelbench.data_stages", "eda"), "prepare": ("accelbench.data_stages", "prepare"),
          "summary": ("accelbench.summary", "stage")}  # fmt: skip
DATA_STAGES = {"ingest", "eda", "prepare", "summary"}  # warm in the "data" process: no framework, no MLflow
# a stage's worker process -> (module, entry point); `python -m accelbench.preload child <name> <args>` runs it
CHILDREN = {"benchmark": ("accelbench.benchmark", "child_main"), "tune": ("accelbench.tuning", "worker_main")}
WORKLOADS = ("accelbench.workloads.diabetes", "accelbench.workloads.guava", "accelbench.workloads.quantum",
             "accelbench.workloads.rnn", "accelbench.workloads.sentiment", "accelbench.workloads.stock")
# What the stages import, per kind of warm process: "data" (ingest, eda, prepare, summary: no framework, no MLflow),
# or one framework (a TensorFlow stage loads no torch). Not Triton or PennyLane, which only some stages load.
COMMON = ("accelbench.pipeline", "accelbench.benchmark", "accelbench.tuning", "accelbench.tracking", *WORKLOADS,
          "mlflow.store.tracking.sqlalchemy_store", "sklearn.linear_model", "sklearn.model_selection",
          "sklearn.feature_extraction.text", "sklearn.metrics", "scipy.stats", "matplotlib.pyplot")  # fmt: skip
PRELOADED = {
    "data": ("accelbench.data_stages", "accelbench.summary", *WORKLOADS, "pandas", "sklearn.model_selection",
             "matplotlib.pyplot", "PIL.Image"),
    "torch": (*COMMON, "accelbench.engines.torch", "accelbench.models.bilstm", "accelbench.models.bilstm_fast",
              "accelbench.models.cnn", "accelbench.models.cnn_fast", "accelbench.models.mlp", "accelbench.models.quanv",
              "accelbench.models.recurrent", "torch.optim", "torch._dynamo"),
    "tensorflow": (*COMMON, "accelbench.engines.tensorflow", "accelbench.models.keras_twins"),
}  # fmt: skip
# Variables that packages read when they are imported: a warm process made under other values would not match.
IMPORT_TIME_ENV = ("PYTHON", "LD_", "OMP_", "KMP_", "MKL_", "OPENBLAS_", "GOTO", "BLIS_", "VECLIB_", "NUMEXPR_",
                   "CUDA_", "NVIDIA_", "NCCL_", "TORCH", "PYTORCH_", "TRITON_", "MLFLOW_", "SKLEARN_", "MPL",
                   "TF_", "XLA_", "TMPDIR", "HOME", "XDG_", "LANG", "LC_")  # fmt: skip
_HEADER = 8  # bytes of the request's length
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def main(stage: str) -> None:
    """A stage script's entry point: the stage in a warm child where one serves, else in this process."""
    _run(stage, "data" if stage in DATA_STAGES else _framework(sys.argv[1]) if len(sys.argv) == 2 else None)


def child_command(name: str, *args: str) -> list[str]:
    """The command that starts one of a stage's worker processes (CHILDREN), warm as the stages are (its framework
    is the argument after the workload)."""
    return [sys.executable, "-m", "accelbench.preload", "child", name, *args]


def _main_child(name: str, args: list[str]) -> None:
    sys.argv = [sys.argv[0], *args]
    _run(f"child:{name}", args[1] if len(args) > 1 else None)


def _run(entry: str, framework: str | None) -> None:
    if _wants_warm(framework) and (code := _run_warm(entry, framework)) is not None:
        sys.exit(code)
    run_here(entry)


def run_here(entry: str) -> None:
    """`entry`: a stage, or `child:<name>`, in this process."""
    if entry.startswith("child:"):
        module, function = CHILDREN[entry.removeprefix("child:")]
        getattr(importlib.import_module(module), function)()
        return
    from .cli import main as stage_main

    module, function = STAGES[entry]
    on_failure = None  # the data stages open no MLflow store, so they leave no failed run
    if entry not in DATA_STAGES:
        from .tracking import record_failure as on_failure
    stage_main(entry, getattr(importlib.import_module(module), function), on_failure=on_failure)


def _wants_warm(framework: str | None) -> bool:
    return os.environ.get(ENABLE_ENV, "1") != "0" and hasattr(socket, "send_fds") and framework in PRELOADED


def _framework(workload: str) -> str | None:
    """The stage's framework as params.yaml and its study set it, read without loading the package's workloads
    (0.4 s of pandas and numpy): the warm child validates everything as the stage always has. None where the
    file is in doubt."""
    from .config import with_study
    from .errors import ConfigError

    try:
        raw = with_study(_params(), Path("params.yaml"))
        section = raw.get(workload)
        return (section.get("framework") if isinstance(section, dict) else None) or raw.get("framework")
    except (ConfigError, AttributeError, TypeError):
        return None


def _params() -> dict[str, Any]:
    import yaml

    root = Path(os.environ.get("DVC_ROOT") or os.getcwd())  # project.project_root, without its imports
    try:
        raw = yaml.safe_load((root / "params.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


def prestart() -> None:
    """Start the warm processes the listed workloads' frameworks need, ahead of the first training stage, so that
    their imports overlap the data stages: the hardware stage, which DVC runs first, calls this."""
    workloads = _params().get("workloads") or []
    for framework in {"data"} | {_framework(w) for w in workloads if isinstance(w, str)}:
        if not _wants_warm(framework):
            continue
        path = socket_path(framework)
        if not answering(path):
            _start_server(path, framework)


def answering(path: Path) -> bool:
    """Whether a warm process listens at `path` (the connection, closed unsent, costs it a fork that exits)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
            return True
        except OSError:
            return False


def socket_path(framework: str) -> Path:
    """One warm process per framework, interpreter, package files, installed packages and import-time environment."""
    package = Path(__file__).resolve().parent
    files = sorted((str(p.relative_to(package)), p.stat().st_mtime_ns, p.stat().st_size) for p in package.rglob("*.py"))
    paths = [(p, os.stat(p).st_mtime_ns) for p in sys.path[1:] if os.path.isdir(p)]  # installs touch site-packages
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(IMPORT_TIME_ENV))
    python = [os.path.realpath(sys.executable), sys.prefix, sys.version, str(sys.flags)]  # python and python3 alike
    key = json.dumps([python, files, paths, env])
    return _folder() / f"{framework}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.sock"


def _folder() -> Path:
    folder = Path(tempfile.gettempdir()) / f"accelbench-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _run_warm(stage: str, framework: str) -> int | None:
    """The stage's exit code from a warm child; None where no warm process answered (nothing ran then)."""
    path = socket_path(framework)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        _start_server(path, framework)
        return None
    from .stage_times import process_age_s

    request = {
        "stage": stage, "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "path0": sys.path[0],
        "started": time.clock_gettime(time.CLOCK_BOOTTIME) - process_age_s(), "encoding": sys.stdout.encoding,
        "ignored": [int(s) for s in FORWARDED if signal.getsignal(s) is signal.SIG_IGN],
        "cpus": sorted(os.sched_getaffinity(0)),
    }  # fmt: skip
    with sock, _descriptors() as fds:
        request["fds"] = list(fds)
        data = json.dumps(request).encode()
        try:
            socket.send_fds(sock, [len(data).to_bytes(_HEADER, "big") + data], list(fds.values()))
            reply = sock.makefile("r")
            pid = int(reply.readline())
        except (OSError, ValueError):
            return None  # the warm process went away before it forked: run here
        for sig in FORWARDED:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, lambda signum, frame: _pass_on(pid, signum))
        status = reply.readline()
    if not status.strip():
        print(f"accelbench {stage}: the warm process serving this stage went away (pid {pid})", file=sys.stderr)
        return 1
    return int(status)


def _pass_on(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has just ended
        os.kill(pid, signum)


@contextlib.contextmanager
def _descriptors():
    """{number: descriptor to send} for what a process started here would inherit: stdin, stdout, stderr (/dev/null
    for one that is closed) and every inheritable descriptor (a benchmark child's pipes to its stage)."""
    opened = []
    fds = {}
    for fd in sorted(int(name) for name in os.listdir("/proc/self/fd")):
        try:
            if fd <= 2 or os.get_inheritable(fd):
                fds[fd] = fd
        except OSError:  # listdir's own descriptor, closed by now
            continue
    for fd in (0, 1, 2):
        if fd not in fds:
            opened.append(os.open(os.devnull, os.O_RDWR))
            fds[fd] = opened[-1]
    try:
        yield fds
    finally:
        for fd in opened:
            os.close(fd)


def _start_server(path: Path, framework: str) -> None:
    """A detached warm process for `path`, unless one failed its imports there: stages then run in-process, where
    the failure shows with its own message, until `start` clears the marker."""
    if path.with_suffix(".failed").exists():
        return
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.Popen([sys.executable, "-m", "accelbench.preload", "serve", framework, str(path)], cwd=path.parent,
                     start_new_session=True, **quiet)  # fmt: skip


def serve(path: Path, framework: str) -> None:
    """Import, listen, fork a child per stage; exit after IDLE_S with no stage running. One per path: a second,
    started by a stage that raced the first, finds the lock taken and exits."""
    lock = open(path.with_suffix(".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return
    lock.truncate(0)
    lock.write(str(os.getpid()))  # for `stop`
    lock.flush()
    try:
        import matplotlib

        matplotlib.use("Agg")
        for module in PRELOADED[framework]:
            importlib.import_module(module)
        if framework == "torch":
            _map_cudnn()
    except Exception:  # stages then run in-process, where the same import fails with its own message
        import traceback

        path.with_suffix(".failed").write_text(traceback.format_exc())
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    listener.bind(str(path))
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the select below when a child ends
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # `stop`: the finally below removes the socket
    children: set[int] = set()
    idle_since = time.monotonic()
    try:
        while children or time.monotonic() - idle_since < IDLE_S:
            ready, _, _ = select.select([listener, wake_r], [], [], 1.0)
            if wake_r in ready:
                os.read(wake_r, 4096)
            while children and (pid := os.waitpid(-1, os.WNOHANG)[0]):
                children.discard(pid)
                idle_since = time.monotonic()
            if listener in ready:
                conn, _ = listener.accept()
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    for fd in (listener.fileno(), wake_r, wake_w, lock.fileno()):
                        os.close(fd)
                    _supervise(conn)
                conn.close()
                children.add(pid)
    finally:
        path.unlink(missing_ok=True)
        path.with_suffix(".lock").unlink(missing_ok=True)  # one per version of the code: they would pile up


def _map_cudnn() -> None:
    """Map cuDNN's sub-libraries (about 1 GB) here, once: cuDNN opens them at its first call of each kind, which
    took 4.5 s of every RNN stage on the GPU host. Mapping a library is no CUDA call: no context, nothing probed."""
    import ctypes

    import torch

    try:
        spec = importlib.util.find_spec("nvidia.cudnn") if torch.version.cuda else None
    except ModuleNotFoundError:  # a CUDA build with cuDNN from elsewhere (conda, a system install)
        return
    for folder in spec.submodule_search_locations if spec else []:
        for library in sorted(Path(folder, "lib").glob("libcudnn*.so*")):
            with contextlib.suppress(OSError):
                ctypes.CDLL(str(library))


def _supervise(conn: socket.socket) -> None:
    """In the forked process for one request: fork the stage, pass its exit code back, and kill it (SIGKILL, as
    the stage process was) if the stage process that asked is gone."""
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 250)
        if not data:  # `start` checking that the server answers
            return
        size = int.from_bytes(data[:_HEADER], "big")
        while len(data) < _HEADER + size:
            data += conn.recv(1 << 20)
        request = json.loads(data[_HEADER:])
        pid = os.fork()
        if pid == 0:
            conn.close()
            _become_stage(request, fds)
        for fd in fds:
            os.close(fd)
        conn.sendall(f"{pid}\n".encode())
        code = os.waitstatus_to_exitcode(_wait_or_kill(pid, conn))
        code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
        conn.sendall(f"{code}\n".encode())
    except OSError:
        pass
    finally:
        os._exit(0)


def _wait_or_kill(pid: int, conn: socket.socket) -> int:
    """The stage's wait status; SIGKILL it first if the stage process that asked is gone (it was killed without
    passing a signal on, so its stage goes as it would have)."""
    try:
        ends = [os.pidfd_open(pid)]
    except (AttributeError, OSError):  # before Linux 5.3: look every 50 ms
        ends = []
    while True:
        ready, _, _ = select.select([conn, *ends], [], [], None if ends else 0.05)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if conn in ready:
            try:
                gone = not conn.recv(64)
            except OSError:
                gone = True
            if gone:
                os.kill(pid, signal.SIGKILL)
                return os.waitpid(pid, 0)[1]


def _take_cpus(cpus: list[int]) -> None:
    """The stage process's CPUs (taskset, a batch scheduler's cpuset), which a fork does not carry over: the child
    runs where a new interpreter would. torch sized its thread pool from this process's CPUs when it loaded, so it
    is held to one thread per CPU left, as a new interpreter's would be, unless the environment sets the count."""
    if set(cpus) == os.sched_getaffinity(0):
        return
    os.sched_setaffinity(0, cpus)
    torch = sys.modules.get("torch")
    pinned = "OMP_NUM_THREADS" in os.environ or "MKL_NUM_THREADS" in os.environ
    if torch is not None and not pinned and torch.get_num_threads() > len(cpus):
        torch.set_num_threads(len(cpus))


def _become_stage(request: dict[str, Any], fds: list[int]) -> None:
    """Turn this forked process into the stage process that asked: its streams, directory, environment and argv."""
    code: Any = 0
    try:
        _place(fds, request["fds"])
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _take_cpus(request["cpus"])
        sys.argv = request["argv"]
        for sig in FORWARDED:  # as a new interpreter started by the stage process would have them
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, signal.SIG_IGN if int(sig) in request["ignored"] else default)
        sys.path[0] = request["path0"]
        encoding = request["encoding"] or "utf-8"
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, encoding=encoding, closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding=encoding, errors="backslashreplace", closefd=False)
        from . import stage_times

        stage_times.started_at(request["started"])
        run_here(request["stage"])
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(_exit(code))


def _place(received: list[int], numbers: list[int]) -> None:
    """Each received descriptor at the number it had in the stage process (its children's pipes are named by
    number), by way of numbers above all of them so that none is overwritten before it moved."""
    high = max([*received, *numbers]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, high) for fd in received]
    for fd in received:
        os.close(fd)
    for fd, number in zip(moved, numbers):
        os.dup2(fd, number)
        os.close(fd)


def _exit(code: Any) -> int:
    """What the interpreter does at exit, which os._exit skips: wait for threads, run exit handlers, flush."""
    import atexit
    import threading

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    with contextlib.suppress(Exception):
        threading._shutdown()  # non-daemon threads, and concurrent.futures' own exit hooks, as at a normal exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code or 0


def start(framework: str = "torch", timeout_s: float = 120.0) -> Path:
    """The warm process for this framework and environment, started if none serves, once it answers."""
    path = socket_path(framework)
    path.with_suffix(".failed").unlink(missing_ok=True)
    deadline = time.monotonic() + timeout_s
    if not answering(path):
        _start_server(path, framework)
    while not answering(path):
        failed = path.with_suffix(".failed")
        if failed.exists() or time.monotonic() > deadline:
            why = failed.read_text()[-2000:] if failed.exists() else "timed out"
            raise RuntimeError(f"no warm process at {path}: {why}")
        time.sleep(0.2)
    return path


def stop() -> list[int]:
    """SIGTERM every warm process of this user (the stages they are running go on); their pids."""
    stopped = []
    for lock_path in _folder().glob("*.lock"):
        with open(lock_path) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # got it: no server holds it
                continue
            except OSError:
                pid = int(lock.read() or 0)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                stopped.append(pid)
    return stopped


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "serve":
        serve(Path(sys.argv[3]), sys.argv[2])
    elif command == "child":
        _main_child(sys.argv[2], sys.argv[3:])
    elif command == "start":
        print(start(*sys.argv[2:3]))
    elif command == "stop":
        print(" ".join(map(str, stop())) or "no warm process")
    else:
        sys.exit("usage: python -m accelbench.preload start [torch|tensorflow] | stop")
