"""The controller core (nodes/controller.py) without sockets or disk: a fake clock, records checked.

What the coordinator's shell persists is exactly what the core returns, so the tests apply the records to
a dict and restore a second controller from it, as a restarted coordinator would; every test ends with
``check_invariants`` on both. Time is probed 1 ms either side of a session's end.
"""

from __future__ import annotations

import random

import pytest

from bus.errors import (FencedLeaderEpoch, IneligibleReplica, InvalidRequest, InvalidUpdateVersion,
                        NoNodesAvailable, NodeIdentityMismatch, NotLeader, TopicExists, UnknownTopic)
from nodes.controller import DELETE, KEY_CLUSTER_ID, NO_LEADER, PUT, Controller, InvariantViolation

SESSION_MS = 1_000


class Disk:
    """What the shell would have written: the records applied in order."""

    def __init__(self):
        self.kv: dict[bytes, object] = {}

    def apply(self, records):
        for record in records:
            if record[0] == PUT:
                self.kv[record[1]] = _copy(record[2])
            else:
                assert record[0] == DELETE
                self.kv.pop(record[1], None)
        return records

    def restore(self, cluster_id="other", now_ms=0) -> Controller:
        controller, records = Controller.restore(self.kv.items(), cluster_id, now_ms,
                                                 node_session_timeout_ms=SESSION_MS)
        self.apply(records)
        return controller


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


@pytest.fixture
def disk():
    return Disk()


def heartbeat(c, node_id, now_ms, *, instance=None, dir_id=None, version=-1):
    return c.node_heartbeat(node_id, f"tcp://h:{7400 + node_id}", instance or f"i{node_id}",
                            dir_id or f"d{node_id}", version, now_ms)


def start(disk, nodes=(1, 2, 3), now_ms=0) -> Controller:
    c = disk.restore("c1")
    for node_id in nodes:
        disk.apply(heartbeat(c, node_id, now_ms).records)
    return c


def create(disk, c, name="t", partitions=1, now_ms=0, **kw):
    outcome = c.create_topic(name, partitions, kw.pop("retention_ms", None), None, now_ms, **kw)
    disk.apply(outcome.records)
    return outcome


def state(c, topic="t", partition=0) -> dict:
    return c.topics[topic]["partitions"][partition]


def same_after_restart(disk, c):
    restored = disk.restore()
    assert restored.topics == c.topics and restored.version == c.version
    restored.check_invariants()
    c.check_invariants()
    return restored


# -- identity, topics, producer ids --------------------------------------------------------------------

def test_a_new_store_gets_the_cluster_id_once(disk):
    first = disk.restore("c1")
    assert first.cluster_id == "c1" and disk.kv[KEY_CLUSTER_ID] == "c1"
    assert disk.restore("c2").cluster_id == "c1"  # kept for good


def test_create_topic_spreads_leaders_and_replicas_and_persists_them(disk):
    c = start(disk)
    outcome = create(disk, c, "orders", 6)
    parts = outcome.reply["partitions"]
    assert [p["leader"] for p in parts] == [1, 2, 3, 1, 2, 3]
    assert all(len(set(p["replicas"])) == 3 and p["isr"] == p["replicas"] for p in parts)
    assert outcome.reply["replication_factor"] == 3 and outcome.reply["min_insync_replicas"] == 2
    assert outcome.notify
    create(disk, c, "audit", 2, retention_ms=60_000, replication_factor=2)
    restored = same_after_restart(disk, c)
    assert restored.topics["audit"]["retention_ms"] == 60_000
    assert restored.topics["audit"]["min_insync_replicas"] == 1
    assert sorted(t["id"] for t in restored.topics.values()) == [1, 2]


def test_default_replication_follows_the_live_nodes(disk):
    c = start(disk, nodes=(1,))
    reply = create(disk, c).reply
    assert (reply["replication_factor"], reply["min_insync_replicas"]) == (1, 1)
    start_two = start(Disk(), nodes=(1, 2))
    assert start_two.create_topic("t", 1, None, None, 0).reply["replication_factor"] == 2


@pytest.mark.parametrize("kw", [
    dict(name="a b"), dict(name="x" * 250), dict(name=5), dict(partitions=0), dict(partitions="many"),
    dict(partitions=10_001), dict(retention_ms=-1), dict(retention_ms=1.5), dict(replication_factor=4),
    dict(replication_factor=0), dict(replication_factor=True), dict(min_insync_replicas=4),
    dict(replication_factor=2, min_insync_replicas=3), dict(min_insync_replicas=0),
])
def test_a_refused_create_changes_nothing(disk, kw):
    c = start(disk)
    before = (_copy(c.topics), c.version, c.last_topic_id)
    args = dict(name="t", partitions=1, retention_ms=None)
    args.update(kw)
    with pytest.raises(InvalidRequest):
        c.create_topic(args.pop("name"), args.pop("partitions"), args.pop("retention_ms"), None, 10, **args)
    assert (c.topics, c.version, c.last_topic_id) == before


