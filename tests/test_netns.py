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
duplicated or reordered. That test runs with replication factor 1 on purpose: a node's partitions have
no other replica, so what a partition does to their producers shows unmasked.

The replicated test (replication factor 3, min_insync_replicas 2, acks="all") cuts a leader off from the
coordinator and from the other nodes ("prohibit" routes both ways), while the client still reaches it:
the cut-off leader keeps believing it leads, and takes produces, but acknowledges none (its high
watermark, which it still answers for itself, does not move); once the coordinator's session timeout has
elected other leaders, the client's sends succeed again on them, before the heal; after the heal the old
leader rejoins as a follower, and nothing acknowledged is lost.

Needs root and iproute2 (``.ci/run`` installs it).
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
from nodes.controller import NODE_SESSION_TIMEOUT_MS
from nodes.node import HEARTBEAT_INTERVAL_MS
from tests.conftest import wait_for
from tests.harness import History

SUBNET = "10.200.0"
COORDINATOR_IP = f"{SUBNET}.1"
NODE_IPS = {1: f"{SUBNET}.11", 2: f"{SUBNET}.12", 3: f"{SUBNET}.13"}
CLIENT_IP = f"{SUBNET}.100"
SESSION_TIMEOUT_S = NODE_SESSION_TIMEOUT_MS / 1000
HEARTBEAT_INTERVAL_S = HEARTBEAT_INTERVAL_MS / 1000
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


def _client(namespaces, *argv: str) -> dict | None:
    """``python -m tests.harness.client ARGV`` in the client namespace: its JSON answer (None: no answer)."""
    out = subprocess.run(["ip", "netns", "exec", namespaces.name("cli"), sys.executable, "-m",
                          "tests.harness.client", *argv],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=30,
                         env={**os.environ, "PYTHONPATH": REPO_ROOT})
    try:
        answer = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return None if "error" in answer else answer


def _alive(namespaces, node_id: int):
    """The coordinator's verdict on node ``node_id``, asked from the client namespace (None: no answer)."""
    nodes = _client(namespaces, "metadata", "--bootstrap", f"tcp://{COORDINATOR_IP}:7400")
    return None if nodes is None else nodes.get(str(node_id), {}).get("alive")


def _start_cluster(namespaces, procs, tmp_path) -> str:
    """The coordinator and nodes 1-3, each in its namespace, all alive; returns the bootstrap address."""
    bootstrap = f"tcp://{COORDINATOR_IP}:7400"
    procs.start("coordinator", namespaces.name("coord"), "-m", "nodes.coordinator",
                "--data-dir", str(tmp_path / "coordinator"), "--bind", bootstrap)
    for node_id, address in NODE_IPS.items():
        procs.start(f"node-{node_id}", namespaces.name(f"n{node_id}"), "-m", "nodes.node",
                    "--node-id", str(node_id), "--data-dir", str(tmp_path / f"node-{node_id}"),
                    "--bind", f"tcp://{address}:7500", "--coordinator", bootstrap)
    wait_for(lambda: all(_alive(namespaces, n) for n in NODE_IPS), 30, 0.2, "every node alive")
    return bootstrap


def test_partitioned_node_loses_nothing_and_producers_get_clear_errors(namespaces, tmp_path):
    roles = {"coord": COORDINATOR_IP, **{f"n{n}": ip for n, ip in NODE_IPS.items()}, "cli": CLIENT_IP}
    namespaces.create(roles)
    procs = Processes(str(tmp_path))
    try:
        bootstrap = _start_cluster(namespaces, procs, tmp_path)

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


# -- replicated ----------------------------------------------------------------------------------

REPLICATED_CUT_S = 9.0  # the session timeout, an election, and a few seconds on the new leaders
REPLICATED_DELIVERY_TIMEOUT_MS = 20_000  # sends keep trying through the failover


