"""Kafka's classic group protocol as a pure state machine (nodes/kafka/classic_group.py), on a fake clock:
KIP-394's member id, generations, the leader's assignment handed out, rebalances on join, leave, session
timeout (probed 1 ms before and after) and rebalance timeout, Kafka's error codes, and the commit gate.
The same protocol against real clients and processes: tests/test_kafka_groups.py."""

from __future__ import annotations

import random

import pytest
from kafka.protocol.consumer.metadata import ConsumerProtocolAssignment, ConsumerProtocolSubscription

from nodes.kafka import codec
from nodes.kafka.classic_group import (COMPLETING_REBALANCE, PREPARING_REBALANCE, STABLE, ClassicGroups,
                                       assigned_partitions, subscribed_topics)

SESSION_MS = 3_000
REBALANCE_MS = 5_000
GROUP = "g"


def subscription(*topics: str) -> bytes:
    return bytes(ConsumerProtocolSubscription(version=0, topics=list(topics), user_data=None).encode())


def assignment(topic: str, *partitions: int) -> bytes:
    tp = ConsumerProtocolAssignment.TopicPartition(topic=topic, partitions=list(partitions))
    return bytes(ConsumerProtocolAssignment(version=0, assigned_partitions=[tp], user_data=None).encode())


class Harness:
    """The shell's part: tokens for held requests, a fake clock, and the replies delivered so far."""

    def __init__(self):
        self.core = ClassicGroups("test")
        self.now_ms = 1_000
        self.answers: dict[int, dict] = {}
        self.tokens = 0

    def _token(self) -> int:
        self.tokens += 1
        return self.tokens

    def _deliver(self, replies) -> None:
        for reply in replies:
            assert reply.token not in self.answers, "a request answered twice"
            self.answers[reply.token] = reply.values
        self.core.check_invariants()

    def join(self, member_id: str = "", protocols=None, *, v4: bool = True, session_ms: int = SESSION_MS,
             instance: str | None = None) -> int:
        token = self._token()
        self._deliver(self.core.join(
            token, GROUP, member_id, group_instance_id=instance, client_id="c", client_host="",
            session_timeout_ms=session_ms, rebalance_timeout_ms=REBALANCE_MS, protocol_type="consumer",
            protocols=protocols or [("range", subscription("t"))], require_known_member_id=v4, now_ms=self.now_ms))
        return token

    def first_join(self) -> tuple[str, int]:
        """KIP-394: the first JoinGroup gets MEMBER_ID_REQUIRED and its id; the second is held or answered."""
        required = self.answers[self.join()]
        assert required["error_code"] == codec.MEMBER_ID_REQUIRED and required["member_id"]
        return required["member_id"], self.join(required["member_id"])

    def sync(self, member_id: str, generation: int, assignments=None, instance: str | None = None) -> int:
        token = self._token()
        self._deliver(self.core.sync(token, GROUP, generation, member_id, group_instance_id=instance,
                                     protocol_type=None, protocol_name=None, assignments=assignments or {},
                                     now_ms=self.now_ms))
        return token

    def heartbeat(self, member_id: str, generation: int, instance: str | None = None) -> int:
        return self.core.heartbeat(GROUP, generation, member_id, group_instance_id=instance, now_ms=self.now_ms)

    def tick(self, to_ms: int) -> None:
        self.now_ms = to_ms
        self._deliver(self.core.tick(to_ms))

    def state(self) -> str:
        return self.core.describe(GROUP)["group_state"]


def two_member_stable_group(h: Harness) -> tuple[str, str, int]:
    a, a_join = h.first_join()
    assert h.answers[a_join]["generation_id"] == 1 and h.answers[a_join]["leader"] == a  # alone: formed at once
    b, b_join = h.first_join()
    assert b_join not in h.answers and h.state() == PREPARING_REBALANCE  # waits for a to join again
    assert h.heartbeat(a, 1) == codec.REBALANCE_IN_PROGRESS
    a_again = h.join(a)
    for token in (a_again, b_join):
        assert h.answers[token]["error_code"] == codec.NONE and h.answers[token]["generation_id"] == 2
    assert [m["member_id"] for m in h.answers[a_again]["members"]] == [a, b]  # the leader gets the members
    assert h.answers[b_join]["members"] == [] and h.answers[b_join]["leader"] == a
    assert h.state() == COMPLETING_REBALANCE
    b_sync = h.sync(b, 2)
    assert b_sync not in h.answers  # held until the leader's assignment is in
    a_sync = h.sync(a, 2, {a: assignment("t", 0, 1), b: assignment("t", 2, 3)})
    assert h.answers[b_sync] == {**h.answers[b_sync], "error_code": codec.NONE, "assignment": assignment("t", 2, 3)}
    assert h.answers[a_sync]["assignment"] == assignment("t", 0, 1)
    assert h.state() == STABLE
    return a, b, 2


