"""The package layout keeps its plan: rooms of a handful of files, imports only downward, no circles, and a
client side that imports nothing from the server side (read from the source with `ast`, and checked on a
real import in a fresh interpreter)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("orchestrator", "worker", "protocol")
SERVER_ROOMS = ("core", "fleet", "launch", "observe", "security", "http", "cli")
# orchestrator's rooms and top-level modules, top first: each imports only what is below it (and itself).
# `python -m orchestrator` (__main__) is the entry point, above all of them.
LAYERS = ["__main__", "cli", "core", "http", "fleet", "launch", "config", "observe", "security", "logs", "states",
          "client"]
MAX_FILES = 10


def modules() -> dict:
    """Module name -> source path for every module of the three packages."""
    out = {}
    for package in PACKAGES:
        for path in Path(REPO, package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: dict, top_level: bool) -> set:
    """What `name` imports from the three packages: at module level only, or anywhere in it."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else ast.walk(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def room(name: str) -> str:
    """orchestrator.core.dispatch -> "core"; orchestrator.config -> "config"; worker.x -> "worker"."""
    parts = name.split(".")
    return parts[1] if parts[0] == "orchestrator" and len(parts) > 1 else parts[0]


def test_client_and_protocol_never_import_the_server_and_worker_never_imports_orchestrator():
    known = modules()
    wrong = []
    for name, path in known.items():
        for target in imports(name, path, known, top_level=False):
            if name.startswith(("orchestrator.client", "protocol")) and room(target) in SERVER_ROOMS:
                wrong.append(f"{name} imports {target}")
            if name.startswith("protocol") and target.startswith(("orchestrator", "worker")):
                wrong.append(f"{name} imports {target}")
            if name.startswith("worker") and target.startswith("orchestrator"):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_orchestrator_rooms_import_only_downward():
    known = modules()
    wrong = []
    for name, path in known.items():
        if not name.startswith("orchestrator.") or room(name) not in LAYERS:
            continue
        for target in imports(name, path, known, top_level=False):
            if target == "orchestrator" or room(target) not in LAYERS:
                continue
            if LAYERS.index(room(target)) < LAYERS.index(room(name)):
                wrong.append(f"{name} ({room(name)}) imports {target} ({room(target)})")
    assert not wrong, wrong


def test_no_import_cycles():
    """No circle among module-level imports (a lazy import inside a function is how a module may reach
    up on purpose; the test above still holds those to the layers)."""
    known = modules()
    graph = {name: imports(name, path, known, top_level=True) & known.keys() for name, path in known.items()}
    cycles = strongly_connected(graph)
    assert not cycles, cycles


def strongly_connected(graph: dict) -> list:
    """Tarjan's algorithm, iteratively: every component of more than one module."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_room_of_orchestrator_holds_more_than_ten_files():
    counts = defaultdict(int)
    for path in Path(REPO, "orchestrator").rglob("*.py"):
        counts[str(path.parent.relative_to(REPO))] += 1
    assert counts and max(counts.values()) <= MAX_FILES, dict(counts)


def test_importing_the_client_pulls_nothing_from_the_server_side():
    code = ("import json, sys, orchestrator, orchestrator.client\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       cwd=REPO, check=True).stdout)
    server = [m for m in loaded if m.startswith("orchestrator.") and room(m) in SERVER_ROOMS]
    assert "orchestrator.client.sync" in loaded and "orchestrator.client.keys" in loaded
    assert not server, server
    assert "torch" not in loaded and not any(m.startswith("worker") for m in loaded)
