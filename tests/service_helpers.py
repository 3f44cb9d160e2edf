"""Start and stop the real driftloop server (a `driftloop serve` subprocess) for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FEEDBACK_TOKEN = "test-feedback-token-0123456789"
ADMIN_TOKEN = "test-admin-token-0123456789"


class Server:
    """`driftloop serve` on a free port, with known tokens (`feedback_token`, `admin_token`;
    `env` may override them) so tests can call the protected endpoints."""

    def __init__(self, home: Path, port: int | None = None, env: dict | None = None, workers: int = 1,
                 db_url: str | None = None):
        self.home = home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env_all = {**os.environ, "DRIFTLOOP_HOME": str(home), "DRIFTLOOP_SERVICE_RELOAD_INTERVAL_S": "0.5",
                   "DRIFTLOOP_SERVICE_WORKERS": str(workers),
                   "DRIFTLOOP_FEEDBACK_TOKEN": FEEDBACK_TOKEN, "DRIFTLOOP_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})}
        self.feedback_token = env_all["DRIFTLOOP_FEEDBACK_TOKEN"]
        self.admin_token = env_all["DRIFTLOOP_ADMIN_TOKEN"]
        self.predict_token = env_all.get("DRIFTLOOP_PREDICT_TOKEN")
        env_all.pop("BENTOML_HOME", None)
        env_all.pop("DRIFTLOOP_DB_URL", None)
        env_all.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if db_url:  # the state DB (prediction log, alias) at this URL instead of SQLite under the home
            env_all["DRIFTLOOP_DB_URL"] = db_url
        self.log_path = home / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "driftloop", "serve", "--port", str(self.port)], cwd=REPO,
                                     env=env_all, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def auth(self, kind: str = "feedback") -> dict[str, str]:
        """The Authorization header for this server's feedback, admin or predict token."""
        return {"Authorization": f"Bearer {getattr(self, f'{kind}_token')}"}

    def wait_ready(self, timeout: float = 120) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log_path.read_text()[-4000:]}")

    def _descendants(self) -> list:
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the supervisor and every worker, like a crash of the machine.

        BentoML starts its workers in their own process groups, and a worker whose supervisor was
        SIGKILLed keeps running (orphaned, still serving on the inherited socket), so the whole
        tree is signalled, not just the group.
        """
        if self.proc.poll() is None:
            workers = self._descendants()
            os.killpg(self.proc.pid, sig)
            for w in workers:
                try:
                    w.send_signal(sig)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self.proc.wait(timeout=60)
            for w in workers:
                try:
                    w.wait(timeout=30)
                except Exception:  # noqa: BLE001
                    pass
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            workers = self._descendants()
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            for w in workers:  # a graceful stop takes its workers along; make sure
                try:
                    w.wait(timeout=15)
                except Exception:  # noqa: BLE001
                    try:
                        w.kill()
                    except Exception:  # noqa: BLE001
                        pass
        self._log.close()