def test_two_members_form_a_generation_and_the_leaders_assignment_is_handed_out():
    h = Harness()
    a, b, generation = two_member_stable_group(h)
    assert h.heartbeat(a, generation) == h.heartbeat(b, generation) == codec.NONE
    # A member of this generation asking again gets its assignment again.
    assert h.answers[h.sync(b, generation)]["assignment"] == assignment("t", 2, 3)
    described = h.core.describe(GROUP)
    assert [assigned_partitions(m["member_assignment"]) for m in described["members"]] == [
        [("t", 0), ("t", 1)], [("t", 2), ("t", 3)]]
    assert described["protocol_data"] == "range" and h.core.list_groups()[0]["group_state"] == STABLE


def test_session_timeout_expels_a_silent_member_one_ms_after_it_and_not_before():
    h = Harness()
    a, b, generation = two_member_stable_group(h)
    last_ms = h.now_ms
    h.tick(last_ms + SESSION_MS - 1000)
    assert h.heartbeat(a, generation) == codec.NONE  # a keeps beating; b is silent
    h.tick(last_ms + SESSION_MS)  # b's last instant alive
    assert h.state() == STABLE and b in h.core.groups[GROUP].members
    assert h.core.next_deadline_ms() == last_ms + SESSION_MS + 1
    h.tick(last_ms + SESSION_MS + 1)
    assert b not in h.core.groups[GROUP].members and h.state() == PREPARING_REBALANCE
    assert h.heartbeat(b, generation) == codec.UNKNOWN_MEMBER_ID
    assert h.heartbeat(a, generation) == codec.REBALANCE_IN_PROGRESS
    rejoin = h.join(a)
    assert h.answers[rejoin]["generation_id"] == generation + 1 and len(h.answers[rejoin]["members"]) == 1


def test_rebalance_timeout_removes_members_that_do_not_join_again():
    h = Harness()
    a, b, generation = two_member_stable_group(h)
    c, c_join = h.first_join()
    started_ms = h.now_ms
    for at_ms in range(started_ms + 1000, started_ms + REBALANCE_MS, 1000):
        h.tick(at_ms)  # a and b keep heartbeating but never join again
        assert h.heartbeat(a, generation) == h.heartbeat(b, generation) == codec.REBALANCE_IN_PROGRESS
    assert c_join not in h.answers
    h.tick(started_ms + REBALANCE_MS)
    assert h.answers[c_join]["generation_id"] == generation + 1 and h.answers[c_join]["leader"] == c
    assert set(h.core.groups[GROUP].members) == {c}


def test_leave_rebalances_the_rest_and_the_last_leave_empties_the_group():
    h = Harness()
    a, b, generation = two_member_stable_group(h)
    codes, replies = h.core.leave(GROUP, [(b, None), ("nobody", None)], now_ms=h.now_ms)
    assert codes == [codec.NONE, codec.UNKNOWN_MEMBER_ID] and replies == []
    assert h.state() == PREPARING_REBALANCE
    assert h.answers[h.join(a)]["generation_id"] == generation + 1
    codes, _ = h.core.leave(GROUP, [(a, None)], now_ms=h.now_ms)
    assert codes == [codec.NONE] and h.core.describe(GROUP) is None and not h.core.has_members(GROUP)


def test_a_leader_leaving_while_others_wait_in_sync_sends_them_back_to_join():
    h = Harness()
    a, b, generation = two_member_stable_group(h)
    a_join = h.join(a)  # the leader joining again is a rebalance (in Kafka too)
    assert a_join not in h.answers and h.state() == PREPARING_REBALANCE
    b_join = h.join(b)
    generation = h.answers[b_join]["generation_id"]
    assert h.answers[a_join]["generation_id"] == generation
    b_sync = h.sync(b, generation)
    _, replies = h.core.leave(GROUP, [(a, None)], now_ms=h.now_ms)
    h._deliver(replies)
    assert h.answers[b_sync]["error_code"] == codec.REBALANCE_IN_PROGRESS


