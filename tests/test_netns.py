"""Real network partitions: the coordinator, each node and the clients in network namespaces of their own.

Topology (all created here, all deleted in ``finally``; no traffic leaves them):

    ns "hub": a bridge; ns "coord" 10.200.0.1, ns "n1..n3" 10.200.0.11-13, ns "cli" 10.200.0.100,
    each joined to the bridge by a veth pair. Processes run as ``ip netns exec NS python -m ...``.

While the client process produces at a steady rate (tests/harness/client.py, recording a History):
1. node 1 is cut off from everyone (its veth on the hub goes down) past the coordinator's session
   timeout: the coordinator declares it dead, producers to its partitions get clear, typed errors
   (delivery timeouts), and after the heal they succeed again;
2. node 2 is cut off from the coordinator alone (a "prohibit" route in its namespace) past the session
   timeout: the coordinator declares it dead; it comes back alive after the heal.
Then the client drains every partition and checks the history: nothing acknowledged is lost, nothing
duplicated or reordered. Needs root and iproute2 (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from nodes.cluster import REPO_ROOT, _die_with_parent
from tests.conftest import wait_for
from tests.harness import History

SUBNET = "10.200.0"
COORDINATOR_IP = f"{SUBNET}.1"
NODE_IPS = {1: f"{SUBNET}.11", 2: f"{SUBNET}.12", 3: f"{SUBNET}.13"}
CLIENT_IP = f"{SUBNET}.100"
SESSION_TIMEOUT_S = 3.0  # nodes/coordinator.py NODE_SESSION_TIMEOUT_MS
CUT_S = 5.0  # past the session timeout
DELIVERY_TIMEOUT_MS = 2_000


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class Namespaces:
    """The namespaces of one test, named with a unique prefix; ``delete()`` removes every one of them."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:6]
        self.hub = self.name("hub")
        self.created: list[str] = []

    def name(self, role: str) -> str:
        return f"bus-{self.tag}-{role}"

    def port(self, role: str) -> str:  # the hub-side veth of a member (interface names <= 15 characters)
        return f"h{self.tag}{role}"[:15]

    def create(self, members: dict[str, str]) -> None:
        """``members``: role -> address; each gets a namespace joined to the hub's bridge."""
        _ip("netns", "add", self.hub)
        self.created.append(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for role, address in members.items():
            ns = self.name(role)
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", self.port(role), "netns", self.hub)
            _ip("-n", self.hub, "link", "set", self.port(role), "master", "br0")
            _ip("-n", self.hub, "link", "set", self.port(role), "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def delete(self) -> None:
        for ns in reversed(self.created):
            _ip("netns", "del", ns, check=False)
        self.created.clear()


@pytest.fixture
def namespaces():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.fail("`ip` (iproute2) is missing: install it (apt-get install -y iproute2; .ci/run does)")
    spaces = Namespaces()
    try:
        yield spaces
    finally:
        spaces.delete()


class Processes:
    """Children started in namespaces; ``stop()`` ends them all (SIGCONT + SIGTERM, then SIGKILL)."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, ns: str, *argv: str, stdout=None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        log = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *argv], env=env, cwd=REPO_ROOT,
                                stdout=stdout or log, stderr=log, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)
        log.close()
        self.procs[name] = proc
        return proc

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _alive(namespaces, node_id: int):
    """The coordinator's verdict on node ``node_id``, asked from the client namespace (None: no answer)."""
    out = subprocess.run(["ip", "netns", "exec", namespaces.name("cli"), sys.executable, "-m",
                          "tests.harness.client", "metadata", "--bootstrap", f"tcp://{COORDINATOR_IP}:7400"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=30,
                         env={**os.environ, "PYTHONPATH": REPO_ROOT})
    try:
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return nodes.get(str(node_id), {}).get("alive")


def test_partitioned_node_loses_nothing_and_producers_get_clear_errors(namespaces, tmp_path):
    roles = {"coord": COORDINATOR_IP, **{f"n{n}": ip for n, ip in NODE_IPS.items()}, "cli": CLIENT_IP}
    namespaces.create(roles)
    procs = Processes(str(tmp_path))
    try:
        bootstrap = f"tcp://{COORDINATOR_IP}:7400"
        procs.start("coordinator", namespaces.name("coord"), "-m", "nodes.coordinator",
                    "--data-dir", str(tmp_path / "coordinator"), "--bind", bootstrap)
        for node_id, address in NODE_IPS.items():
            procs.start(f"node-{node_id}", namespaces.name(f"n{node_id}"), "-m", "nodes.node",
                        "--node-id", str(node_id), "--data-dir", str(tmp_path / f"node-{node_id}"),
                        "--bind", f"tcp://{address}:7500", "--coordinator", bootstrap)
        wait_for(lambda: all(_alive(namespaces, n) for n in NODE_IPS), 30, 0.2, "every node alive")

        # ~24 s of steady producing: long enough for both cuts and their recoveries.
        history_path, result_path = tmp_path / "history.jsonl", tmp_path / "result.json"
        client = procs.start("client", namespaces.name("cli"), "-m", "tests.harness.client", "run",
                             "--bootstrap", bootstrap, "--create-topic", "--partitions", "6", "--replication-factor", "1",
                             "--records", "36000", "--rate", "1500",
                             "--delivery-timeout-ms", str(DELIVERY_TIMEOUT_MS), "--request-timeout-ms", "500",
                             "--history", str(history_path), "--result", str(result_path),
                             stdout=subprocess.PIPE)
        started = json.loads(client.stdout.readline())
        owners = {int(p): n for p, n in started["owners"].items()}
        time.sleep(2.0)

        # 1. Node 1 cut off from everyone, past its session timeout.
        cut_ms = time.monotonic_ns() // 1_000_000
        _ip("-n", namespaces.hub, "link", "set", namespaces.port("n1"), "down")
        wait_for(lambda: _alive(namespaces, 1) is False, SESSION_TIMEOUT_S + 10, 0.2, "node 1 declared dead")
        time.sleep(max(0.0, CUT_S - (time.monotonic_ns() // 1_000_000 - cut_ms) / 1000))
        heal_ms = time.monotonic_ns() // 1_000_000
        _ip("-n", namespaces.hub, "link", "set", namespaces.port("n1"), "up")
        wait_for(lambda: _alive(namespaces, 1), 30, 0.2, "node 1 alive again")
        back_ms = time.monotonic_ns() // 1_000_000
        time.sleep(1.0)

        # 2. Node 2 cut off from the coordinator alone, past its session timeout.
        _ip("-n", namespaces.name("n2"), "route", "add", "prohibit", f"{COORDINATOR_IP}/32")
        wait_for(lambda: _alive(namespaces, 2) is False, SESSION_TIMEOUT_S + 10, 0.2, "node 2 declared dead")
        time.sleep(2.0)
        _ip("-n", namespaces.name("n2"), "route", "del", "prohibit", f"{COORDINATOR_IP}/32")
        wait_for(lambda: _alive(namespaces, 2), 30, 0.2, "node 2 alive again")

        assert client.wait(120) == 0, (tmp_path / "client.log").read_text()[-3000:]
        result = json.loads(result_path.read_text())
    finally:
        procs.stop()

    print(result["table"], result["outcomes"])
    assert not result["errors"]
    assert result["ok"], result["table"]  # nothing acknowledged lost, duplicated, reordered
    assert result["drained"] >= result["outcomes"]["ok"]

    history = History.load(history_path)
    invoked = {e.op_id: e for e in history.events() if e.f == "send" and e.type == "invoke"}
    done = [(invoked[e.op_id], e) for e in history.events() if e.f == "send" and e.type != "invoke"]
    node1 = {p for p, n in owners.items() if n == 1}
    assert node1 and set(owners.values()) == {1, 2, 3}
    # Sends to node 1 begun while it was cut off, whose delivery timeout ran out before the heal: each
    # failed with a clear, typed error (never hung, never acknowledged).
    during = [(i, c) for i, c in done
              if i.partition in node1 and cut_ms + 200 <= i.time_ms <= heal_ms - DELIVERY_TIMEOUT_MS - 500]
    assert len(during) > 100
    assert all(c.type in ("fail", "unknown") and c.extra.get("error") == "TIMEOUT" for _, c in during), \
        [c for _, c in during if c.type == "ok" or c.extra.get("error") != "TIMEOUT"][:3]
    # And once it was back, they succeed.
    after = [(i, c) for i, c in done if i.partition in node1 and i.time_ms >= back_ms + 1_000]
    assert len(after) > 100
    assert all(c.type == "ok" for _, c in after), [c for _, c in after if c.type != "ok"][:3]
