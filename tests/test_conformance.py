"""Conformance: protocol/README.md, played against a real server by a stranger's client.

Everything this test knows about the protocol it reads from protocol/README.md: the server config, the
example sessions, the error table, the request table and the field tables of `status` and `health`.
It speaks to the client socket with raw pyzmq and msgpack only (no import of our client or of
`protocol/`), as a client in another language would. So the doc and the server cannot drift apart: an
example that stops being true, a field sent but not documented (or documented but not sent), a code in
the table that no example shows, all fail here.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
import uuid

import msgpack
import pytest
import zmq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "protocol", "README.md")
WAIT = 120.0  # seconds for any one expected reply or state (a shared 2-core machine)

TYPES = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
         "float": lambda v: isinstance(v, float), "str": lambda v: isinstance(v, str),
         "bool": lambda v: isinstance(v, bool),
         "map": lambda v: isinstance(v, dict), "list": lambda v: isinstance(v, list)}


# ---------------------------------------------------------------------------- reading the doc


def doc_text() -> str:
    with open(DOC) as f:
        return f.read()


def section(text: str, heading: str) -> str:
    """The body of the section whose heading line is `heading` (up to the next heading of its level)."""
    level = heading.split()[0]
    start = text.index(heading + "\n") + len(heading) + 1
    nxt = re.search(rf"^{level} ", text[start:], re.M)
    return text[start:start + nxt.start()] if nxt else text[start:]


def table_rows(body: str) -> list[list[str]]:
    """Rows of the first markdown table in `body`, header and rule excluded, cells stripped."""
    rows = [line for line in body.splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r.strip("|"))] for r in rows[2:]]


def first_code(cell: str) -> str:
    return re.match(r"`([^`]+)`", cell).group(1)


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


EXT = msgpack.ExtType(7, b"ext")


def to_python(notation: str):
    """One message of the doc's notation as a Python value (nil/true/false, `...`, <str N>, <ext>)."""
    out, i, n = [], 0, len(notation)
    while i < n:
        ch = notation[i]
        if ch == '"':  # copy a string literal unchanged
            j = i + 1
            while notation[j] != '"':
                j += 2 if notation[j] == "\\" else 1
            out.append(notation[i:j + 1])
            i = j + 1
            continue
        m = re.match(r"nil\b|true\b|false\b|<str (\d+)>|<ext>", notation[i:])
        if m:
            word = m.group(0)
            out.append({"nil": "None", "true": "True", "false": "False", "<ext>": "('<ext>',)"}.get(
                word, f"('<str>', {m.group(1)})"))
            i += len(word)
            continue
        out.append(ch)
        i += 1
    return _placeholders(ast.literal_eval("".join(out)))