def _cut_off(namespaces, node_id: int, delete: bool = False) -> None:
    """Prohibit routes between node ``node_id`` and the coordinator and every other node, both ways (the
    client's route stays): each side's packets to the other are refused where they start."""
    action = "del" if delete else "add"
    peers = {"coord": COORDINATOR_IP, **{f"n{n}": ip for n, ip in NODE_IPS.items() if n != node_id}}
    for role, ip in peers.items():
        _ip("-n", namespaces.name(f"n{node_id}"), "route", action, "prohibit", f"{ip}/32")
        _ip("-n", namespaces.name(role), "route", action, "prohibit", f"{NODE_IPS[node_id]}/32")


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def test_a_leader_cut_off_acknowledges_nothing_and_its_clients_fail_over(namespaces, tmp_path):
    roles = {"coord": COORDINATOR_IP, **{f"n{n}": ip for n, ip in NODE_IPS.items()}, "cli": CLIENT_IP}
    namespaces.create(roles)
    procs = Processes(str(tmp_path))
    victim, topic = 1, "netns"
    victim_address = f"tcp://{NODE_IPS[victim]}:7500"
    try:
        bootstrap = _start_cluster(namespaces, procs, tmp_path)
        history_path, result_path = tmp_path / "history.jsonl", tmp_path / "result.json"
        client = procs.start("client", namespaces.name("cli"), "-m", "tests.harness.client", "run",
                             "--bootstrap", bootstrap, "--create-topic", "--partitions", "6",
                             "--replication-factor", "3", "--records", "33000", "--rate", "1500",
                             "--delivery-timeout-ms", str(REPLICATED_DELIVERY_TIMEOUT_MS),
                             "--request-timeout-ms", "500", "--history", str(history_path),
                             "--result", str(result_path), stdout=subprocess.PIPE)
        started = json.loads(client.stdout.readline())
        owners = {int(p): n for p, n in started["owners"].items()}
        led = sorted(p for p, n in owners.items() if n == victim)
        assert led and set(owners.values()) == {1, 2, 3}
        parts = ",".join(map(str, led))
        hw_args = ("hw", "--address", victim_address, "--topic", topic, "--partitions", parts)
        time.sleep(2.0)  # steady producing first

        cut_ms = _now_ms()
        _cut_off(namespaces, victim)
        # In flight at the cut: a reply already sent, a follower's fetch already answered. Then it freezes.
        time.sleep(0.5)
        frozen = wait_for(lambda: _client(namespaces, *hw_args), 10, 0.2, "the cut-off leader's high watermarks")
        wait_for(lambda: _alive(namespaces, victim) is False, SESSION_TIMEOUT_S + 10, 0.2, "the leader declared dead")

        def new_leaders():
            described = _client(namespaces, "describe", "--bootstrap", bootstrap, "--topic", topic)
            return described is not None and all(described["partitions"][p]["leader"] not in (victim, -1)
                                                  for p in led)

        wait_for(new_leaders, 10, 0.1, "other leaders elected")
        elected_ms = _now_ms()
        # It still believes it leads: it answers for its partitions, with the high watermarks it had.
        during = [wait_for(lambda: _client(namespaces, *hw_args), 10, 0.2, "its high watermarks again")]
        time.sleep(max(0.0, REPLICATED_CUT_S - (_now_ms() - cut_ms) / 1000))
        during.append(wait_for(lambda: _client(namespaces, *hw_args), 10, 0.2, "its high watermarks at the end"))
        heal_ms = _now_ms()
        _cut_off(namespaces, victim, delete=True)
        wait_for(lambda: _alive(namespaces, victim), 30, 0.2, "the old leader alive again")

        def back_in_sync():
            described = _client(namespaces, "describe", "--bootstrap", bootstrap, "--topic", topic)
            return described is not None and all(sorted(p["isr"]) == [1, 2, 3] for p in described["partitions"])

        wait_for(back_in_sync, 30, 0.2, "the old leader back in every ISR")
        assert client.wait(120) == 0, (tmp_path / "client.log").read_text()[-3000:]
        result = json.loads(result_path.read_text())
    finally:
        procs.stop()

    print(result["table"], result["outcomes"])
    assert not result["errors"]
    assert result["ok"], result["table"]  # nothing acknowledged lost, duplicated, reordered
    assert result["outcomes"]["ok"] == 33000, result["outcomes"]  # every send got through, in the end
    # While cut off, the old leader committed nothing: its high watermarks stood still.
    assert all(isinstance(v, int) for v in frozen.values()), frozen
    assert all(answer == frozen for answer in during), (frozen, during)

    history = History.load(history_path)
    invoked = {e.op_id: e for e in history.events() if e.f == "send" and e.type == "invoke"}
    done = [(invoked[e.op_id], e) for e in history.events() if e.f == "send" and e.type != "invoke"]
    to_victim = [(i, c) for i, c in done if i.partition in led]
    # Nothing acknowledged on its partitions between the cut (plus what was in flight) and the first moment
    # another leader could exist: its last heartbeat before the cut, plus the session timeout. (The test
    # sees the election later than it happens: each look is a process started in a namespace.)
    alone_until_ms = min(elected_ms, cut_ms + (SESSION_TIMEOUT_S - HEARTBEAT_INTERVAL_S) * 1000)
    sent_alone = [i for i, _ in to_victim if cut_ms + 500 <= i.time_ms < alone_until_ms]
    assert len(sent_alone) > 100  # it was asked, all along
    acked_alone = [c for _, c in to_victim if c.type == "ok" and cut_ms + 500 <= c.time_ms < alone_until_ms]
    assert not acked_alone, ([c.time_ms - cut_ms for c in acked_alone[:5]], acked_alone[:3])
    # Its clients failed over: acknowledgements again within the session timeout and a few seconds, before
    # the heal, and from then on every send to those partitions succeeded while it was still cut off.
    again = sorted(c.time_ms for _, c in to_victim if c.type == "ok" and c.time_ms > cut_ms + 500)
    assert again and again[0] <= cut_ms + (SESSION_TIMEOUT_S + 4) * 1000 < heal_ms, (again[:1], cut_ms, heal_ms)
    steady = [(i, c) for i, c in to_victim if elected_ms + 1_000 <= i.time_ms <= heal_ms - 1_000]
    assert len(steady) > 100
    assert all(c.type == "ok" and c.time_ms < heal_ms for _, c in steady), \
        [c for _, c in steady if c.type != "ok" or c.time_ms >= heal_ms][:3]
