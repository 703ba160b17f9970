"""Socket fuzzer: 10,000 hostile cases at a real coordinator's client socket.

Cases are random and mutated from valid messages: wrong types, missing and unknown fields, reply and
worker ops, huge length headers, deep nesting, non-map tops, ext types, multipart messages with the
wrong frame count, messages over the limit and over the hard ZMQ cap, raw TCP garbage, hand-made ZMTP
with lying frame sizes, and sockets of incompatible types. Meanwhile a real Client runs echo jobs that
must all succeed. Every message sent on the fuzz DEALER must get exactly one final reply (results,
errors and oks are counted; stream chunks are not), so nothing is silently lost either.

Reproduce a failure with FUZZ_SEED=<seed printed in the assertion>.
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time

import msgpack
import psutil
import pytest
import zmq

from protocol import Codec, Limits, ProtocolError
from protocol.messages import Scale, Stop
from tests.conftest import poll_until

N_CASES = int(os.environ.get("FUZZ_CASES", "10000"))  # raise it for a soak run
SEED = int(os.environ.get("FUZZ_SEED", "20260707"))
TIMEOUT = 120.0  # generous: the machine is shared and loaded
WINDOW = 400  # fuzz messages awaiting their reply before the fuzzer drains (below any HWM)
MAX_MESSAGE = 256 * 1024
HARD_CAP = 2 * MAX_MESSAGE + 1024
LIMITS = Limits(max_message_bytes=MAX_MESSAGE, max_str_len=65_536, max_bin_len=131_072,
                max_array_len=1000, max_map_len=1000)
SERVER_ARGS = ["--handler", "echo", "--devices", "cpu:1", "--max-message-bytes", str(MAX_MESSAGE),
               "--max-str-len", "65536", "--max-bin-len", "131072", "--max-array-len", "1000",
               "--max-map-len", "1000"]
OPS = ["submit", "cancel", "status", "health", "ping", "result", "chunk", "error", "ok", "w_run",
       "w_result", "w_hello", "w_hb", "w_ready", "w_fatal", "w_chunk", "w_error", "nope", ""]
FINAL_OPS = {"result", "error", "ok"}
# A valid submit map whose last value, "input", is left for the case to append.
SUBMIT_PREFIX = msgpack.packb({"v": 1, "op": "submit", "id": 1, "pool": "echo", "input": None})[:-1]


# ---------------------------------------------------------------------------- case generators


class Cases:
    """Deterministic case generator: `next()` -> (kind, payload)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.codec = Codec(LIMITS)
        self.next_id = 0
        self.last_kind = ""

    def value(self, depth: int = 0):
        r = self.rng
        kinds = ["int", "neg", "big", "float", "str", "bin", "nil", "bool"] + (
            ["list", "map"] if depth < 4 else [])
        k = r.choice(kinds)
        if k == "list":
            return [self.value(depth + 1) for _ in range(r.randrange(5))]
        if k == "map":
            keys = ["a", "texts", "__ndarray__", "ms", "x" * r.randrange(30)]
            return {r.choice(keys): self.value(depth + 1) for _ in range(r.randrange(4))}
        return {"int": lambda: r.randrange(100), "neg": lambda: -r.randrange(2**63),
                "big": lambda: r.randrange(2**64), "float": lambda: r.choice([0.5, -1e308, float("nan"),
                                                                             float("inf"), 1e-300]),
                "str": lambda: "é" * r.randrange(20), "bin": lambda: r.randbytes(r.randrange(40)),
                "nil": lambda: None, "bool": lambda: r.random() < 0.5}[k]()

    def valid(self) -> dict:
        r = self.rng
        self.next_id += 1
        rid = r.choice([self.next_id, str(self.next_id), b"b%d" % self.next_id, r.randrange(5)])
        op = r.choices(["submit", "ping", "status", "health", "cancel"], [6, 1, 1, 1, 1])[0]
        msg = {"v": 1, "op": op, "id": rid}
        if op == "submit":
            msg.update(pool="echo", input=self.value())
            for field, v in (("stream", r.random() < 0.5), ("timeout", r.choice([30.0, 1e-6, 1e12])),
                             ("retries", r.randrange(3))):
                if r.random() < 0.3:
                    msg[field] = v
        elif op == "cancel":
            msg["job"] = r.randrange(self.next_id + 1)
        return msg

    def structural(self) -> dict:
        r, msg = self.rng, self.valid()
        how = r.randrange(8)
        if how == 0:
            msg[r.choice(list(msg))] = self.value()  # any field, any type
        elif how == 1:
            msg.pop(r.choice(list(msg)))
        elif how == 2:
            msg[r.choice(["handler", "module", "x", "", "__class__"])] = self.value()
        elif how == 3:
            msg["op"] = r.choice(OPS)
        elif how == 4:
            msg["v"] = r.choice([0, 2, "1", None, 1.0, True, -1, 2**64 - 1])
        elif how == 5:
            msg["pool"] = r.choice(["", "os:system", "echo\x00", "p" * r.randrange(70_000), 5])
        elif how == 6:
            msg["input"] = r.choice([list(range(1001)), {str(i): 0 for i in range(1001)},
                                     "s" * 65_537, b"b" * 131_073, list(range(1000))])
        else:
            msg[r.choice(["timeout", "retries", "stream", "id"])] = r.choice(
                [float("nan"), -1, 0, float("inf"), -0.0, 2**64 - 1, -2**63, [], {}, "1"])
        return msg

    def bytes_mutant(self) -> bytes:
        r = self.rng
        raw = bytearray(msgpack.packb(self.valid(), use_bin_type=True))
        for _ in range(r.randrange(1, 4)):
            how, at = r.randrange(4), r.randrange(len(raw))
            if how == 0:
                raw[at] ^= 1 << r.randrange(8)
            elif how == 1:
                del raw[at:]
            elif how == 2:
                raw[at:at] = r.randbytes(r.randrange(1, 16))
            else:
                raw[at] = r.randrange(256)
            if not raw:
                break
        return bytes(raw)

    def huge_header(self) -> bytes:
        """A container or string whose header claims far more than the frame holds."""
        r = self.rng
        head = r.choice([b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xd9", b"\xc5", b"\xde", b"\xdc"])
        size = {b"\xd9": 1, b"\xc5": 2, b"\xde": 2, b"\xdc": 2}.get(head, 4)
        claim = r.choice([2**(8 * size) - 1, 2**(8 * size - 1), r.randrange(2**(8 * size))])
        inner = head + claim.to_bytes(size, "big") + r.randbytes(r.randrange(64))
        return r.choice([inner, SUBMIT_PREFIX + inner])

    def deep(self) -> bytes:
        depth = self.rng.choice([100, 1000, 1023, 1024, 5000, 100_000])
        inner = self.rng.choice([b"\x91", b"\x81\xa1k"]) * depth + b"\xc0"
        return SUBMIT_PREFIX + inner

    def top_level(self) -> bytes:
        r = self.rng
        value = r.choice([[self.valid()], 5, "submit", None, msgpack.ExtType(5, b"x"),
                          {1: 2}, {b"op": b"ping"}, msgpack.Timestamp(1, 2)])
        if isinstance(value, dict) and r.random() < 0.5:
            value = {**self.valid(), **{r.choice([1, 2.5, b"k"]): 1}}  # non-str keys
        return msgpack.packb(value, use_bin_type=True, strict_types=False)

    def multipart(self) -> list:
        r = self.rng
        parts = [r.choice([b"", msgpack.packb(self.valid()), r.randbytes(r.randrange(50))])
                 for _ in range(r.randrange(2, 7))]
        if r.random() < 0.3:
            parts[0] = b""  # an empty delimiter first: a REQ-style envelope (valid with 2 parts)
        return parts

    def near_limit(self) -> bytes:
        """A valid submit just under max_message_bytes: its result is a little over it."""
        size = MAX_MESSAGE - self.rng.randrange(16)

        def body(n: int) -> bytes:
            return msgpack.packb({"v": 1, "op": "submit", "id": 1, "pool": "echo",
                                  "input": [b"n" * 100_000, b"n" * 100_000, b"n" * n]})

        gap = size - len(body(0))
        return next(b for n in range(gap, gap - 6, -1) if len(b := body(n)) <= size)

    def is_admin(self, frames: list) -> bool:
        """Well-formed stop/scale requests are an authenticated client's right, not fuzz: skip them."""
        body = frames[-1] if len(frames) == 1 or (len(frames) == 2 and frames[0] == b"") else None
        try:
            return body is not None and isinstance(self.codec.decode(body), (Stop, Scale))
        except ProtocolError:
            return False

    def next(self) -> tuple[str, object]:
        r = self.rng
        kind = r.choices(["structural", "bytes", "valid", "random", "multipart", "huge", "deep",
                          "top", "too_large", "near_limit", "over_cap", "tcp", "socktype", "req",
                          "fresh"],
                         [300, 250, 100, 80, 90, 60, 20, 60, 5, 5, 1, 20, 5, 3, 20])[0]
        self.last_kind = kind
        if kind in ("over_cap", "tcp", "socktype", "req", "fresh"):
            return kind, None
        make = {"structural": lambda: msgpack.packb(self.structural(), use_bin_type=True),
                "bytes": self.bytes_mutant, "valid": lambda: msgpack.packb(self.valid()),
                "random": lambda: r.randbytes(r.randrange(2000)), "huge": self.huge_header,
                "deep": self.deep, "top": self.top_level, "near_limit": self.near_limit,
                "too_large": lambda: b"\xc6" + r.randbytes(r.randrange(MAX_MESSAGE, HARD_CAP - 10))}
        frames = self.multipart() if kind == "multipart" else [make[kind]()]
        return ("skip", None) if self.is_admin(frames) else ("dealer", frames)


# ---------------------------------------------------------------------------- raw ZMTP / TCP


def zmtp_greeting(rng: random.Random) -> bytes:
    mechanism = rng.choice([b"NULL", b"NULL", b"CURVE", b"PLAIN", rng.randbytes(20)])
    major = rng.choice([3, 3, 3, 1, 2, 255])
    signature = b"\xff" + bytes(8) + b"\x7f"
    return signature + bytes([major, rng.choice([0, 1])]) + mechanism.ljust(20, b"\0")[:20] + bytes(32)


def zmtp_ready(socket_type: bytes) -> bytes:
    body = b"\x05READY\x0bSocket-Type" + len(socket_type).to_bytes(4, "big") + socket_type
    return b"\x04" + bytes([len(body)]) + body


def raw_tcp_case(rng: random.Random, host: str, port: int) -> None:
    """One raw connection: garbage, a broken or lying ZMTP handshake, or a frame whose size lies."""
    how = rng.randrange(5)
    if how == 0:
        data = rng.randbytes(rng.randrange(1, 3000))
    else:
        data = zmtp_greeting(rng)
        if how >= 2:
            data += zmtp_ready(rng.choice([b"DEALER", b"DEALER", b"PUB", b"ROUTER", b"X" * 200]))
        if how == 3:  # a long frame claiming far more than the hard cap, then a little data
            data += b"\x02" + rng.choice([2**62, 2**40, HARD_CAP + 1]).to_bytes(8, "big") + bytes(100)
        if how == 4:  # a short frame with a lying "more" flag, then a truncated one
            data += b"\x01\x05hello" + b"\x00\xff" + rng.randbytes(10)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(data)


def socktype_case(ctx: zmq.Context, rng: random.Random, address: str) -> None:
    """A socket of a type a ROUTER must refuse; it tries to send a valid-looking request."""
    sock = ctx.socket(rng.choice([zmq.PUB, zmq.PUSH, zmq.PAIR, zmq.SUB, zmq.PULL, zmq.REP]))
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(msgpack.packb({"v": 1, "op": "ping", "id": 1}), zmq.NOBLOCK)
    except zmq.ZMQError:
        pass  # PULL, SUB and REP cannot send; the connection attempt is the case
    sock.close(linger=0)


def wait_readable(sock: zmq.Socket, alive, what: str) -> None:
    """Poll in slices so that a dead coordinator fails the test at once, not after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not sock.poll(200):
        assert alive(), f"seed {SEED}: the coordinator died"
        assert time.monotonic() < deadline, f"seed {SEED}: {what} got no reply within {TIMEOUT} s"


def req_case(ctx: zmq.Context, address: str, alive) -> dict:
    """A REQ client is a valid pattern (empty delimiter envelope): it must get its reply."""
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(msgpack.packb({"v": 1, "op": "ping", "id": "req"}))
        wait_readable(sock, alive, "a REQ client")
        return msgpack.unpackb(sock.recv())
    finally:
        sock.close(linger=0)


# ---------------------------------------------------------------------------- the valid client


class ValidClient(threading.Thread):
    """Runs echo jobs in batches until stopped; every result must equal its input."""

    def __init__(self, client):
        super().__init__(daemon=True, name="valid-client")
        self.client, self.stop, self.done, self.errors = client, threading.Event(), 0, []
        self.rng = random.Random(SEED + 1)

    def run(self) -> None:
        while not self.stop.is_set():
            inputs = [{"i": self.done + k, "blob": self.rng.randbytes(self.rng.randrange(10_000)),
                       "nested": [[k, "x"]] * self.rng.randrange(10)} for k in range(8)]
            try:
                jobs = [self.client.submit("echo", x, stream=k % 2 == 0) for k, x in enumerate(inputs)]
                for x, job in zip(inputs, jobs):
                    out = job.result(TIMEOUT)
                    if out != x:
                        self.errors.append(f"wrong output for job {x['i']}")
            except Exception as e:  # noqa: BLE001 - recorded and asserted on
                self.errors.append(f"{type(e).__name__}: {e}")
                return
            self.done += len(inputs)


# ---------------------------------------------------------------------------- the test


class Fuzz:
    """The fuzz DEALER plus the side sockets; counts what it sent and the final replies it got."""

    def __init__(self, address: str, alive):
        self.address, self.alive = address, alive
        host, port = address[len("tcp://"):].rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.ctx = zmq.Context()
        self.dealer = self._dealer()
        self.big = self._dealer()  # over-cap frames get this connection cut: keep it apart
        self.sent = self.finals = self.chunks = 0
        self.counts: dict[str, int] = {}

    def _dealer(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(self.address)
        return sock

    def drain(self, until: int, deadline: float) -> None:
        """Read replies until at most `until` messages await one."""
        while self.sent - self.finals > until:
            assert time.monotonic() < deadline, (
                f"seed {SEED}: {self.sent - self.finals} fuzz messages unanswered at the deadline")
            assert self.alive(), f"seed {SEED}: the coordinator died"
            if not self.dealer.poll(200):
                continue
            while True:
                try:
                    frames = self.dealer.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                op = msgpack.unpackb(frames[-1], raw=False)["op"]
                assert op in FINAL_OPS | {"chunk"}, op
                self.finals += op in FINAL_OPS
                self.chunks += op == "chunk"

    def run_case(self, cases: Cases, kind: str, payload) -> None:
        self.counts[cases.last_kind] = self.counts.get(cases.last_kind, 0) + 1
        if kind == "dealer":
            self.dealer.send_multipart(payload)
            self.sent += 1
        elif kind == "over_cap":
            self.big.send(b"\xc6" + cases.rng.randbytes(HARD_CAP + cases.rng.randrange(1, 50_000)))
        elif kind == "tcp":
            raw_tcp_case(cases.rng, self.host, self.port)
        elif kind == "socktype":
            socktype_case(self.ctx, cases.rng, self.address)
        elif kind == "req":
            reply = req_case(self.ctx, self.address, self.alive)
            assert reply["op"] == "ok" and reply["id"] == "req", reply
        elif kind == "fresh":  # a new connection, so a new identity: per-client state must not pile up
            sock = self._dealer()
            sock.send(msgpack.packb(cases.valid() if cases.rng.random() < 0.5 else cases.structural()))
            wait_readable(sock, self.alive, "a fresh connection")
            sock.close(linger=0)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.slow
def test_socket_fuzz(serve):
    s = serve(SERVER_ARGS, timeout=TIMEOUT)
    coordinator = s.proc.pid  # `orchestrator serve` runs the coordinator in its own process
    client = s.client(timeout=TIMEOUT)
    assert [client.run("echo", i, timeout=TIMEOUT) for i in range(50)] == list(range(50))  # warm
    rss_before, log_lines_before = rss(coordinator), len(s.log().splitlines())
    valid = ValidClient(client)
    valid.start()
    fuzz, cases = Fuzz(s.address, alive=lambda: s.proc.poll() is None), Cases(SEED)
    started = time.monotonic()
    peak = rss_before
    try:
        for i in range(N_CASES):
            fuzz.run_case(cases, *cases.next())
            if fuzz.sent - fuzz.finals >= WINDOW:
                fuzz.drain(WINDOW // 2, time.monotonic() + TIMEOUT)
            if i % 500 == 0:
                peak = max(peak, rss(coordinator))
                assert s.proc.poll() is None, f"seed {SEED}: coordinator died at case {i}:\n{s.log()}"
        fuzz.drain(0, time.monotonic() + TIMEOUT)
    finally:
        valid.stop.set()
        valid.join(TIMEOUT if s.proc.poll() is None else 1)  # a dead coordinator answers nothing
        fuzz.close()
    elapsed = time.monotonic() - started
    rss_after = rss(coordinator)
    peak = max(peak, rss_after)
    log_lines = len(s.log().splitlines()) - log_lines_before
    print(f"\nfuzz seed {SEED}: {N_CASES} cases {fuzz.counts} in {elapsed:.1f} s; {fuzz.sent} fuzz "
          f"messages, {fuzz.finals} final replies, {fuzz.chunks} chunks; valid jobs during: {valid.done}; "
          f"coordinator RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB (peak "
          f"{peak / 2**20:.1f}); {log_lines} log lines")

    assert s.proc.poll() is None, s.log()
    assert "Traceback" not in s.log(), s.log()[-5000:]
    assert valid.errors == [], valid.errors[:5]
    assert valid.done >= 8, "the valid client made no progress during the fuzz run"
    assert fuzz.finals == fuzz.sent  # drain(0) returned: every fuzz message got one final reply
    # ... and a valid client's jobs still succeed afterwards, on a fresh connection too.
    with s.client(timeout=TIMEOUT) as after:
        jobs = [after.submit("echo", {"after": i}) for i in range(100)]
        assert [j.result(TIMEOUT) for j in jobs] == [{"after": i} for i in range(100)]
    # No fuzz input killed the worker (it would have been restarted, hiding the crash).
    worker = s.client(timeout=TIMEOUT).health()["pools"]["echo"]["workers"]["echo/0"]
    assert worker["last_exit_reason"] is None and worker["restarts"] == 0, worker
    grown = (rss_after - rss_before) / 2**20
    assert grown < 50, f"coordinator RSS grew {grown:.1f} MiB"
    # Bad input is logged rate-limited (20 lines/s plus "suppressed" counts), not line per frame.
    assert log_lines < 60 * (elapsed + 2), log_lines
    poll_until(lambda: "similar messages suppressed" in s.log(), TIMEOUT, what="a suppression line")


# ---------------------------------------------------------------------------- inputs pass through unread

INFLATING_ITEMS = 999_999  # under the default max_array_len
INFLATING_JOBS = 6


def inflating_submit(rid) -> bytes:
    """A submit whose input is ~1 MB on the wire but ~64 MB as Python objects: an array of empty arrays
    (one byte each on the wire, a list object each once decoded), the ~70x the fuzzer found."""
    head = msgpack.packb({"v": 1, "op": "submit", "id": rid, "pool": "sleep", "input": None})[:-1]
    return head + b"\xdd" + INFLATING_ITEMS.to_bytes(4, "big") + b"\x90" * INFLATING_ITEMS


@pytest.mark.slow
def test_coordinator_memory_per_job_does_not_depend_on_what_input_holds(serve):
    """The coordinator forwards `input` as bytes (protocol/codec.py, opaque_input): a queued job costs it
    about its wire size. Jobs queue behind a sleeping one; the coordinator's RSS may grow by a few times
    their wire size (the frame, the bytes kept for the worker), never by the ~64x a decode would cost."""
    s = serve(["--handler", "sleep", "--devices", "cpu:1"], timeout=TIMEOUT)
    coordinator = s.proc.pid
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(s.address)
    try:
        busy = [f"busy{i}" for i in range(s.workers("sleep")[0]["capacity"])]  # every credit taken
        for rid in busy:
            sock.send(msgpack.packb({"v": 1, "op": "submit", "id": rid, "pool": "sleep",
                                     "input": {"ms": 600_000}}))
        poll_until(lambda: s.status()["pools"]["sleep"]["inflight"] == len(busy), TIMEOUT, 0.05, "busy jobs")
        wire = len(inflating_submit(0))
        before = rss(coordinator)
        for rid in range(INFLATING_JOBS):
            sock.send(inflating_submit(rid))
        poll_until(lambda: s.status()["pools"]["sleep"]["queue_depth"] == INFLATING_JOBS, TIMEOUT, 0.05,
                   "the jobs to queue")
        per_job = (rss(coordinator) - before) / INFLATING_JOBS
        print(f"\ncoordinator RSS per queued job: {per_job / 2**20:.2f} MiB for {wire / 2**20:.2f} MiB on "
              f"the wire ({per_job / wire:.1f}x; decoding the input would cost ~64x)")
        assert per_job < 8 * wire, f"{per_job / wire:.1f}x the wire size per queued job"
        jobs = [*range(INFLATING_JOBS), *busy]
        for rid in jobs:
            sock.send(msgpack.packb({"v": 1, "op": "cancel", "id": f"c{rid}", "job": rid}))
        replies = []
        while len(replies) < 2 * len(jobs):  # an ok per cancel, a `cancelled` error per job
            assert sock.poll(int(TIMEOUT * 1000)), replies
            replies.append(msgpack.unpackb(sock.recv()))
        assert sum(r.get("code") == "cancelled" for r in replies) == len(jobs), replies
    finally:
        ctx.destroy(linger=0)


@pytest.mark.slow
def test_an_input_the_worker_cannot_decode_fails_that_job_alone(serve):
    """The worker decodes `input` under the client limits: a bad one gets its code for that job only; the
    same worker process goes on serving (no restart). Nesting past msgpack's depth limit cannot even be
    skipped: the coordinator refuses that message whole (bad_request), with its id, which was readable."""
    s = serve(SERVER_ARGS, timeout=TIMEOUT)
    pids = s.worker_pids()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(s.address)
    head = msgpack.packb({"v": 1, "op": "submit", "pool": "echo", "id": 0, "input": None})[:-1]
    cases = {
        "ext": (msgpack.packb(msgpack.ExtType(5, b"x")), "bad_request"),
        "long string": (msgpack.packb("x" * 70_000), "too_large"),
        "long list": (msgpack.packb(list(range(1001))), "too_large"),
    }
    try:
        for rid, (inner, _code) in enumerate(cases.values()):
            sock.send(head.replace(b"\xa2id\x00", b"\xa2id" + msgpack.packb(rid + 1)) + inner)
        sock.send(head.replace(b"\xa2id\x00", b"\xa2id\x63") + b"\x91" * 5000 + b"\xc0")  # id 99, deep
        sock.send(msgpack.packb({"v": 1, "op": "submit", "pool": "echo", "id": 100, "input": [1, "two"]}))
        replies = {}
        while len(replies) < len(cases) + 2:
            assert sock.poll(int(TIMEOUT * 1000)), replies
            reply = msgpack.unpackb(sock.recv())
            replies[reply["id"]] = reply
    finally:
        ctx.destroy(linger=0)
    for rid, (what, (_inner, code)) in enumerate(cases.items(), 1):
        assert (replies[rid]["op"], replies[rid]["code"]) == ("error", code), (what, replies[rid])
        assert replies[rid]["message"].startswith("input: "), replies[rid]
    assert (replies[99]["op"], replies[99]["code"]) == ("error", "bad_request"), replies[99]
    assert replies[100]["op"] == "result" and replies[100]["output"] == [1, "two"]
    assert s.worker_pids() == pids and s.workers("echo")[0]["restarts"] == 0
