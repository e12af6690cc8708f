"""The controller core (nodes/controller.py) without sockets or disk: a fake clock, records checked.

What the coordinator's shell persists is exactly what the core returns, so each test reads the records
and restores a second controller from them, as a restarted coordinator would.
"""

from __future__ import annotations

import pytest

from bus.errors import InvalidRequest, NoNodesAvailable, NodeIdentityMismatch, TopicExists, UnknownTopic
from nodes.controller import DELETE, KEY_CLUSTER_ID, PUT, Controller

SESSION_MS = 1_000


class Disk:
    """What the shell would have written: the records applied in order."""

    def __init__(self):
        self.kv: dict[bytes, object] = {}

    def apply(self, records):
        for record in records:
            if record[0] == PUT:
                self.kv[record[1]] = record[2]
            else:
                assert record[0] == DELETE
                self.kv.pop(record[1], None)

    def restore(self, cluster_id="other") -> Controller:
        controller, records = Controller.restore(self.kv.items(), cluster_id, node_session_timeout_ms=SESSION_MS)
        self.apply(records)
        return controller


@pytest.fixture
def disk():
    return Disk()


def start(disk, nodes=(1, 2, 3), now_ms=0) -> Controller:
    controller = disk.restore("c1")
    for node_id in nodes:
        disk.apply(controller.node_heartbeat(node_id, f"tcp://h:{7400 + node_id}", f"i{node_id}", -1, now_ms).records)
    return controller


def test_a_new_store_gets_the_cluster_id_once(disk):
    first = disk.restore("c1")
    assert first.cluster_id == "c1" and disk.kv[KEY_CLUSTER_ID] == "c1"
    assert disk.restore("c2").cluster_id == "c1"  # kept for good


def test_create_topic_spreads_partitions_and_persists_before_anything_else(disk):
    c = start(disk)
    outcome = c.create_topic("orders", 6, None, None, now_ms=10)
    assert outcome.reply["partitions"] == [1, 2, 3, 1, 2, 3]
    disk.apply(outcome.records)
    # A second topic continues the spread from the load the first left.
    disk.apply(c.create_topic("audit", 2, 60_000, None, now_ms=10).records)
    restored = disk.restore()
    assert restored.topics == c.topics and restored.version == c.version == 2
    assert restored.topics["audit"]["retention_ms"] == 60_000
    assert [t["id"] for t in restored.topics.values()] == [1, 2]
    restored.check_invariants()


@pytest.mark.parametrize("name, partitions, retention_ms, error", [
    ("a b", 1, None, InvalidRequest),
    ("x" * 250, 1, None, InvalidRequest),
    (5, 1, None, InvalidRequest),
    ("t", 0, None, InvalidRequest),
    ("t", "many", None, InvalidRequest),
    ("t", 10_001, None, InvalidRequest),
    ("t", 1, -1, InvalidRequest),
    ("t", 1, 1.5, InvalidRequest),
])
def test_a_refused_create_changes_nothing(disk, name, partitions, retention_ms, error):
    c = start(disk)
    before = (dict(c.topics), c.version, c.last_topic_id)
    with pytest.raises(error):
        c.create_topic(name, partitions, retention_ms, None, now_ms=10)
    assert (dict(c.topics), c.version, c.last_topic_id) == before


def test_existing_topics_and_no_live_nodes_are_refused(disk):
    c = start(disk)
    disk.apply(c.create_topic("t", 1, None, None, now_ms=10).records)
    with pytest.raises(TopicExists):
        c.create_topic("t", 1, None, None, now_ms=10)
    with pytest.raises(NoNodesAvailable):
        c.create_topic("u", 1, None, None, now_ms=10 + SESSION_MS + 1)  # every session ran out


def test_delete_topic_bumps_the_version_and_ids_are_never_reused(disk):
    c = start(disk)
    disk.apply(c.create_topic("t", 1, None, None, now_ms=10).records)
    disk.apply(c.delete_topic("t", now_ms=10).records)
    with pytest.raises(UnknownTopic):
        c.delete_topic("t", now_ms=10)
    with pytest.raises(InvalidRequest):
        c.delete_topic(["t"], now_ms=10)
    disk.apply(c.create_topic("t", 1, None, None, now_ms=10).records)
    restored = disk.restore()
    assert restored.topics["t"]["id"] == 2 and restored.version == 3


def test_a_node_session_ends_exactly_at_its_timeout(disk):
    c = start(disk, nodes=(1,), now_ms=100)
    node = c.nodes[1]
    assert c.alive(node, 100 + SESSION_MS)
    assert not c.alive(node, 100 + SESSION_MS + 1)
    assert c.metadata(None, False, 100 + SESSION_MS + 1)["nodes"][1]["alive"] is False


def test_a_second_live_node_with_the_same_id_is_refused_and_a_restart_is_not(disk):
    c = start(disk, nodes=(1,), now_ms=0)
    with pytest.raises(NodeIdentityMismatch):
        c.node_heartbeat(1, "tcp://elsewhere:1", "impostor", -1, now_ms=10)
    # The same incarnation moving address, or any incarnation once the session ran out, is accepted.
    outcome = c.node_heartbeat(1, "tcp://elsewhere:1", "impostor", -1, now_ms=SESSION_MS + 1)
    disk.apply(outcome.records)
    assert disk.restore().nodes[1].address == "tcp://elsewhere:1"


def test_heartbeats_bring_the_placement_only_when_the_version_moved(disk):
    c = start(disk)
    disk.apply(c.create_topic("t", 3, None, None, now_ms=0).records)
    assert c.node_heartbeat(1, "tcp://h:7401", "i1", 0, now_ms=1).reply["topics"] == c.topics
    assert c.node_heartbeat(1, "tcp://h:7401", "i1", c.version, now_ms=1).reply["topics"] is None
    assert c.node_heartbeat(1, "tcp://h:7401", "i1", c.version, now_ms=1).records == ()


def test_metadata_strict_names_the_missing_topic(disk):
    c = start(disk)
    assert c.metadata(["nope"], False, 0)["topics"] == {}
    with pytest.raises(UnknownTopic, match="nope"):
        c.metadata(["nope"], True, 0)


def test_producer_ids_are_never_handed_out_twice_across_restarts(disk):
    c = start(disk)
    ids = []
    for _ in range(3):
        outcome = c.init_producer_id(now_ms=0)
        disk.apply(outcome.records)
        ids.append(outcome.reply["producer_id"])
    assert disk.restore().init_producer_id(now_ms=0).reply["producer_id"] == ids[-1] + 1
    assert ids == [1, 2, 3]


def test_check_invariants_catches_a_broken_state(disk):
    from nodes.controller import InvariantViolation

    c = start(disk)
    disk.apply(c.create_topic("t", 1, None, None, now_ms=0).records)
    disk.apply(c.create_topic("u", 1, None, None, now_ms=0).records)
    c.check_invariants()
    c.topics["u"]["id"] = c.topics["t"]["id"]  # two topics sharing an id would share their logs on the nodes
    with pytest.raises(InvariantViolation, match="not unique"):
        c.check_invariants()