def test_more_replicas_than_live_nodes_is_a_clear_error(disk):
    c = start(disk, nodes=(1, 2))
    with pytest.raises(InvalidRequest, match="replication_factor 3 is more than the 2 live nodes"):
        c.create_topic("t", 1, None, None, 0, replication_factor=3)


def test_existing_topics_and_no_live_nodes_are_refused(disk):
    c = start(disk)
    create(disk, c)
    with pytest.raises(TopicExists):
        c.create_topic("t", 1, None, None, 10)
    disk.apply(c.tick(SESSION_MS + 1).records)  # every session ran out
    with pytest.raises(NoNodesAvailable):
        c.create_topic("u", 1, None, None, SESSION_MS + 1)


def test_delete_topic_bumps_the_version_and_ids_are_never_reused(disk):
    c = start(disk)
    create(disk, c, partitions=3)
    disk.apply(c.delete_topic("t", 10).records)
    assert not [k for k in disk.kv if k.startswith(b"partition:")]
    with pytest.raises(UnknownTopic):
        c.delete_topic("t", 10)
    with pytest.raises(InvalidRequest):
        c.delete_topic(["t"], 10)
    create(disk, c)
    restored = same_after_restart(disk, c)
    assert restored.topics["t"]["id"] == 2 and restored.version == 3


def test_producer_ids_are_never_handed_out_twice_across_restarts(disk):
    c = start(disk)
    ids = [disk.apply(o.records) and o.reply["producer_id"] for o in (c.init_producer_id(0) for _ in range(3))]
    assert ids == [1, 2, 3]
    assert disk.restore().init_producer_id(0).reply["producer_id"] == 4


def test_metadata_strict_names_the_missing_topic(disk):
    c = start(disk)
    assert c.metadata(["nope"], False, 0)["topics"] == {}
    with pytest.raises(UnknownTopic, match="nope"):
        c.metadata(["nope"], True, 0)


# -- node sessions ------------------------------------------------------------------------------------

def test_a_node_session_ends_exactly_at_its_timeout(disk):
    c = start(disk, nodes=(1,), now_ms=100)
    assert c.next_deadline_ms() == 100 + SESSION_MS + 1
    assert c.tick(100 + SESSION_MS).records == ()
    assert c.metadata(None, False, 100 + SESSION_MS)["nodes"][1]["alive"] is True
    c.tick(100 + SESSION_MS + 1)
    assert c.metadata(None, False, 100 + SESSION_MS + 1)["nodes"][1]["alive"] is False
    assert c.next_deadline_ms() is None


def test_a_second_live_node_with_the_same_id_is_refused_and_a_moved_one_is_not(disk):
    c = start(disk, nodes=(1,), now_ms=0)
    with pytest.raises(NodeIdentityMismatch):
        c.node_heartbeat(1, "tcp://elsewhere:1", "impostor", "d1", -1, 10)
    # Once the session ran out, another address is accepted (the node moved).
    disk.apply(c.node_heartbeat(1, "tcp://elsewhere:1", "impostor", "d1", -1, SESSION_MS + 1).records)
    assert disk.restore().nodes[1].address == "tcp://elsewhere:1"


def test_heartbeats_bring_the_placement_only_when_the_version_moved(disk):
    c = start(disk)
    create(disk, c, partitions=3)
    assert heartbeat(c, 1, 1, version=0).reply["topics"] == c.topics
    assert heartbeat(c, 1, 1, version=c.version).reply["topics"] is None
    assert heartbeat(c, 1, 1, version=c.version).records == ()


def test_a_restarted_coordinator_gives_every_node_a_fresh_session(disk):
    c = start(disk)
    create(disk, c)
    restored = disk.restore(now_ms=50_000)
    assert state(restored)["leader"] == 1
    assert restored.tick(50_000 + SESSION_MS).records == ()  # nobody is declared dead early
    disk.apply(heartbeat(restored, 2, 50_500).records)
    disk.apply(heartbeat(restored, 3, 50_500).records)
    disk.apply(restored.tick(50_000 + SESSION_MS + 1).records)  # node 1 never came back
    assert state(restored)["leader"] == 2 and state(restored)["leader_epoch"] == 1
    same_after_restart(disk, restored)


# -- elections ------------------------------------------------------------------------------------------

