"""The layout's rules (docs/architecture.md), held by the suite: which package may import what.

- ``store/`` imports nothing from ``nodes/``, the client or the bench: only the formats.
- The formats (``bus.wire``, ``bus.batch``, ``bus.kafka_batch``, ``bus.errors``, ``bus.records``, ``bus.clock``) import no other
  module of the bus, and importing them loads neither ZeroMQ nor the client.
- The servers (``nodes.node``, ``nodes.coordinator``) load no client module.
- Nothing outside ``tests/`` imports the sabotaged builds, and the bus's packages import nothing of ``tests/``.
- ``bus/`` imports nothing of ``nodes/`` or ``store/`` when it is imported (``bus up`` loads them on use).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from nodes.cluster import REPO_ROOT

FORMATS = {"bus.wire", "bus.batch", "bus.kafka_batch", "bus.errors", "bus.records", "bus.clock"}
CLIENT = {"bus.aio", "bus.fork_guard", "bus.producer", "bus.consumer", "bus.admin", "bus.sender", "bus.fetcher", "bus.group_member",
          "bus.background", "bus.cli"}
PACKAGES = ("bus", "nodes", "store", "bench")
SABOTAGE = "tests.harness.sabotage"


def _modules(top: str) -> list[str]:
    """Every module under ``top`` (a directory of the repository), as dotted names."""
    out = []
    for root, _, files in os.walk(os.path.join(REPO_ROOT, top)):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), REPO_ROOT)[:-3].replace(os.sep, ".")
                out.append(rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)
    return sorted(out)


def _imports(module: str, top_level_only: bool = False) -> set[str]:
    """The modules ``module`` imports anywhere in its body (or only at its top level), resolved to
    absolute dotted names; ``from X import name`` counts as X and as X.name."""
    path = os.path.join(REPO_ROOT, *module.split("."))
    is_package = os.path.isdir(path)
    path = os.path.join(path, "__init__.py") if is_package else path + ".py"
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return found


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _broken(modules, rule) -> list[str]:
    return [f"{m} imports {i}" for m in modules for i in sorted(_imports(m)) if rule(i)]


def test_the_store_imports_only_the_formats():
    def forbidden(name):
        if _within(name, ("nodes", "bench", "tests")):
            return True
        return _within(name, ("bus",)) and name != "bus" and not _within(name, FORMATS)

    assert _broken(_modules("store"), forbidden) == []


def test_the_formats_are_a_leaf():
    assert _broken(sorted(FORMATS), lambda name: _within(name, ("bus", "nodes", "store", "bench", "tests", "zmq"))
                   and not _within(name, FORMATS)) == []


def test_nothing_outside_tests_imports_the_sabotaged_builds():
    outside = [m for top in (*PACKAGES, "scripts") for m in _modules(top)]
    assert _broken(outside, lambda name: _within(name, (SABOTAGE,))) == []
    packaged = [m for top in PACKAGES for m in _modules(top)]
    assert _broken(packaged, lambda name: _within(name, ("tests",))) == []


def test_the_client_package_loads_no_server_code_when_imported():
    loaded = [f"{m} imports {i}" for m in _modules("bus") for i in sorted(_imports(m, top_level_only=True))
              if _within(i, ("nodes", "store", "bench"))]
    assert loaded == []


def _loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``statement``."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return set(out.split())


def test_importing_the_formats_loads_neither_zmq_nor_the_client():
    loaded = _loaded_after("import " + ", ".join(sorted(FORMATS)))
    assert FORMATS <= loaded
    assert not any(_within(m, ("zmq",)) for m in loaded), sorted(m for m in loaded if "zmq" in m)
    assert not loaded & CLIENT


@pytest.mark.parametrize("server", ["nodes.node", "nodes.coordinator"])
def test_the_servers_load_no_client_module(server):
    loaded = _loaded_after(f"import {server}")
    assert server in loaded
    assert not loaded & CLIENT, sorted(loaded & CLIENT)


def test_the_rules_see_imports():
    """The checks above must be able to fail: the walker finds imports of every form."""
    assert {"bus.batch", "bus.clock", "bus.clock.now_ms", "bus.errors"} <= _imports("store.log_store")
    assert "nodes.server.RouterServer" in _imports("nodes.node")  # a relative import, resolved
    assert SABOTAGE in _imports("tests.harness.runner")  # from .sabotage import cluster_options
    assert "nodes.cluster" in _imports("bus.cli") and "nodes.cluster" not in _imports("bus.cli", top_level_only=True)