def test_errors_unknown_member_illegal_generation_inconsistent_protocol_and_bad_session_timeout():
    h = Harness()
    assert h.answers[h.join("made-up")]["error_code"] == codec.UNKNOWN_MEMBER_ID
    a, _, generation = two_member_stable_group(h)
    assert h.answers[h.sync("stranger", generation)]["error_code"] == codec.UNKNOWN_MEMBER_ID
    assert h.answers[h.sync(a, generation - 1)]["error_code"] == codec.ILLEGAL_GENERATION
    assert h.heartbeat(a, generation + 5) == codec.ILLEGAL_GENERATION
    assert h.answers[h.join(protocols=[("roundrobin", subscription("t"))])]["error_code"] == \
        codec.INCONSISTENT_GROUP_PROTOCOL  # nothing in common with the members' "range"
    for garbage in (b"", b"garbage", b"\xff\xff\x00\x00\x00\x01\x00\x01t\xff\xff\xff\xff", b"\x00\x00\x7f\xff"):
        assert h.answers[h.join(protocols=[("range", garbage)])]["error_code"] == codec.INCONSISTENT_GROUP_PROTOCOL
    assert h.answers[h.join(session_ms=10)]["error_code"] == codec.INVALID_SESSION_TIMEOUT
    assert h.state() == STABLE  # none of it touched the group
    assert h.heartbeat(a, generation) == codec.NONE


def test_join_before_v4_gets_a_member_id_at_once_and_a_repeated_join_is_answered_again():
    h = Harness()
    first = h.answers[h.join(v4=False)]
    assert first["error_code"] == codec.NONE and first["member_id"] and first["generation_id"] == 1
    member = first["member_id"]
    assert h.answers[h.sync(member, 1, {member: assignment("t", 0)})]["assignment"] == assignment("t", 0)
    # The leader's join is a rebalance in Kafka too; the group (alone) forms again at once.
    assert h.answers[h.join(member, v4=False)]["generation_id"] == 2
    second, second_join = h.first_join()  # a follower of generation 3, then its join repeated
    assert second_join not in h.answers
    h.join(member)
    assert h.answers[second_join]["generation_id"] == 3
    h.sync(member, 3, {member: assignment("t", 0), second: assignment("t", 1)})
    assert h.answers[h.join(second)] == h.answers[second_join]  # nothing new: the same answer again
    assert h.core.groups[GROUP].generation == 3 and h.state() == STABLE


def test_a_static_member_back_under_a_new_id_takes_its_place_without_a_rebalance_and_fences_the_old_id():
    h = Harness()
    leader, _ = h.first_join()
    static_join = h.join(instance="host-1")  # KIP-345: no MEMBER_ID_REQUIRED round trip for a static member
    h.join(leader)
    old = h.answers[static_join]["member_id"]
    generation = h.answers[static_join]["generation_id"]
    h.sync(leader, generation, {leader: assignment("t", 0, 1), old: assignment("t", 2, 3)})
    # The static member restarts: a new member id, the same instance id, the same metadata.
    back = h.answers[h.join(instance="host-1")]
    assert back["error_code"] == codec.NONE and back["generation_id"] == generation and back["member_id"] != old
    assert h.state() == STABLE  # no rebalance: the leader's heartbeat says so
    assert h.heartbeat(leader, generation) == codec.NONE
    assert h.answers[h.sync(back["member_id"], generation, instance="host-1")]["assignment"] == assignment("t", 2, 3)
    # The old incarnation is fenced wherever it names the instance id; its id alone is unknown.
    assert h.heartbeat(old, generation, instance="host-1") == codec.FENCED_INSTANCE_ID
    assert h.answers[h.join(old, instance="host-1")]["error_code"] == codec.FENCED_INSTANCE_ID
    assert h.core.commit_error(GROUP, generation, old, group_instance_id="host-1", now_ms=h.now_ms) == \
        codec.FENCED_INSTANCE_ID
    assert h.heartbeat(old, generation) == codec.UNKNOWN_MEMBER_ID
    # The leader restarting as a static member does not rebalance either (KIP-814: skip_assignment).
    codes, _ = h.core.leave(GROUP, [(leader, None)], now_ms=h.now_ms)
    assert h.answers[h.join(back["member_id"], instance="host-1")]["leader"] == back["member_id"]
    generation = h.core.groups[GROUP].generation
    h.sync(back["member_id"], generation, {back["member_id"]: assignment("t", 0, 1, 2, 3)})
    again = h.answers[h.join(instance="host-1")]
    assert again["leader"] == again["member_id"] and again["skip_assignment"] and again["generation_id"] == generation
    assert [m["member_id"] for m in again["members"]] == [again["member_id"]] and h.state() == STABLE
    assert h.answers[h.sync(again["member_id"], generation, instance="host-1")]["assignment"] == \
        assignment("t", 0, 1, 2, 3)
    # Leaving by instance id (LeaveGroup v3+) removes the member that holds it now.
    codes, _ = h.core.leave(GROUP, [("", "host-1")], now_ms=h.now_ms)
    assert codes == [codec.NONE] and h.core.describe(GROUP) is None