def test_a_dead_leader_is_replaced_from_the_isr_and_leaves_it(disk):
    c = start(disk)
    create(disk, c)
    assert state(c) == {"replicas": [1, 2, 3], "leader": 1, "leader_epoch": 0, "isr": [1, 2, 3],
                        "partition_epoch": 0}
    for node_id in (2, 3):
        heartbeat(c, node_id, SESSION_MS)
    outcome = disk.apply(c.tick(SESSION_MS + 1).records) and c.tick(SESSION_MS + 1)
    assert state(c) == {"replicas": [1, 2, 3], "leader": 2, "leader_epoch": 1, "isr": [2, 3], "partition_epoch": 1}
    assert outcome.records == ()  # said once
    same_after_restart(disk, c)


def test_a_dead_follower_leaves_the_isr_without_an_election(disk):
    c = start(disk)
    create(disk, c)
    for node_id in (1, 2):
        heartbeat(c, node_id, SESSION_MS)
    outcome = c.tick(SESSION_MS + 1)
    disk.apply(outcome.records)
    assert outcome.notify
    assert state(c) == {"replicas": [1, 2, 3], "leader": 1, "leader_epoch": 0, "isr": [1, 2], "partition_epoch": 1}


def test_the_last_isr_member_keeps_its_place_and_is_elected_when_it_returns(disk):
    c = start(disk)
    create(disk, c)
    disk.apply(c.tick(SESSION_MS + 1).records)  # everyone died at once
    assert state(c)["leader"] == NO_LEADER and len(state(c)["isr"]) == 1
    last = state(c)["isr"][0]
    others = [n for n in (1, 2, 3) if n != last]
    disk.apply(heartbeat(c, others[0], 5_000).records)  # not in the ISR: not eligible
    assert state(c)["leader"] == NO_LEADER
    disk.apply(heartbeat(c, last, 5_001).records)
    assert state(c)["leader"] == last and state(c)["isr"] == [last]
    same_after_restart(disk, c)


def test_a_node_back_with_a_new_disk_is_never_elected_and_needs_an_unclean_election(disk):
    c = start(disk)
    create(disk, c)
    disk.apply(c.tick(SESSION_MS + 1).records)
    last = state(c)["isr"][0]
    disk.apply(heartbeat(c, last, 5_000, dir_id="fresh").records)  # it lost its disk
    assert state(c)["leader"] == NO_LEADER and state(c)["isr"] == []
    outcome = c.elect_unclean("t", 0, 5_001)
    disk.apply(outcome.records)
    assert state(c)["leader"] == last and state(c)["isr"] == [last]
    with pytest.raises(InvalidRequest, match="has a leader"):
        c.elect_unclean("t", 0, 5_002)
    same_after_restart(disk, c)


def test_a_restarted_leader_loses_its_leadership_and_isr_place(disk):
    c = start(disk)
    create(disk, c)
    disk.apply(heartbeat(c, 1, 100, instance="i1-again").records)  # restarted within its session
    assert state(c) == {"replicas": [1, 2, 3], "leader": 2, "leader_epoch": 1, "isr": [2, 3], "partition_epoch": 1}
    restored = same_after_restart(disk, c)
    assert state(restored)["leader_epoch"] == 1


def test_a_restarted_sole_leader_is_re_elected_at_a_new_epoch(disk):
    c = start(disk, nodes=(1,))
    create(disk, c)
    disk.apply(heartbeat(c, 1, 100, instance="again").records)
    assert state(c)["leader"] == 1 and state(c)["leader_epoch"] >= 1 and state(c)["isr"] == [1]


# -- ISR changes ----------------------------------------------------------------------------------------

def alter(c, isr, *, node_id=1, instance="i1", leader_epoch=None, partition_epoch=None, incarnations=None,
          now_ms=10):
    p = state(c)
    return c.alter_partition(node_id, instance, "t", 0, p["leader_epoch"] if leader_epoch is None else leader_epoch,
                             p["partition_epoch"] if partition_epoch is None else partition_epoch, isr,
                             {2: "i2", 3: "i3"} if incarnations is None else incarnations, now_ms)


def test_an_isr_change_is_compare_and_set_from_the_current_leader(disk):
    c = start(disk)
    create(disk, c)
    outcome = alter(c, [1, 2])
    disk.apply(outcome.records)
    assert outcome.reply["isr"] == [1, 2] and outcome.reply["partition_epoch"] == 1 and outcome.notify
    with pytest.raises(InvalidUpdateVersion):
        alter(c, [1], partition_epoch=0)  # a stale compare-and-set
    with pytest.raises(FencedLeaderEpoch):
        alter(c, [1], leader_epoch=7)
    with pytest.raises(NotLeader):
        alter(c, [2], node_id=2, instance="i2")
    with pytest.raises(NotLeader):
        alter(c, [1], instance="an old incarnation of node 1")
    with pytest.raises(InvalidRequest):
        alter(c, [2, 3])  # without the leader
    with pytest.raises(InvalidRequest):
        alter(c, [1, 4])
    assert state(c)["isr"] == [1, 2]
    disk.apply(alter(c, [3, 1, 2]).records)  # back in replica order
    assert state(c)["isr"] == [1, 2, 3]
    same_after_restart(disk, c)


