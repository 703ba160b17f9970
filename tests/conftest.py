"""Shared fixtures: real `orchestrator serve` processes on free ports, real clients."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from orchestrator import Client, wait_ready

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every coordinator a test starts checks the job table's and the slots' invariants after each loop turn
# and stops on a violation, so the real Dispatcher and Supervisor run under the check.
os.environ.setdefault("ORCHESTRATOR_VALIDATE", "1")


def pytest_addoption(parser):
    parser.addoption("--gpu-dry-run", action="store_true",
                     help="run the gpu-marked tests that can on CPU workers with tiny models (tests/gpu)")


def poll_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate()` until it returns a truthy value (returned) or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Server:
    """One `orchestrator serve` subprocess. Its stdout+stderr go to a log file we can read."""

    def __init__(self, tmp_path, args: list, env: dict | None = None):
        self.log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
        self.args = args
        self.env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self._log = None  # serve's stdout+stderr file, opened by start()
        self.address: str | None = None
        self._clients: list[Client] = []
        self._status_client: Client | None = None  # one reused client for status polling loops

    def start(self, ready: bool = True, timeout: float = 60.0) -> "Server":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "serve", "--address", "tcp://127.0.0.1:0",
             *self.args], stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        self.address = poll_until(self._endpoint, timeout, what="serve to print its endpoint")
        if ready:
            wait_ready(self.address, timeout=timeout)
        return self

    def _endpoint(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log()}")
        for line in self.log().splitlines():
            if line.startswith("endpoint: "):
                return line.split()[1]
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw) -> Client:
        c = Client(self.address, **kw)
        self._clients.append(c)
        return c

    def worker_pids(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def status(self) -> dict:
        if self._status_client is None:
            self._status_client = self.client()
        return self._status_client.status()

    def workers(self, pool: str) -> list[dict]:
        return self.status()["pools"][pool]["workers"]

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        for c in self._clients:
            c.close()
        if self.proc is None:
            return
        children = self.worker_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in children:  # belt and braces: never leak a worker into the next test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


@pytest.fixture
def serve(tmp_path):
    """Factory: serve(["--handler", "echo", "--devices", "cpu:2"]) -> started Server."""
    servers = []

    def start(args, env=None, ready=True, timeout=60.0) -> Server:
        s = Server(tmp_path, args, env)
        servers.append(s)
        return s.start(ready=ready, timeout=timeout)

    yield start
    for s in servers:
        s.close()
