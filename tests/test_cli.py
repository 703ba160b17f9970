"""The `orchestrator` command: serve's flags over a config file, the client commands against a real server,
exit codes, --help; and config errors that fail fast."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orchestrator.cli import main as cli
from tests.conftest import REPO

WAIT = 120.0  # generous: the machine is shared and loaded; a correct run never waits this long


def orchestrator(*args, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def test_pool_flags_on_a_config_file_name_their_pool_or_fail(tmp_path):
    """Pool flags on top of a config file go to the pool --pool names (or the file's only pool); with
    several pools and no --pool, or a --pool the file lacks, serve refuses in one line (exit 2) rather than
    dropping the flag."""
    config = tmp_path / "two.toml"
    config.write_text('[pools.a]\nhandler = "echo"\ndevices = "cpu:1"\n'
                      '[pools.b]\nhandler = "echo"\ndevices = "cpu:1"\n')
    r = orchestrator("serve", "--config", str(config), "--replicas", "1", timeout=60)
    assert r.returncode == 2 and "--replicas would apply to one pool" in r.stderr and "a, b" in r.stderr, r.stderr
    r = orchestrator("serve", "--config", str(config), "--model", "/m", timeout=60)
    assert r.returncode == 2 and "--model would apply to one pool" in r.stderr, r.stderr
    r = orchestrator("serve", "--config", str(config), "--pool", "c", "--capacity", "2", timeout=60)
    assert r.returncode == 2 and "--pool 'c': the config file has no such pool" in r.stderr, r.stderr


def test_pool_flags_apply_to_the_named_file_pool():
    from orchestrator.cli.main import build_parser
    from orchestrator.config import PoolConfig, override_file_pool

    args = build_parser().parse_args(["serve", "--pool", "b", "--capacity", "3", "--model", "/m"])
    pools = [PoolConfig(name="a", handler="echo"), PoolConfig(name="b", handler="echo", config={"x": 1})]
    override_file_pool(pools, args)
    assert (pools[0].capacity, pools[0].config) == (PoolConfig(name="a").capacity, {})
    assert (pools[1].capacity, pools[1].config) == (3, {"x": 1, "model": "/m"})


def test_cli_against_a_running_server(serve):
    srv = serve(["--devices", "cpu:2", "--handler", "echo"])
    at = ["--address", srv.address, "--timeout", "60"]

    r = orchestrator("submit", "echo", '{"a": [1, 2]}', *at)
    assert (r.returncode, json.loads(r.stdout)) == (0, {"a": [1, 2]}), r.stderr
    r = orchestrator("submit", "echo", "--text", "hi", "--stream", *at)
    assert r.returncode == 0 and [json.loads(x) for x in r.stdout.splitlines()] == [{"prompt": "hi"}] * 2
    r = orchestrator("submit", "nope", "1", *at)
    assert r.returncode == 1 and "unknown_pool" in r.stderr

    r = orchestrator("status", "--json", *at)
    assert r.returncode == 0
    assert [w["name"] for w in json.loads(r.stdout)["pools"]["echo"]["workers"]] == ["echo/0", "echo/1"]
    r = orchestrator("status", *at)
    assert r.returncode == 0 and "echo/0" in r.stdout and "echo/1" in r.stdout
    r = orchestrator("health", *at)
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "ready"

    r = orchestrator("scale", "echo", "1", *at)
    assert (r.returncode, json.loads(r.stdout)) == (0, {"pool": "echo", "replicas": 1})
    r = orchestrator("scale", "echo", "9", *at)
    assert r.returncode == 1 and "scale_error" in r.stderr
    r = orchestrator("scale", "nope", "1", *at)
    assert r.returncode == 1 and "unknown_pool" in r.stderr

    r = orchestrator("stop", *at)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "stopping"
    assert srv.proc.wait(WAIT) == 0


def test_cli_exit_3_when_nothing_answers(tmp_path):
    nowhere = f"ipc://{tmp_path}/nothing-listens.sock"
    for cmd in (["status"], ["submit", "echo", "1"], ["stop"]):
        r = orchestrator(*cmd, "--address", nowhere, "--timeout", "1")
        assert r.returncode == 3, (cmd, r.stdout, r.stderr)
        assert "no" in r.stderr.lower()


def test_cli_serve_rejects_impossible_placement_with_exit_2():
    r = orchestrator("serve", "--address", "tcp://127.0.0.1:0", "--devices", "0,1", "--tp", "3",
                     "--handler", "echo")
    assert r.returncode == 2
    assert "tp=3" in r.stderr and "got 2" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_help_for_every_command(capsys):
    r = orchestrator("--help")
    assert r.returncode == 0
    commands = ["serve", "submit", "status", "health", "scale", "stop", "keygen", "demo"]
    assert all(c in r.stdout for c in commands)
    for command in commands:
        with pytest.raises(SystemExit) as info:
            cli.build_parser().parse_args([command, "--help"])
        assert info.value.code == 0
        assert f"orchestrator {command}" in capsys.readouterr().out


def test_a_misspelt_log_format_or_level_is_a_config_error():
    from orchestrator.config import PoolConfig, ServerConfig, validate

    with pytest.raises(ValueError, match="log_format must be 'text' or 'json', got 'jsno'"):
        validate(ServerConfig(pools=[PoolConfig(name="a")], log_format="jsno"))
    with pytest.raises(ValueError, match="log_level must be one of"):
        validate(ServerConfig(pools=[PoolConfig(name="a")], log_level="loud"))
    validate(ServerConfig(pools=[PoolConfig(name="a")], log_format="json", log_level="debug"))
