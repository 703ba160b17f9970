"""Security: bind refusal, CURVE authentication, limits, and no code from the wire.

Real `orchestrator serve` processes and real sockets throughout. "Gets nothing" checks wait a fixed
window for a reply that must not come; everything else polls with generous timeouts because the test
machine is shared and loaded.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import msgpack
import psutil
import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from orchestrator import Client, RequestError, wait_ready
from orchestrator.security.bind import is_local
from protocol.messages import CLIENT_REQUESTS
from tests.conftest import REPO, Server, poll_until

NOTHING_WINDOW = 5.0  # seconds a refused client waits for the reply that must not come
TIMEOUT = 120.0  # seconds for anything that must happen (the machine is shared and loaded)


def cli(*args, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env)


class Raw:
    """A bare DEALER that sends any bytes and reads replies as plain maps (no Client validation)."""

    def __init__(self, address: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, body) -> None:
        self.sock.send(body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True))

    def recv(self, timeout: float) -> dict | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return msgpack.unpackb(self.sock.recv_multipart()[-1], raw=False)

    def ask(self, body, timeout: float = TIMEOUT) -> dict:
        self.send(body)
        reply = self.recv(timeout)
        assert reply is not None, f"no reply within {timeout} s"
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def raw():
    socks = []

    def connect(address: str) -> Raw:
        socks.append(Raw(address))
        return socks[-1]

    yield connect
    for s in socks:
        s.close()


def ready(server: Server, address: str, curve: dict | None = None) -> None:
    """wait_ready, but a failure shows the server's state and log."""
    try:
        wait_ready(address, timeout=TIMEOUT, curve=curve)
    except TimeoutError as e:
        raise AssertionError(f"{e}; serve exit code {server.proc.poll()}; log:\n{server.log()[-4000:]}")


def submit(rid, pool="echo", **fields) -> dict:
    return {"v": 1, "op": "submit", "id": rid, "pool": pool, **fields}


# ---------------------------------------------------------------------------- bind refusal


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:0", "tcp://*:0", "tcp://eth0:0"])
def test_public_bind_without_keys_is_refused(address):
    r = cli("serve", "--address", address, "--handler", "echo", "--devices", "cpu:1")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"refusing to bind {address}" in r.stderr
    assert "--insecure" in r.stderr and "--curve-secret-key" in r.stderr
    assert "endpoint:" not in r.stdout  # nothing was bound


def test_is_local():
    assert all(map(is_local, ["tcp://127.0.0.1:0", "tcp://127.8.9.1:5", "tcp://[::1]:0",
                              "tcp://localhost:7", "ipc:///tmp/x.sock", "inproc://x"]))
    assert not any(map(is_local, ["tcp://0.0.0.0:0", "tcp://*:0", "tcp://[::]:0",
                                  "tcp://10.0.0.1:5", "tcp://example.com:5", "udp://127.0.0.1:5"]))


def test_insecure_public_bind_serves_with_loud_warning(serve):
    s = serve(["--address", "tcp://0.0.0.0:0", "--insecure", "--handler", "echo",
               "--devices", "cpu:1"], ready=False, timeout=TIMEOUT)
    assert s.address.startswith("tcp://0.0.0.0:")
    address = s.address.replace("0.0.0.0", "127.0.0.1")
    ready(s, address)
    log = s.log()
    assert "!" * 78 in log and "WITHOUT authentication (--insecure)" in log
    with Client(address) as c:
        assert c.run("echo", {"x": 1}, timeout=TIMEOUT) == {"x": 1}


