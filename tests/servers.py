"""Throwaway servers the tests start themselves: PostgreSQL (Debian's binaries) and an MLflow tracking server.

Both listen on 127.0.0.1 at a free port and keep everything in one temp dir, removed on exit.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

PG_SUPERUSER_PASSWORD = "superpw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def postgres_missing() -> str | None:
    """Why no throwaway PostgreSQL server can run here, or None when one can."""
    if pg_bin() is None:
        return "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin; `make postgres-server` installs them)"
    try:
        import psycopg  # noqa: F401  (the driver SQLAlchemy uses for postgresql://)
    except ImportError:
        return "psycopg (the dev extra psycopg[binary]) is not installed"
    if os.geteuid() == 0:  # postgres refuses to run as root
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no 'postgres' user to run the server as (postgres refuses root)"
        if not shutil.which("runuser"):
            return "running as root without runuser: cannot start postgres as its own user"
    return None


@dataclass
class Postgres:
    bindir: Path
    dir: Path
    port: int
    as_pg: list[str]

    def run(self, *cmd: str) -> str:
        return subprocess.run([*self.as_pg, *cmd], check=True, capture_output=True, text=True, timeout=120).stdout

    def sql(self, statement: str) -> None:
        self.run(str(self.bindir / "psql"), "-h", str(self.dir), "-p", str(self.port), "-U", "postgres",
                 "-v", "ON_ERROR_STOP=1", "-c", statement)  # fmt: skip

    def database(self, name: str, user: str, password: str) -> str:
        """A new database owned by a new login; its SQLAlchemy URL."""
        self.sql(f"CREATE USER {user} WITH PASSWORD '{password}'")
        self.sql(f"CREATE DATABASE {name} OWNER {user}")
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{name}"

    def dump(self, name: str) -> str:
        """The whole database as SQL text (data included), to search it."""
        return self.run(str(self.bindir / "pg_dump"), "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", name)


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A server with its own data dir and socket in a temp dir, password auth over TCP. Call postgres_missing first."""
    bindir = pg_bin()
    assert bindir is not None, "call postgres_missing() first"
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    tmp = Path(tempfile.mkdtemp(prefix="accelbench-pg-"))
    pwfile = tmp / "pw"
    pwfile.write_text(PG_SUPERUSER_PASSWORD + "\n")
    if as_pg:
        shutil.chown(tmp, "postgres")
        shutil.chown(pwfile, "postgres")
    pg = Postgres(bindir, tmp, free_port(), as_pg)
    data = tmp / "data"
    pg.run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(pwfile),
           "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8")  # fmt: skip
    pg.run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(tmp / "server.log"), "-w", "-t", "60", "start",
           "-o", f"-p {pg.port} -k {tmp} -h 127.0.0.1 -c fsync=off -c max_connections=200")  # fmt: skip
    try:
        yield pg
    finally:
        subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class MlflowServer:
    """`mlflow server` with a database backend and artifacts proxied into a local folder; restartable."""

    backend: str
    artifacts: Path
    log: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)  # e.g. the basic-auth app's config path and admin password
    app: str | None = None  # "basic-auth" for MLflow's basic-auth app
    workers: int = 1  # each worker imports MLflow at start-up: a test's server keeps to one
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", str(self.workers), "--backend-store-uri", self.backend, "--artifacts-destination", str(self.artifacts)]  # fmt: skip
        return cmd + (["--app-name", self.app] if self.app else [])

    def start(self, timeout: float = 120) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.command(), env={**os.environ, **self.env}, stdout=log, stderr=log,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if self.healthy():
                return
            time.sleep(0.2)
        raise AssertionError(f"mlflow server did not answer in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def healthy(self) -> bool:
        try:
            with urlopen(f"{self.url}/health", timeout=2) as resp:
                return resp.status == 200
        except (URLError, HTTPError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        """Kill the server and its workers (its own process group) at once, as a crash would, and reap it."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