def _placeholders(v):
    if isinstance(v, tuple):
        return EXT if v[0] == "<ext>" else "x" * v[1]
    if isinstance(v, dict):
        return {k: _placeholders(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_placeholders(x) for x in v]
    return v


def sessions(text: str) -> list[list[tuple[str, object]]]:
    """Each ```session block as [("send"|"recv", message)]."""
    out = []
    for block in fenced(text, "session"):
        steps = []
        for line in block.splitlines():
            if line.strip():
                arrow, body = line.split(" ", 1)
                steps.append(({"→": "send", "←": "recv"}[arrow], to_python(body)))
        out.append(steps)
    return out


def field_tables(text: str) -> dict[str, dict[str, tuple]]:
    """"### name" tables of the status and health sections: name -> {field: (checks, nullable)}."""
    tables = {}
    for top in ("## status map (reply to `status`)", "## health map (reply to `health`)"):
        body = section(text, top)
        for name, sub in re.findall(r"^### ([^\n]+)\n(.*?)(?=^### |\Z)", body, re.M | re.S):
            fields = {}
            for field, typ, _meaning in table_rows(sub):
                kinds = [k.strip() for k in typ.split(" or ")]
                fields[first_code(field)] = ([TYPES[k] for k in kinds if k != "nil"], "nil" in kinds)
            tables[name.strip()] = fields
    return tables


# ---------------------------------------------------------------------------- checking replies


def matches(expected, got) -> bool:
    """`...` matches anything; maps need the same keys; a bool is never an int."""
    if expected is Ellipsis:
        return True
    if isinstance(expected, dict):
        return isinstance(got, dict) and expected.keys() == got.keys() and \
            all(matches(expected[k], got[k]) for k in expected)
    if isinstance(expected, list):
        return isinstance(got, list) and len(expected) == len(got) and all(map(matches, expected, got))
    return type(expected) is type(got) and expected == got


def check_fields(value: dict, table: str, tables: dict, where: str) -> None:
    fields = tables[table]
    assert set(value) == set(fields), f"{where}: fields sent {sorted(value)} but documented {sorted(fields)}"
    for name, (checks, nullable) in fields.items():
        v = value[name]
        ok = (v is None and nullable) or any(c(v) for c in checks)
        assert ok, f"{where}.{name} = {v!r} does not have its documented type"


def check_status(st: dict, tables: dict) -> None:
    check_fields(st, "status", tables, "status")
    check_fields(st["limits"], "limits", tables, "status.limits")
    for pname, pool in st["pools"].items():
        check_fields(pool, "status pool", tables, f"status.pools.{pname}")
        for w in pool["workers"]:
            where = f"status.pools.{pname}.workers[{w['name']}]"
            check_fields(w, "status worker", tables, where)
            assert all(isinstance(d, str) for d in w["devices"]) and all(TYPES["int"](p) for p in w["pids"])
            for r in w["ranks"]:
                check_fields(r, "status rank", tables, where + ".ranks")
            if w["failure"] is not None:
                check_fields(w["failure"], "failure", tables, where + ".failure")


def check_health(h: dict, tables: dict) -> None:
    check_fields(h, "health", tables, "health")
    check_fields(h["limits"], "limits", tables, "health.limits")
    for pname, pool in h["pools"].items():
        check_fields(pool, "health pool", tables, f"health.pools.{pname}")
        for wname, w in pool["workers"].items():
            check_fields(w, "health worker", tables, f"health.pools.{pname}.workers.{wname}")
            if w["failure"] is not None:
                check_fields(w["failure"], "failure", tables, f"health...{wname}.failure")


# ---------------------------------------------------------------------------- a raw client


class Raw:
    """A DEALER socket, msgpack in and out, replies buffered until the session asks for their id."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        self.sock.connect(address)
        self.buffer: list[dict] = []

    def send(self, msg) -> None:
        self.sock.send(msgpack.packb(msg, use_bin_type=True))

    def request(self, msg: dict) -> dict:
        self.send(msg)
        return self.next_for(msg["id"], 10.0)

    def next_for(self, rid, timeout: float = WAIT) -> dict:
        """The next reply carrying `rid` (replies to other ids wait in the buffer)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.buffer):
                if m.get("id") == rid and type(m.get("id")) is type(rid):
                    return self.buffer.pop(i)
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(int(left * 1000)), f"no reply for id {rid!r} in {timeout} s"
            self.buffer.append(msgpack.unpackb(self.sock.recv(), raw=False))

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------- the test