@pytest.mark.parametrize("args, says", [
    (["--authorized-keys", "."], "--authorized-keys needs --curve-secret-key"),
    (["--curve-secret-key", "/nonexistent.key_secret", "--authorized-keys", "."], "--curve-secret-key"),
    (["--max-bin-len", "0"], "limits.max_bin_len must be a positive integer"),
    (["--max-pending-per-client", "-1"], "max_pending_per_client must be a positive integer"),
])
def test_unsafe_or_bad_config_exits_2(args, says):
    r = cli("serve", "--address", "tcp://127.0.0.1:0", "--handler", "echo", "--devices", "cpu:1", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert says in r.stderr


# ---------------------------------------------------------------------------- CURVE


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    pairs, intruders, authorized = root / "pairs", root / "intruders", root / "authorized"
    assert cli("keygen", str(pairs)).returncode == 0
    assert cli("keygen", str(intruders), "--names", "intruder").returncode == 0
    authorized.mkdir()  # zmq.auth trusts every *.key here: only the authorised client's public key
    shutil.copy(pairs / "client.key", authorized)
    return SimpleNamespace(root=root, pairs=pairs, intruders=intruders, authorized=authorized,
                           good={"server_public_key": str(pairs / "server.key"),
                                 "secret_key": str(pairs / "client.key_secret")},
                           intruder={"server_public_key": str(pairs / "server.key"),
                                     "secret_key": str(intruders / "intruder.key_secret")})


@pytest.fixture(scope="module")
def curve_server(keys):
    s = Server(keys.root, ["--handler", "echo", "--devices", "cpu:1",
                           "--curve-secret-key", str(keys.pairs / "server.key_secret"),
                           "--authorized-keys", str(keys.authorized)])
    s.start(ready=False, timeout=TIMEOUT)  # wait_ready needs keys too
    ready(s, s.address, keys.good)
    yield s
    s.close()


def test_keygen_writes_pairs_and_never_overwrites(keys):
    public, secret = keys.pairs / "client.key", keys.pairs / "client.key_secret"
    assert "secret-key" not in public.read_text()
    assert zmq.auth.load_certificate(str(secret))[1] is not None
    assert secret.stat().st_mode & 0o777 == 0o600
    before = secret.read_bytes()
    r = cli("keygen", str(keys.pairs))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert secret.read_bytes() == before


def assert_still_serving(server: Server, curve: dict) -> None:
    with Client(server.address, curve=curve, timeout=TIMEOUT) as c:
        assert c.run("echo", "still here", timeout=TIMEOUT) == "still here"


def test_curve_authorised_client_runs_jobs(curve_server, keys):
    with Client(curve_server.address, curve=keys.good, timeout=TIMEOUT) as c:
        jobs = [c.submit("echo", {"n": i}) for i in range(20)]
        assert [j.result(TIMEOUT) for j in jobs] == [{"n": i} for i in range(20)]
    r = cli("submit", "echo", '{"via": "cli"}', "--address", curve_server.address, "--timeout", "60",
            "--curve-server-key", keys.good["server_public_key"],
            "--curve-secret-key", keys.good["secret_key"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '{"via": "cli"}'


def test_curve_unknown_key_gets_nothing_and_is_logged(curve_server, keys):
    with Client(curve_server.address, curve=keys.intruder, timeout=NOTHING_WINDOW) as c:
        job = c.submit("echo", "let me in")
        with pytest.raises(TimeoutError):
            job.result(NOTHING_WINDOW)
    intruder_key = zmq.auth.load_certificate(str(keys.intruders / "intruder.key"))[0].decode()
    poll_until(lambda: intruder_key in curve_server.log(), TIMEOUT, what="the refusal in the log")
    line = next(x for x in curve_server.log().splitlines() if intruder_key in x)
    assert "WARNING" in line and "refused client connection: DENIED (CURVE)" in line
    assert_still_serving(curve_server, keys.good)


def test_curve_client_without_keys_gets_nothing_and_is_logged(curve_server, keys, raw):
    start = len(curve_server.log())
    sock = raw(curve_server.address)
    sock.send(submit(1, input="no keys"))
    assert sock.recv(NOTHING_WINDOW) is None
    # Whichever side notices the mechanism mismatch first decides the words: the server logs the
    # mismatch itself, or the client's reset ("Connection reset by peer", "Broken pipe").
    refusal = re.compile(r"WARNING .* refused client connection on tcp://127\.0\.0\.1:\d+: handshake failed")
    poll_until(lambda: refusal.search(curve_server.log()[start:]), TIMEOUT, what="the refusal in the log")
    assert_still_serving(curve_server, keys.good)


def test_curve_forged_public_key_gets_nothing(curve_server, keys):
    """Claiming the authorised client's public key without its secret fails the CURVE handshake."""
    start = len(curve_server.log())
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey = zmq.auth.load_certificate(keys.good["server_public_key"])[0]
    sock.curve_publickey = zmq.auth.load_certificate(str(keys.authorized / "client.key"))[0]
    sock.curve_secretkey = zmq.auth.load_certificate(keys.intruder["secret_key"])[1]
    try:
        sock.connect(curve_server.address)
        sock.send(msgpack.packb(submit(1, input="forged")))
        assert not sock.poll(int(NOTHING_WINDOW * 1000))
    finally:
        sock.close(linger=0)
        ctx.term()
    poll_until(lambda: "zmtp_cryptographic" in curve_server.log()[start:], TIMEOUT, what="the refusal")
    assert_still_serving(curve_server, keys.good)


def test_client_rejects_bad_key_files_up_front(keys):
    with pytest.raises(ValueError, match="missing"):
        Client("tcp://127.0.0.1:1", curve={"server_public_key": keys.good["server_public_key"]})
    with pytest.raises(ValueError, match="no secret key"):  # a public key where the pair belongs
        Client("tcp://127.0.0.1:1", curve={**keys.good, "secret_key": keys.good["server_public_key"]})
    r = cli("status", "--address", "tcp://127.0.0.1:1", "--curve-server-key", "/nonexistent.key",
            "--curve-secret-key", keys.good["secret_key"])
    assert r.returncode == 2 and "cannot load CURVE key" in r.stderr


# ---------------------------------------------------------------------------- limits

LIMITS_TOML = """
[server]
max_pending_per_client = 3
drain_timeout = 2.0

[limits]
max_message_bytes = 100000
max_str_len = 20000
max_bin_len = 50000
max_array_len = 1000
max_map_len = 100

[pools.echo]
handler = "echo"
devices = "cpu:1"

[pools.sleep]
handler = "sleep"
devices = "cpu:1"
"""
MAX_MESSAGE = 100_000
HARD_CAP = 2 * MAX_MESSAGE + 1024  # the coordinator's ZMQ MAXMSGSIZE


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    (root / "server.toml").write_text(LIMITS_TOML)
    s = Server(root, ["--config", str(root / "server.toml")]).start(timeout=TIMEOUT)
    yield s
    s.close()


def padded_submit(rid, size: int) -> bytes:
    """A valid echo submit of exactly `size` bytes: its input is a list of bins under max_bin_len."""
    parts = []
    while len(msgpack.packb(submit(rid, input=parts + [b""]))) + 40_008 < size:
        parts.append(b"x" * 40_000)
    gap = size - len(msgpack.packb(submit(rid, input=parts + [b""])))
    for n in range(max(0, gap - 4), gap + 1):  # the last bin's header grows with its length
        body = msgpack.packb(submit(rid, input=parts + [b"x" * n]))
        if len(body) == size:
            return body
    raise AssertionError(f"cannot pad a submit to {size} bytes")


@pytest.mark.parametrize("field, value, limit", [
    ("input", b"x" * 50_001, "max_bin_len"),
    ("input", "y" * 20_001, "max_str_len"),
    ("input", list(range(1001)), "max_array_len"),
    ("input", {str(i): i for i in range(101)}, "max_map_len"),
    ("pool", "p" * 20_001, "max_str_len"),
], ids=["bin", "str", "array", "map", "pool"])
def test_configured_caps_answer_too_large(limited, raw, field, value, limit):
    sock = raw(limited.address)
    reply = sock.ask({**submit(7), field: value})
    assert reply["op"] == "error" and reply["code"] == "too_large", reply
    assert limit in reply["message"]
    # One under each cap is accepted and echoed intact.
    ok = {bytes: b"x" * 50_000, str: "y" * 20_000, list: list(range(1000)),
          dict: {str(i): i for i in range(100)}}[type(value)]
    reply = sock.ask({**submit(8, input=ok), **({"pool": "z" * 20_000} if field == "pool" else {})})
    if field == "pool":
        assert reply["code"] == "unknown_pool", reply
    else:
        assert (reply["op"], reply["id"], reply["output"]) == ("result", 8, ok), reply


def test_message_over_max_message_bytes_is_too_large(limited, raw):
    sock = raw(limited.address)
    for size in (MAX_MESSAGE + 1, HARD_CAP - 100):
        reply = sock.ask(padded_submit(3, size))
        assert reply["code"] == "too_large" and "max_message_bytes=100000" in reply["message"]
    # Exactly at the limit it runs, though its result is a few bytes larger than the limit: worker
    # replies are not held to the client limits, so the coordinator must not apply them to results.
    body = padded_submit(4, MAX_MESSAGE)
    reply = sock.ask(body)
    assert reply["op"] == "result" and reply["id"] == 4, reply
    assert reply["output"] == msgpack.unpackb(body)["input"]


def test_message_over_hard_cap_is_dropped_logged_and_serving_goes_on(limited, raw):
    big = raw(limited.address)
    assert big.ask({"v": 1, "op": "ping", "id": 1})["op"] == "ok"  # connected
    start = len(limited.log())
    monitor = big.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        big.send(b"\x00" * (HARD_CAP + 1))
        assert big.recv(NOTHING_WINDOW) is None  # nobody can answer it...
        assert monitor.poll(int(TIMEOUT * 1000)), "the server did not cut the connection"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED  # ...it was cut
    finally:
        big.sock.disable_monitor()
        monitor.close(linger=0)
    # One line per closed connection, or (when many close at once) the count of suppressed ones.
    poll_until(lambda: f"over the {HARD_CAP}-byte hard cap" in limited.log()[start:], TIMEOUT,
               what="the dropped connection in the log")
    assert limited.proc.poll() is None
    with Client(limited.address, timeout=TIMEOUT) as c:
        assert c.run("echo", "after", timeout=TIMEOUT) == "after"


def test_per_client_pending_cap_answers_overloaded(limited):
    a, b = limited.client(timeout=TIMEOUT), limited.client(timeout=TIMEOUT)
    held = [a.submit("sleep", {"ms": 600_000}) for _ in range(3)]  # max_pending_per_client = 3
    with pytest.raises(RequestError) as e:
        a.run("echo", "one too many", timeout=TIMEOUT)
    assert e.value.code == "overloaded" and "max_pending_per_client=3" in e.value.message
    assert b.run("echo", "other client", timeout=TIMEOUT) == "other client"  # the cap is per client
    held[0].cancel()
    poll_until(held[0].done, TIMEOUT, what="the cancelled job's reply")
    assert a.run("echo", "room again", timeout=TIMEOUT) == "room again"
    for job in held[1:]:
        job.cancel()


def test_total_queue_cap_and_limit_flags(serve, raw):
    s = serve(["--handler", "sleep", "--devices", "cpu:1", "--max-queued", "2",
               "--max-array-len", "10", "--drain-timeout", "2"], timeout=TIMEOUT)
    c = s.client(timeout=TIMEOUT)
    # The worker's 2 credits take 2 jobs; 2 more queue in the coordinator; the 5th is refused.
    held = [c.submit("sleep", {"ms": 600_000}) for _ in range(4)]
    with pytest.raises(RequestError) as e:
        c.run("sleep", {"ms": 1}, timeout=TIMEOUT)
    assert e.value.code == "overloaded" and "max_queued_total=2" in e.value.message
    for job in held:
        job.cancel()
    for job in held:
        with pytest.raises(RequestError) as e:
            job.result(TIMEOUT)
        assert e.value.code == "cancelled"
    assert c.run("sleep", {"ms": 1}, timeout=TIMEOUT)["slept_ms"] == 1
    reply = raw(s.address).ask(submit(1, pool="sleep", input=list(range(11))))
    assert reply["code"] == "too_large" and "max_array_len" in reply["message"]


def test_finished_jobs_do_not_pin_memory(serve):
    """A finished job with a far deadline stays in the timeout heap until then: not its payload,
    and the heap is compacted, so 120 jobs of 1 MB leave no input behind."""
    s = serve(["--handler", "echo", "--devices", "cpu:1"], timeout=TIMEOUT)
    c = s.client(timeout=TIMEOUT)
    assert c.run("echo", b"warm" * 250_000, timeout=1e9) == b"warm" * 250_000
    before = psutil.Process(s.proc.pid).memory_info().rss
    for i in range(120):
        payload = bytes([i]) * 1_000_000
        assert c.run("echo", payload, timeout=1e9) == payload
    grown = psutil.Process(s.proc.pid).memory_info().rss - before
    assert grown < 50 * 2**20, f"coordinator RSS grew {grown / 2**20:.0f} MiB"


def test_toml_rejects_unknown_limit(tmp_path):
    (tmp_path / "bad.toml").write_text("[limits]\nmax_everything = 5\n")
    r = cli("serve", "--config", str(tmp_path / "bad.toml"), "--handler", "echo", "--devices", "cpu:1")
    assert r.returncode == 2 and "max_everything" in r.stderr


# ---------------------------------------------------------------------------- no code from the wire


@pytest.mark.parametrize("field", ["handler", "module", "model", "config", "code"])
def test_submit_cannot_name_code(limited, raw, field):
    sock = raw(limited.address)
    reply = sock.ask(submit("job-1", input="x", **{field: "os:system"}))
    assert reply == {"v": 1, "op": "error", "id": "job-1", "code": "bad_request",
                     "message": f"submit: unknown field(s) ['{field}']"}


def test_pool_name_is_never_resolved_as_code(limited, raw):
    sock = raw(limited.address)
    for pool in ("os:system", "worker.handlers.basic:Crash", "echo:Echo"):
        reply = sock.ask(submit(1, pool=pool, input="x"))
        assert reply["code"] == "unknown_pool", reply
    assert limited.proc.poll() is None


CODE_WORDS = {"handler", "module", "model", "path", "code", "class", "callable", "func", "function",
              "import", "script", "cmd", "command", "eval", "exec", "pickle", "config", "env"}


def test_no_client_request_has_a_field_that_names_code():
    for cls in CLIENT_REQUESTS:
        fields = {name for name, *_ in cls._FIELDS}
        assert not fields & CODE_WORDS, (cls.OP, fields & CODE_WORDS)


BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "cloudpickle",
                  "joblib", "jsonpickle"}
BANNED_BUILTINS = {"eval", "exec", "compile", "__import__"}
# torch.distributed's object collectives pickle their payload (all_gather_object, broadcast_object_list,
# gather_object, scatter_object_list, send_object_list, recv_object_list...): any call whose name ends so.
OBJECT_COLLECTIVE = re.compile(r"_object(_list)?$")
# Dynamic imports are allowed only where the name comes from the server's own config.
DYNAMIC_IMPORT_OK = {"worker/handlers/__init__.py"}


def violations(source: str, where: str) -> list[str]:
    """Pickle-family imports, eval/exec/compile/__import__ calls, unpickling loaders, object
    collectives (they pickle), trust_remote_code=True, and dynamic imports outside DYNAMIC_IMPORT_OK."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(f"{line}: from {node.module} import")
        elif isinstance(node, ast.Call):
            found += [f"{line}: {v}" for v in _call_violations(node, where)]
    return found


def _call_violations(node: ast.Call, where: str) -> list[str]:
    func, out = node.func, []
    kw = {k.arg: k.value for k in node.keywords}
    if isinstance(func, ast.Name) and func.id in BANNED_BUILTINS:
        out.append(f"{func.id}()")
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        owner, name = func.value.id, func.attr
        if (owner, name) == ("torch", "load") and not _is_true(kw.get("weights_only")):
            out.append("torch.load without weights_only=True")
        if owner in ("np", "numpy") and name == "load" and _is_true(kw.get("allow_pickle")):
            out.append("numpy.load(allow_pickle=True)")
        if (owner, name) == ("importlib", "import_module") and where not in DYNAMIC_IMPORT_OK:
            out.append("importlib.import_module")
    if isinstance(func, ast.Name) and func.id == "import_module" and where not in DYNAMIC_IMPORT_OK:
        out.append("import_module")
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if OBJECT_COLLECTIVE.search(name):
        out.append(f"{name}() (an object collective: it pickles)")
    if _is_true(kw.get("trust_remote_code")):
        out.append("trust_remote_code=True")
    return out


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_scanner_catches_what_it_claims_to():
    planted = ("import pickle\nfrom dill import loads\nimport marshal as m\neval('1')\nexec('x=1')\n"
               "torch.load(f)\nnp.load(f, allow_pickle=True)\n__import__('os')\n"
               "importlib.import_module(name)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
               "dist.broadcast_object_list(x, src=0)\ndist.all_gather_object(out, x)\n"
               "torch.distributed.gather_object(x)\nscatter_object_list(o, i)\ndist.send_object_list(x, 1)\n"
               "recv_object_list(x, 0)\n")
    assert len(violations(planted, "x.py")) == 16
    harmless = ("model.eval()\ntorch.load(f, weights_only=True)\nnp.load(f)\nx = 'pickle eval('\n"
                "dist.broadcast(t, src=0)\ndist.all_gather(ts, t)\nobject_list(x)\nobjects()\n")
    assert violations(harmless, "x.py") == []


def test_source_has_no_pickle_eval_or_dynamic_code():
    root = Path(REPO)
    files = [p for d in ("orchestrator", "worker", "protocol") for p in sorted((root / d).rglob("*.py"))]
    assert len(files) > 20
    found = [v for p in files for v in violations(p.read_text(), p.relative_to(root).as_posix())]
    assert found == []
