"""`LogThrottle`: a log line that a peer can trigger at will (a refused connection, a bad request, a handler
failing every job) is written at most `per_second` times a second, so that no client, fuzzer or broken
handler can flood the log. The coordinator and the worker both use it, hence its place here: `protocol` is
the one package both sides import."""
from __future__ import annotations

import logging
import threading
import time


class LogThrottle:
    """Log through `logger` at `level`, at most `per_second` lines a second. Lines over that are counted,
    and the count is logged as one line, "(N WHAT suppressed)", at the first line or `flush()` of a later
    second. Thread-safe: the ZAP handler logs from its own thread.

    >>> import io
    >>> out = io.StringIO(); logger = logging.getLogger("doctest.throttle")
    >>> logger.addHandler(logging.StreamHandler(out)); logger.propagate = False
    >>> throttle = LogThrottle(logger, "similar lines", per_second=2)
    >>> [throttle("line %d", i) for i in range(4)]
    [True, True, False, False]
    >>> throttle.window -= 1; throttle.flush(); print(out.getvalue(), end="")
    line 0
    line 1
    (2 similar lines suppressed)
    """

    def __init__(self, logger: logging.Logger, what: str = "similar messages", level: int = logging.WARNING,
                 per_second: int = 5):
        self.logger, self.what, self.level, self.per_second = logger, what, level, per_second
        self.lock = threading.Lock()
        self.window, self.count, self.suppressed = 0, 0, 0

    def __call__(self, fmt: str, *args, **kwargs) -> bool:
        """Log the line unless this second's share is spent; returns whether it was logged. `kwargs` go to
        `Logger.log` (e.g. `exc_info`)."""
        with self.lock:
            self._roll(int(time.monotonic()))
            self.count += 1
            if self.count > self.per_second:
                self.suppressed += 1
                return False
        self.logger.log(self.level, fmt, *args, **kwargs)
        return True

    def flush(self) -> None:
        """Report a finished second's suppressed count even if no further line comes (call it now and then)."""
        with self.lock:
            self._roll(int(time.monotonic()))

    def _roll(self, now: int) -> None:
        if now == self.window:
            return
        if self.suppressed:
            self.logger.log(self.level, "(%d %s suppressed)", self.suppressed, self.what)
        self.window, self.count, self.suppressed = now, 0, 0