@pytest.fixture
def server(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text(fenced(section(doc_text(), "## Examples"), "toml")[0])
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "serve", "--config", str(config),
                             "--address", "tcp://127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    try:
        yield proc, tmp_path / "serve.log"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def endpoint(proc, log_path) -> str:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        for line in log_path.read_text().splitlines():
            if line.startswith("endpoint: "):
                return line.split()[1]
        time.sleep(0.05)
    raise AssertionError("serve printed no endpoint")


def wait_settled(raw: Raw, tables: dict, rid: int = -1) -> dict:
    """Every pool's first load settled: all ready but `broken`, which failed."""
    deadline = time.monotonic() + WAIT
    while True:
        h = raw.request({"v": 1, "op": "health", "id": rid})["data"]
        status = {name: p["status"] for name, p in h["pools"].items()}
        if status == {"echo": "ready", "sleep": "ready", "fail": "ready", "crash": "ready",
                      "broken": "failed"}:
            return h
        assert time.monotonic() < deadline, f"pools did not settle: {status}"
        time.sleep(0.1)


def test_doc_sessions_error_table_and_fields_hold_against_the_server(server):
    text = doc_text()
    tables = field_tables(text)
    plays = sessions(section(text, "## Examples"))
    table_codes = {first_code(row[0]): row[1] for row in table_rows(section(text, "## Error codes"))}
    requests = section(text, "## Requests (client → coordinator)")
    request_ops = {first_code(row[0]) for row in table_rows(requests)}
    assert plays and tables and table_codes and request_ops, "the doc lost its examples or tables"

    # What the examples must cover: every request op, and every error code a client can cause.
    sent_ops = {m["op"] for play in plays for kind, m in play if kind == "send"}
    shown_codes = {m["code"] for play in plays for kind, m in play if kind == "recv" and m["op"] == "error"}
    assert request_ops <= sent_ops, f"requests without an example: {request_ops - sent_ops}"
    not_by_client = {c for c, meaning in table_codes.items() if "not caused by a client" in meaning}
    assert shown_codes <= set(table_codes), \
        f"codes in examples but not in the table: {shown_codes - set(table_codes)}"
    assert set(table_codes) - not_by_client == shown_codes, \
        f"codes in the table without an example: {set(table_codes) - not_by_client - shown_codes}"

    proc, log_path = server
    address = endpoint(proc, log_path)
    ctx = zmq.Context()
    try:
        probe = Raw(ctx, address)
        health = wait_settled(probe, tables)
        check_health(health, tables)
        # Limits: those the example config sets, and the doc's defaults for the others.
        limits = {k: int(v) for k, v in re.findall(r"^(max_\w+) = (\d+)", section(text, "## Examples"), re.M)}
        defaults = {re.search(r"`(\w+)`", row[0]).group(1): int(row[1])
                    for row in table_rows(section(text, "## Limits"))}
        assert set(health["limits"]) <= set(defaults), "a limit reported but not documented"
        assert health["limits"] == {k: limits.get(k, defaults[k]) for k in health["limits"]}, health["limits"]
        failed = health["pools"]["broken"]
        assert "model '/nonexistent/model' not found" in failed["reason"]
        probe.close()
        for number, play in enumerate(plays, 1):
            run_session(ctx, address, play, tables, f"session {number}")
        assert proc.wait(WAIT) == 0, "the last session stops the server, which exits 0"
    finally:
        ctx.destroy(linger=0)


def run_session(ctx, address: str, play: list, tables: dict, name: str) -> None:
    raw = Raw(ctx, address)
    asked: dict = {}  # id -> op of the request, to check status/health data against the field tables
    try:
        for kind, msg in play:
            if kind == "send":
                raw.send(msg)
                asked[msg.get("id")] = msg.get("op")
                continue
            got = raw.next_for(msg["id"])
            assert matches(msg, got), f"{name}: expected {msg}\n got {got}"
            if got["op"] == "ok" and asked.get(got["id"]) == "status":
                check_status(got["data"], tables)
            elif got["op"] == "ok" and asked.get(got["id"]) == "health":
                check_health(got["data"], tables)
    finally:
        raw.close()


def test_notation_parser_reads_the_doc_forms():
    assert to_python('{"a": nil, "b": true, "c": "nil true", "d": ..., 1: <str 3>, "e": <ext>}') == \
        {"a": None, "b": True, "c": "nil true", "d": Ellipsis, 1: "xxx", "e": EXT}
    assert matches({"a": ..., "b": [1]}, {"a": {"x": 1}, "b": [1]})
    assert not matches({"a": 1}, {"a": True}) and not matches({"a": 1}, {"a": 1, "b": 2})