def test_pending_member_ids_expire_after_the_session_timeout():
    h = Harness()
    required = h.answers[h.join()]
    h.tick(h.now_ms + SESSION_MS + 1)
    assert h.answers[h.join(required["member_id"])]["error_code"] == codec.UNKNOWN_MEMBER_ID


def test_commit_gate_as_kafka_classic_coordinator():
    h = Harness()
    assert h.core.commit_error(GROUP, -1, "", now_ms=h.now_ms) is None  # simple commit: the caller's call
    assert h.core.commit_error(GROUP, 3, "x", now_ms=h.now_ms) == codec.UNKNOWN_MEMBER_ID
    a, b, generation = two_member_stable_group(h)
    assert h.core.commit_error(GROUP, generation, a, now_ms=h.now_ms) == codec.NONE
    assert h.core.commit_error(GROUP, generation - 1, a, now_ms=h.now_ms) == codec.ILLEGAL_GENERATION
    assert h.core.commit_error(GROUP, -1, "", now_ms=h.now_ms) == codec.UNKNOWN_MEMBER_ID  # not while it has members
    h.first_join()  # a rebalance: members of the old generation may still commit what they hand back
    assert h.core.commit_error(GROUP, generation, a, now_ms=h.now_ms) == codec.NONE
    h.join(a)
    h.join(b)
    assert h.state() == COMPLETING_REBALANCE
    assert h.core.commit_error(GROUP, generation + 1, a, now_ms=h.now_ms) == codec.REBALANCE_IN_PROGRESS


def test_subscribed_topics_reads_a_subscription_and_refuses_garbage():
    assert subscribed_topics(subscription("a", "b")) == ["a", "b"]
    with pytest.raises(ValueError):
        subscribed_topics(b"\x00")


@pytest.mark.parametrize("seed", range(20))
def test_random_schedules_keep_the_invariants_and_answer_every_held_request(seed):
    """Joins (static ones too), syncs, heartbeats, leaves and clock jumps in a seeded random order: every call keeps the
    invariants, and once everyone leaves and time passes, every request was answered exactly once."""
    rng = random.Random(seed)
    h = Harness()
    members: list[str] = []
    for _ in range(300):
        action = rng.choice(["join", "rejoin", "static", "sync", "heartbeat", "leave", "tick"])
        if action == "static":
            h.join(instance=rng.choice(["s1", "s2"]))  # a static member (re)starting under a new id
        elif action == "join" and len(members) < 5:
            member, _ = h.first_join()
            members.append(member)
        elif action == "rejoin" and members:
            h.join(rng.choice(members))
        elif action == "sync" and members:
            member = rng.choice(members)
            gen = h.core.groups[GROUP].generation if GROUP in h.core.groups else 0
            h.sync(member, gen, {m: assignment("t", i) for i, m in enumerate(members)})
        elif action == "heartbeat" and members:
            member = rng.choice(members)
            code = h.heartbeat(member, h.core.groups[GROUP].generation if GROUP in h.core.groups else 0)
            if code == codec.UNKNOWN_MEMBER_ID:
                members.remove(member)
        elif action == "leave" and members:
            member = members.pop(rng.randrange(len(members)))
            h._deliver(h.core.leave(GROUP, [(member, None)], now_ms=h.now_ms)[1])
        else:
            h.tick(h.now_ms + rng.choice([1, 100, 1000, SESSION_MS]))
    h._deliver(h.core.leave(GROUP, [(m, None) for m in members] + [("", "s1"), ("", "s2")], now_ms=h.now_ms)[1])
    h.tick(h.now_ms + REBALANCE_MS + SESSION_MS + 1)
    assert h.core.groups == {} and h.core.next_deadline_ms() is None
    assert set(h.answers) == set(range(1, h.tokens + 1))  # every request answered, none twice
