"""A throwaway PostgreSQL cluster for the tests: initdb into a temporary directory, loopback only.

The Debian package `postgresql` ships the server binaries under /usr/lib/postgresql/<major>/bin
(not on PATH). initdb refuses to run as root, so as root the cluster belongs to the `postgres` user;
otherwise to the current user. The server listens on 127.0.0.1 at a free port with its unix socket
in the temporary directory, trusts loopback connections (nothing else can reach it) and is stopped
with `pg_ctl stop -m fast` when the test session ends, also on failure (and at interpreter exit as a
last resort). Each test gets its own database, so tests never see each other's rows.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL server's bin directory ($DRIFTLOOP_PG_BIN overrides), or None."""
    if os.environ.get("DRIFTLOOP_PG_BIN"):
        path = Path(os.environ["DRIFTLOOP_PG_BIN"])
        return path if (path / "initdb").is_file() else None
    candidates = [Path(p) for p in glob.glob(PG_BIN_GLOB) if (Path(p) / "initdb").is_file()]
    if candidates:
        return max(candidates, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """One temporary cluster; `create_database()` hands out fresh databases as SQLAlchemy URLs."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self._as_postgres = os.geteuid() == 0
        # as root, under /tmp: the postgres user must be able to reach the directory ($TMPDIR may be private)
        self.root = Path(tempfile.mkdtemp(prefix="driftloop-pg-", dir="/tmp" if self._as_postgres else None))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port: int | None = None
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._running = False

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if proc.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}\n{tail}")
        return proc

    def start(self) -> "PostgresCluster":
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C",
                  "--no-sync")
        last_error: Exception | None = None
        for _ in range(3):  # a free port can be taken between the probe and the bind: try another
            self.port = _free_port()
            # fsync off: the tests kill clients (the service, controllers), never this server or the machine
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off "
                    f"-c max_connections=200 -c shared_buffers=32MB")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts, "start")
                self._running = True
                atexit.register(self.stop)
                return self
            except RuntimeError as err:
                last_error = err
        raise RuntimeError(f"PostgreSQL did not start: {last_error}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its SQLAlchemy URL (psycopg 3)."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._running:
            self._running = False
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