def test_a_member_is_only_added_alive_and_as_the_incarnation_that_caught_up(disk):
    c = start(disk)
    create(disk, c)
    disk.apply(alter(c, [1]).records)
    with pytest.raises(IneligibleReplica):
        alter(c, [1, 2], incarnations={2: "an incarnation that restarted since"})
    for node_id in (1, 3):
        heartbeat(c, node_id, SESSION_MS)
    disk.apply(c.tick(SESSION_MS + 1).records)  # node 2 died
    with pytest.raises(IneligibleReplica):
        alter(c, [1, 2], now_ms=SESSION_MS + 2)
    disk.apply(alter(c, [1, 3], now_ms=SESSION_MS + 2).records)
    assert state(c)["isr"] == [1, 3]


# -- under random faults ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_random_sessions_restarts_disk_losses_and_isr_changes_keep_the_invariants(seed):
    """Leaders come only from the ISR, epochs only rise, and a node back on a new disk never leads,
    whatever the order of heartbeats, deaths, restarts and ISR proposals; checked after every step and
    after a restart from the records."""
    rng = random.Random(seed)
    disk = Disk()
    c = start(disk, nodes=(1, 2, 3, 4))
    create(disk, c, "a", 4)
    create(disk, c, "b", 2, replication_factor=2)
    instances = {n: f"i{n}" for n in (1, 2, 3, 4)}
    dirs = {n: f"d{n}" for n in (1, 2, 3, 4)}
    told = dict(dirs)  # the data directory each node last told the controller
    empty = set()  # (node, topic, partition): a replica on a new disk that no leader has let back in
    epochs = {}
    now_ms = 0
    for _ in range(300):
        now_ms += rng.choice((1, 50, 400, SESSION_MS))
        node_id = rng.choice((1, 2, 3, 4))
        action = rng.random()
        try:
            if action < 0.5:
                if told[node_id] != dirs[node_id]:
                    empty |= {(node_id, name, i) for name, t in c.topics.items()
                              for i, p in enumerate(t["partitions"]) if node_id in p["replicas"]}
                disk.apply(heartbeat(c, node_id, now_ms, instance=instances[node_id], dir_id=dirs[node_id]).records)
                told[node_id] = dirs[node_id]
            elif action < 0.6:
                instances[node_id] += "'"  # a restart
            elif action < 0.63:
                instances[node_id] += "'"  # a restart on a new disk
                dirs[node_id] += "'"
            elif action < 0.85:
                name = rng.choice(("a", "b"))
                index = rng.randrange(len(c.topics[name]["partitions"]))
                p = c.topics[name]["partitions"][index]
                if p["leader"] != NO_LEADER:
                    isr = [p["leader"], *rng.sample([r for r in p["replicas"] if r != p["leader"]],
                                                    rng.randrange(len(p["replicas"])))]
                    disk.apply(c.alter_partition(p["leader"], instances[p["leader"]], name, index, p["leader_epoch"],
                                                 p["partition_epoch"], isr, dict(instances), now_ms).records)
                    empty -= {(n, name, index) for n in isr}  # a leader let them in (once caught up)
            else:
                disk.apply(c.tick(now_ms).records)
        except (IneligibleReplica, NotLeader, InvalidRequest):
            pass
        c.check_invariants()
        for name, topic in c.topics.items():
            for index, p in enumerate(topic["partitions"]):
                before = epochs.get((name, index), (0, 0))
                assert (p["leader_epoch"], p["partition_epoch"]) >= before
                epochs[(name, index)] = (p["leader_epoch"], p["partition_epoch"])
                if p["leader"] != NO_LEADER:
                    assert c.nodes[p["leader"]].live, f"{name}/{index}: a dead leader {p['leader']}"
                    assert (p["leader"], name, index) not in empty, f"{name}/{index}: an empty replica leads"
    same_after_restart(disk, c)


def test_check_invariants_catches_a_broken_state(disk):
    c = start(disk)
    create(disk, c, "t")
    create(disk, c, "u")
    c.check_invariants()
    c.topics["u"]["partitions"][0]["leader"] = 4  # a leader outside the ISR
    with pytest.raises(InvariantViolation, match="not in ISR"):
        c.check_invariants()
