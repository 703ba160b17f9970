"""The coordinator's side of the HTTP gateway: bind its socket, start, watch, restart and stop its process.

The coordinator binds the listening socket itself and hands it to the gateway process (pass_fds), so:
- the port (0 picks a free one) is known before the gateway starts, with no free-port race;
- a restart keeps the port, and connections that arrive meanwhile wait in the backlog;
- the coordinator never accepts on it: only the gateway process does.

Lifecycle: STOPPED -> RUNNING (spawned) -> EXITED (its pidfd fired) -> RUNNING (restart after a backoff,
doubling to RESTART_MAX while it keeps dying within HEALTHY_S) ... -> STOPPED (stop(): SIGTERM, wait up
to `budget` s, SIGKILL, wait). The gateway dies with the coordinator (PR_SET_PDEATHSIG, and it checks its
parent pid every second), so no orphan outlives it.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from orchestrator.launch.base import exit_words, with_source_root
from orchestrator.security.bind import is_loopback_host

log = logging.getLogger("orchestrator.http")

RESTART_FIRST, RESTART_MAX = 0.2, 5.0  # restart backoff (seconds)
HEALTHY_S = 30.0  # a gateway that ran this long restarts at once after its next exit
STOP_BUDGET = 5.0  # seconds per stage of stop(): after SIGTERM, then after SIGKILL


class GatewayState(enum.Enum):
    """STOPPED -> RUNNING -> EXITED -> RUNNING ... ; RUNNING or EXITED -> STOPPED on stop()."""

    STOPPED = "stopped"
    RUNNING = "running"
    EXITED = "exited"


_TRANSITIONS = {GatewayState.STOPPED: {GatewayState.RUNNING},
                GatewayState.RUNNING: {GatewayState.EXITED, GatewayState.STOPPED},
                GatewayState.EXITED: {GatewayState.RUNNING, GatewayState.STOPPED}}


class Gateway:
    """One supervised gateway process. Construct cheaply; `start()` binds and spawns."""

    def __init__(self, cfg):
        self.cfg = cfg  # the ServerConfig (its `http` table, log settings, `insecure`)
        self.state = GatewayState.STOPPED
        self.url: str | None = None
        self.restarts = 0
        self._sock: socket.socket | None = None
        self._popen: subprocess.Popen | None = None
        self._pidfd: int | None = None
        self._loop = None
        self._spec: dict = {}
        self._started_at = 0.0
        self._backoff = RESTART_FIRST
        self._restart_at: float | None = None

    def _set(self, new: GatewayState) -> None:
        if new != self.state and new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"http gateway: invalid transition {self.state.value} -> {new.value}")
        self.state = new

    def start(self, loop, endpoint: str, pools: dict, metrics_url: str | None) -> str:
        """Bind the HTTP socket and spawn the gateway. `pools` maps pool name -> handler name.
        Returns the URL. Raises ValueError when the address cannot be bound."""
        http = self.cfg.http
        self._sock = _bind(http.host, http.port)
        host, port = self._sock.getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        if not is_loopback_host(http.host) and not http.api_key_file:
            print(f"{'!' * 78}\nWARNING: serving HTTP on {self.url} WITHOUT an API key (--insecure).\n"
                  f"Anyone who can reach it can run jobs on these GPUs.\n{'!' * 78}", file=sys.stderr, flush=True)
        self._loop = loop
        self._spec = {"endpoint": endpoint, "fd": self._sock.fileno(), "url": self.url, "pools": pools,
                      "metrics_url": metrics_url, "api_key_file": http.api_key_file,
                      "job_timeout": http.job_timeout, "parent_pid": os.getpid(),
                      "log_format": self.cfg.log_format, "log_level": self.cfg.log_level}
        self._spawn()
        return self.url

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = with_source_root(env.get("PYTHONPATH"))
        env["PYTHONUNBUFFERED"] = "1"
        # Its output goes straight to serve's stdout/stderr, in the same log format as ours. A session of
        # its own keeps a terminal's Ctrl-C (sent to the whole foreground group) from stopping it while
        # the coordinator drains: uvicorn would obey it; the coordinator decides when it stops.
        self._popen = subprocess.Popen([sys.executable, "-m", "orchestrator.http", "--spec", json.dumps(self._spec)],
                                       env=env, stdin=subprocess.DEVNULL, pass_fds=(self._sock.fileno(),),
                                       start_new_session=True)
        self._started_at = time.monotonic()
        self._set(GatewayState.RUNNING)
        try:
            self._pidfd = os.pidfd_open(self._popen.pid)
            self._loop.add(self._pidfd, self._on_exit)
        except (AttributeError, OSError):
            self._pidfd = None  # no pidfd: tick() polls the process instead
        log.info("http gateway: started pid %d on %s", self._popen.pid, self.url)

    def _on_exit(self) -> None:
        """Its pidfd fired (or tick() saw it gone): reap it and plan a restart."""
        code = self._reap()
        now = time.monotonic()
        self._backoff = RESTART_FIRST if now - self._started_at >= HEALTHY_S else self._backoff
        self._restart_at = now + self._backoff
        log.warning("http gateway: pid %d %s; restarting in %.1f s", self._popen.pid, exit_words(code),
                    self._backoff)
        self._backoff = min(self._backoff * 2, RESTART_MAX)
        self._set(GatewayState.EXITED)

    def _reap(self) -> int:
        code = self._popen.wait()
        if self._pidfd is not None:
            self._loop.remove(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        return code

    def tick(self, now: float, stopping: bool) -> None:
        """Restart a gateway that exited, once its backoff has passed (not while the coordinator stops)."""
        if self.state == GatewayState.RUNNING and self._pidfd is None and self._popen.poll() is not None:
            self._on_exit()
        if self.state == GatewayState.EXITED and not stopping and now >= self._restart_at:
            self.restarts += 1
            self._spawn()

    def stop(self, reason: str, budget: float = STOP_BUDGET) -> None:
        """SIGTERM (uvicorn finishes open responses), wait `budget` s, then SIGKILL and wait `budget` s
        again. Closes the listening socket. Idempotent; blocks up to 2 x `budget` seconds."""
        if self.state == GatewayState.RUNNING:
            log.info("http gateway: stopping pid %d: %s", self._popen.pid, reason)
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(budget)
            except subprocess.TimeoutExpired:
                log.warning("http gateway: pid %d ignored SIGTERM for %.0f s; killing (%s)", self._popen.pid,
                            budget, reason)
                self._popen.kill()
                self._popen.wait(budget)
            self._reap()
        self._set(GatewayState.STOPPED)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (uvicorn writes a
    # response's head and body apart; with Nagle each request would wait for a delayed ACK, 40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot bind HTTP on {host}:{port}: {e.strerror or e}") from None
    return sock

