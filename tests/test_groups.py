"""The consumer-group state machine (nodes/groups.py) under a fake clock: unit tests and a hypothesis model.

Every test keeps a dict standing in for the coordinator's store, applies each Outcome's records to it,
and can rebuild a coordinator from it with ``Groups.restore`` as a restart would.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nodes import groups as G
from nodes.groups import GroupError, Groups

TIMEOUT_MS = 100


class Harness:
    """A Groups plus the store its records go to, as the coordinator's shell would keep them."""

    def __init__(self):
        self.groups = Groups()
        self.store: dict[bytes, bytes] = {}
        self.evictions: list[G.Eviction] = []

    def run(self, outcome: G.Outcome) -> G.Outcome:
        for record in outcome.records:
            assert isinstance(record[1], bytes) and record[1].startswith(G.KEY_PREFIX)
            if record[0] == G.PUT:
                self.store[record[1]] = msgpack.packb(record[2], use_bin_type=True)  # as MetaStore does
            else:
                assert record[0] == G.DELETE and len(record) == 2
                self.store.pop(record[1], None)
        self.evictions.extend(outcome.evictions)
        return outcome

    def __getattr__(self, name):
        method = getattr(self.groups, name)

        def call(*args, **kwargs):
            result = method(*args, **kwargs)
            return self.run(result) if isinstance(result, G.Outcome) else result

        return call

    def restart(self, now_ms: int) -> None:
        self.groups = Groups.restore(list(self.store.items()), now_ms)


def join(h: Harness, group="g", client="c", now_ms=0, **kwargs) -> G.MemberReply:
    kwargs.setdefault("session_timeout_ms", TIMEOUT_MS)
    if "pattern" not in kwargs:
        kwargs.setdefault("topics", ["a"])
    return h.join(group, client, now_ms=now_ms, **kwargs).reply


def beat(h: Harness, reply: G.MemberReply, owned, now_ms: int) -> G.MemberReply:
    return h.heartbeat(reply.group_id, reply.member_id, reply.member_epoch, owned, now_ms=now_ms).reply


def rejected(code: str, fn, *args, **kwargs) -> GroupError:
    with pytest.raises(GroupError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


def tps(*items) -> frozenset:
    return frozenset(items)


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.metadata({"a": 4, "b": 2}, now_ms=0)
    return harness


# -- membership and eviction ---------------------------------------------------------------------


def test_first_member_gets_everything_at_once(h):
    r = join(h, topics=["a", "b"])
    assert r.member_epoch == 1 and r.group_epoch == 1
    assert r.assignment == {("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1)}
    assert r.revoke == frozenset()
    assert h.describe("g")["state"] == "stable"


def test_member_ids_are_unique_and_deterministic():
    ids = []
    for _ in range(2):
        harness = Harness()
        ids.append([join(harness, client="c").member_id for _ in range(3)])
    assert ids[0] == ids[1] and len(set(ids[0])) == 3


def test_eviction_exactly_after_session_timeout(h):
    r = join(h, now_ms=1_000)
    assert h.groups.next_deadline_ms() == 1_000 + TIMEOUT_MS + 1
    assert h.tick(1_000 + TIMEOUT_MS - 1).evictions == ()
    assert h.tick(1_000 + TIMEOUT_MS).evictions == ()
    assert h.describe("g")["members"]
    out = h.tick(1_000 + TIMEOUT_MS + 1)
    assert [(e.member_id, e.reason) for e in out.evictions] == [(r.member_id, G.SESSION_TIMEOUT)]
    assert h.describe("g")["state"] == "empty"
    assert h.groups.next_deadline_ms() is None


def test_heartbeat_extends_the_session(h):
    r = join(h, now_ms=0)
    r = beat(h, r, r.assignment, now_ms=90)
    assert h.tick(90 + TIMEOUT_MS).evictions == ()
    assert h.tick(90 + TIMEOUT_MS + 1).evictions[0].reason == G.SESSION_TIMEOUT


def test_expired_member_is_unknown_even_before_tick_and_nothing_changes(h):
    r = join(h, now_ms=0)
    before, store = h.describe("g"), dict(h.store)
    rejected(G.UNKNOWN_MEMBER_ID, h.heartbeat, "g", r.member_id, r.member_epoch, r.assignment,
             now_ms=TIMEOUT_MS + 1)
    assert h.describe("g") == before and h.store == store


def test_leave_frees_partitions_at_once_and_records_reason(h):
    a = join(h, client="a", now_ms=0)
    b = join(h, client="b", now_ms=1)
    a = beat(h, a, a.assignment, now_ms=2)  # a gives back b's share
    a = beat(h, a, a.assignment, now_ms=3)
    out = h.leave("g", a.member_id, a.member_epoch, G.MAX_POLL_INTERVAL, now_ms=4)
    assert [(e.member_id, e.reason) for e in out.evictions] == [(a.member_id, G.MAX_POLL_INTERVAL)]
    b = beat(h, b, b.assignment, now_ms=5)
    assert b.assignment == {("a", p) for p in range(4)}
    rejected(G.UNKNOWN_MEMBER_ID, h.heartbeat, "g", a.member_id, a.member_epoch, set(), now_ms=6)


def test_unknown_member_and_stale_epoch_heartbeats_change_nothing(h):
    a = join(h, client="a", now_ms=0)
    join(h, client="b", now_ms=1)  # bumps the group epoch
    a2 = beat(h, a, a.assignment, now_ms=2)
    a2 = beat(h, a2, a2.assignment, now_ms=3)
    assert a2.member_epoch > a.member_epoch
    before, store = h.describe("g"), dict(h.store)
    rejected(G.UNKNOWN_MEMBER_ID, h.heartbeat, "g", "nobody", 1, set(), now_ms=4)
    rejected(G.UNKNOWN_MEMBER_ID, h.heartbeat, "nogroup", a.member_id, 1, set(), now_ms=4)
    rejected(G.FENCED_MEMBER_EPOCH, h.heartbeat, "g", a.member_id, a2.member_epoch + 1, set(), now_ms=4)
    rejected(G.FENCED_MEMBER_EPOCH, h.heartbeat, "g", a.member_id, 0, set(), now_ms=4)
    assert h.describe("g") == before and h.store == store


def test_previous_epoch_accepted_once_after_a_lost_reply(h):
    a = join(h, client="a", now_ms=0)
    join(h, client="b", now_ms=1)
    a1 = beat(h, a, a.assignment, now_ms=2)  # told to revoke; epoch unchanged until it does
    assert a1.revoke and a1.member_epoch == a.member_epoch
    kept = a1.assignment
    a2 = beat(h, a1, kept, now_ms=3)
    assert a2.member_epoch > a1.member_epoch
    # The reply carrying the new epoch was lost: the old epoch still works while owned <= assigned.
    again = beat(h, a1, kept, now_ms=4)
    assert again.member_epoch == a2.member_epoch
    rejected(G.FENCED_MEMBER_EPOCH, h.heartbeat, "g", a.member_id, a1.member_epoch,
             kept | {("b", 0)}, now_ms=5)


# -- cooperative rebalancing -------------------------------------------------------------------


def test_revoke_before_assign(h):
    a = join(h, client="a", now_ms=0)
    assert len(a.assignment) == 4
    b = join(h, client="b", now_ms=1)
    assert b.assignment == frozenset(), "b's share is still owned by a"
    moving = h.describe("g")["members"][1]["pending"]
    assert len(moving) == 2

    a = beat(h, a, a.assignment, now_ms=2)
    assert len(a.revoke) == 2 and a.revoke.isdisjoint(a.assignment)
    still_owned = a.assignment | a.revoke  # a is slow: it keeps consuming the revoked partitions
    assert beat(h, b, set(), now_ms=3).assignment == frozenset()
    a = beat(h, a, still_owned, now_ms=4)
    assert a.revoke, "still asked to revoke"
    assert beat(h, b, set(), now_ms=5).assignment == frozenset()

    a = beat(h, a, a.assignment, now_ms=6)  # now a has let them go
    assert a.revoke == frozenset()
    b = beat(h, b, set(), now_ms=7)
    assert len(b.assignment) == 2 and b.assignment.isdisjoint(a.assignment)
    assert h.describe("g")["state"] == "stable"


def test_partitions_that_do_not_move_stay_put(h):
    a = join(h, client="a", topics=["a", "b"], now_ms=0)
    b = join(h, client="b", topics=["a", "b"], now_ms=1)
    a = beat(h, a, a.assignment, now_ms=2)
    kept_by_a = a.assignment
    a = beat(h, a, a.assignment, now_ms=3)
    b = beat(h, b, set(), now_ms=4)
    assert kept_by_a <= a.assignment and len(a.assignment) == len(b.assignment) == 3


def test_static_member_rejoin_keeps_assignment_without_rebalance(h):
    s = join(h, client="s", group_instance_id="pod-1", now_ms=0)
    o = join(h, client="o", now_ms=1)
    s = beat(h, s, s.assignment, now_ms=2)
    s = beat(h, s, s.assignment, now_ms=3)
    o = beat(h, o, set(), now_ms=4)
    group_epoch = h.describe("g")["group_epoch"]
    s2 = join(h, client="s", group_instance_id="pod-1", now_ms=5)
    assert s2.member_id != s.member_id
    assert s2.assignment == s.assignment and s2.member_epoch == s.member_epoch
    assert h.describe("g")["group_epoch"] == group_epoch, "no rebalance"
    fenced = [e for e in h.evictions if e.member_id == s.member_id]
    assert [e.reason for e in fenced] == [G.FENCED_BY_STATIC_REPLACEMENT]
    rejected(G.UNKNOWN_MEMBER_ID, h.heartbeat, "g", s.member_id, s.member_epoch, s.assignment, now_ms=6)
    o2 = beat(h, o, o.assignment, now_ms=6)
    assert o2.member_epoch == o.member_epoch and o2.assignment == o.assignment and not o2.revoke


def test_static_member_past_its_session_is_a_new_member(h):
    join(h, client="s", group_instance_id="pod-1", now_ms=0)
    epoch = h.describe("g")["group_epoch"]
    join(h, client="s", group_instance_id="pod-1", now_ms=TIMEOUT_MS + 1)
    assert [e.reason for e in h.evictions] == [G.SESSION_TIMEOUT]
    assert h.describe("g")["group_epoch"] > epoch


def test_static_replacement_with_another_subscription_rebalances(h):
    s = join(h, client="s", group_instance_id="pod-1", topics=["a"], now_ms=0)
    epoch = h.describe("g")["group_epoch"]
    s2 = join(h, client="s", group_instance_id="pod-1", topics=["b"], now_ms=1)
    assert h.describe("g")["group_epoch"] == epoch + 1
    assert s2.revoke == s.assignment and s2.assignment == frozenset()
    s2 = beat(h, s2, set(), now_ms=2)
    assert s2.assignment == {("b", 0), ("b", 1)}


def test_a_fenced_member_can_still_leave_and_free_its_partitions(h):
    a = join(h, client="a", now_ms=0)
    h.leave("g", a.member_id, 0, now_ms=1)
    assert h.describe("g")["state"] == "empty"
    b = join(h, client="b", now_ms=2)
    rejected(G.FENCED_MEMBER_EPOCH, h.leave, "g", b.member_id, b.member_epoch + 1, now_ms=3)
    rejected(G.INVALID_REQUEST, h.leave, "g", b.member_id, b.member_epoch, "bored", now_ms=3)


def test_restart_gives_members_a_fresh_session(h):
    r = join(h, now_ms=0)
    h.restart(now_ms=5_000)  # the new process's clock has nothing to do with the old one
    assert h.tick(5_000 + TIMEOUT_MS).evictions == ()
    assert beat(h, r, r.assignment, now_ms=5_000 + TIMEOUT_MS).assignment == r.assignment
    assert h.tick(5_000 + 2 * TIMEOUT_MS + 1).evictions[0].reason == G.SESSION_TIMEOUT


def test_pattern_subscription_picks_up_new_topics_and_partitions(h):
    r = join(h, pattern=r"orders\..*", now_ms=0)
    assert r.assignment == frozenset()
    epoch = r.group_epoch
    h.metadata({"a": 4, "b": 2, "orders.eu": 2, "ordersXus": 1}, now_ms=1)
    r = beat(h, r, set(), now_ms=2)
    assert r.group_epoch == epoch + 1 and r.member_epoch == epoch + 1
    assert r.assignment == {("orders.eu", 0), ("orders.eu", 1)}
    out = h.metadata({"a": 4, "b": 2, "orders.eu": 2, "ordersXus": 1}, now_ms=3)
    assert out.records == (), "unchanged metadata is no rebalance"
    h.metadata({"a": 5, "b": 2, "orders.eu": 3, "ordersXus": 1}, now_ms=4)
    r = beat(h, r, r.assignment, now_ms=5)
    assert r.assignment == {("orders.eu", 0), ("orders.eu", 1), ("orders.eu", 2)}


def test_a_heartbeat_with_a_new_subscription_moves_the_member_cooperatively_and_persists_it(h):
    a = join(h, client="a", topics=["a"], now_ms=0)
    b = join(h, client="b", topics=["a"], now_ms=1)
    a = beat(h, a, a.assignment, now_ms=2)
    a = beat(h, a, a.assignment, now_ms=3)
    b = beat(h, b, set(), now_ms=4)
    assert len(a.assignment) == len(b.assignment) == 2
    epoch = a.group_epoch
    same = h.heartbeat("g", a.member_id, a.member_epoch, a.assignment, topics=["a"], now_ms=5)
    assert same.reply.group_epoch == epoch, "the same subscription again is no rebalance"
    # a now wants b only: it must give back its share of a first, which then goes to b.
    a = h.heartbeat("g", a.member_id, a.member_epoch, a.assignment, topics=["b"], now_ms=6).reply
    assert a.group_epoch == epoch + 1 and len(a.revoke) == 2 and not a.assignment
    assert beat(h, b, b.assignment, now_ms=7).assignment == b.assignment, "a still owns its old share"
    a = beat(h, a, set(), now_ms=8)
    assert a.assignment == {("b", 0), ("b", 1)} and not a.revoke
    b = beat(h, b, b.assignment, now_ms=9)
    assert b.assignment == {("a", p) for p in range(4)}
    def subscription_of_a() -> tuple:
        (member,) = [m for m in h.describe("g")["members"] if m["member_id"] == a.member_id]
        return member["topics"], member["pattern"]

    h.restart(now_ms=10)  # the new subscription is on disk
    assert subscription_of_a() == (["b"], None)
    a = h.heartbeat("g", a.member_id, a.member_epoch, a.assignment, pattern="[ab]", now_ms=11).reply
    assert subscription_of_a() == (None, "[ab]")
    for bad in ({"topics": []}, {"topics": ["a"], "pattern": "a"}, {"pattern": "("}):
        before = h.describe("g")
        rejected(G.INVALID_CONFIG, h.heartbeat, "g", a.member_id, a.member_epoch, a.assignment, now_ms=12, **bad)
        assert h.describe("g") == before, "a refused subscription changes nothing"


def test_deleted_topic_drops_out_of_assignments(h):
    r = join(h, topics=["a", "b"], now_ms=0)
    h.metadata({"a": 4}, now_ms=1)
    assert all(t == "a" for t, _ in h.describe("g")["members"][0]["assignment"])
    r = beat(h, r, r.assignment, now_ms=2)
    assert r.revoke == {("b", 0), ("b", 1)}, "told to stop consuming what no longer exists"
    assert r.assignment == {("a", p) for p in range(4)}


def test_join_config_validation(h):
    for bad in (0, -1, G.SESSION_TIMEOUT_MS_MAX + 1, 1.5, True):
        rejected(G.INVALID_CONFIG, h.join, "g", "c", topics=["a"], session_timeout_ms=bad, now_ms=0)
    rejected(G.INVALID_CONFIG, h.join, "g", "c", topics=["a"], pattern="a", session_timeout_ms=10, now_ms=0)
    rejected(G.INVALID_CONFIG, h.join, "g", "c", session_timeout_ms=10, now_ms=0)
    rejected(G.INVALID_CONFIG, h.join, "g", "c", pattern="(", session_timeout_ms=10, now_ms=0)
    rejected(G.INVALID_CONFIG, h.join, "g", "c", topics=["a"], session_timeout_ms=10, assignor="x", now_ms=0)
    rejected(G.INVALID_CONFIG, h.join, "g\x00", "c", topics=["a"], session_timeout_ms=10, now_ms=0)
    assert h.list_groups() == []
    join(h, assignor="range")
    rejected(G.INCONSISTENT_ASSIGNOR, h.join, "g", "c", topics=["a"], session_timeout_ms=10, now_ms=1)


def test_client_chosen_member_id_makes_join_retries_idempotent(h):
    first = join(h, member_id="uuid-1", now_ms=0)
    retry = join(h, member_id="uuid-1", now_ms=1)
    assert retry.member_id == "uuid-1" and retry.member_epoch == first.member_epoch
    assert len(h.describe("g")["members"]) == 1


# -- offsets -----------------------------------------------------------------------------------


def test_commit_rules(h):
    a = join(h, client="a", now_ms=0)
    tp = sorted(a.assignment)[0]
    out = h.commit("g", a.member_id, a.member_epoch, {tp: (10, "m")}, now_ms=1)
    assert out.reply.committed == {tp: 10} and out.reply.ignored == frozenset()
    out = h.commit("g", a.member_id, a.member_epoch, {tp: (5, None)}, now_ms=2)
    assert out.reply.committed == {tp: 10} and out.reply.ignored == {tp} and out.records == ()
    assert h.groups.committed("g") == {tp: (10, "m")}
    rejected(G.NOT_ASSIGNED, h.commit, "g", a.member_id, a.member_epoch, {("b", 0): (1, None)}, now_ms=3)
    rejected(G.INVALID_REQUEST, h.commit, "g", a.member_id, a.member_epoch, {tp: (-1, None)}, now_ms=3)
    rejected(G.UNKNOWN_MEMBER_ID, h.commit, "g", "ghost", 1, {tp: (11, None)}, now_ms=3)


def test_stale_epoch_commit_is_rejected_and_changes_nothing(h):
    a = join(h, client="a", now_ms=0)
    join(h, client="b", now_ms=1)
    a1 = beat(h, a, a.assignment, now_ms=2)
    a2 = beat(h, a1, a1.assignment, now_ms=3)
    assert a2.member_epoch > a.member_epoch
    tp = sorted(a2.assignment)[0]
    h.commit("g", a.member_id, a2.member_epoch, {tp: (3, None)}, now_ms=4)
    before, store = h.describe("g"), dict(h.store)
    rejected(G.FENCED_MEMBER_EPOCH, h.commit, "g", a.member_id, a.member_epoch, {tp: (9, None)}, now_ms=5)
    assert h.describe("g") == before and h.store == store


def test_member_may_commit_partitions_it_is_revoking(h):
    a = join(h, client="a", now_ms=0)
    join(h, client="b", now_ms=1)
    a = beat(h, a, a.assignment, now_ms=2)
    tp = sorted(a.revoke)[0]
    assert h.commit("g", a.member_id, a.member_epoch, {tp: (7, None)}, now_ms=3).reply.committed == {tp: 7}


def test_reset_offsets_and_delete_group_need_an_empty_group(h):
    a = join(h, client="a", now_ms=0)
    tp = sorted(a.assignment)[0]
    h.commit("g", a.member_id, a.member_epoch, {tp: (10, None)}, now_ms=1)
    err = rejected(G.GROUP_NOT_EMPTY, h.reset_offsets, "g", {tp: 0}, now_ms=2)
    assert a.member_id in err.message
    rejected(G.GROUP_NOT_EMPTY, h.delete_group, "g", now_ms=2)
    h.leave("g", a.member_id, a.member_epoch, now_ms=3)
    h.reset_offsets("g", {tp: 2}, now_ms=4)
    assert h.groups.committed("g") == {tp: (2, None)}
    h.delete_group("g", now_ms=5)
    assert h.list_groups() == [] and h.store.keys() == {G.KEY_MEMBER_SEQ}
    rejected(G.UNKNOWN_GROUP, h.delete_group, "g", now_ms=6)
    rejected(G.UNKNOWN_GROUP, h.describe, "g")


def test_reset_offsets_allowed_once_members_expired(h):
    join(h, client="a", now_ms=0)
    h.reset_offsets("g", {("a", 0): 3}, now_ms=TIMEOUT_MS + 1)
    assert [e.reason for e in h.evictions] == [G.SESSION_TIMEOUT]


# -- persistence -------------------------------------------------------------------------------


def build_busy_group(h: Harness) -> None:
    s = join(h, client="s", group_instance_id="pod-1", topics=["a", "b"], now_ms=0)
    p = join(h, client="p", pattern="[ab]", now_ms=1)
    s = beat(h, s, s.assignment, now_ms=2)  # revocation pending: s still owns some of p's target
    h.commit("g", s.member_id, s.member_epoch, {sorted(s.assignment)[0]: (42, "meta")}, now_ms=3)
    join(h, group="other", client="r", assignor="roundrobin", now_ms=4)
    h.reset_offsets("staged", {("a", 1): 7}, now_ms=5)


def test_restore_reproduces_describe_exactly(h):
    build_busy_group(h)
    described = {g["group_id"]: h.describe(g["group_id"]) for g in h.list_groups()}
    assert described["g"]["state"] == "reconciling"
    h.restart(now_ms=1_000_000)
    assert {g["group_id"]: h.describe(g["group_id"]) for g in h.list_groups()} == described
    # Every member got a fresh session from the restart, and an unchanged metadata is no rebalance.
    assert h.groups.next_deadline_ms() == 1_000_000 + TIMEOUT_MS + 1
    assert h.metadata({"a": 4, "b": 2}, now_ms=1_000_000).records == ()
    # Generated member ids keep counting after the restart.
    assert join(h, client="s", now_ms=1_000_001).member_id == "s-4"


def test_restore_accepts_decoded_values_as_the_meta_store_returns_them(h):
    build_busy_group(h)
    decoded = [(k, msgpack.unpackb(v, raw=False, strict_map_key=False)) for k, v in h.store.items()]
    assert Groups.restore(decoded, 5).describe("g") == h.describe("g")


def test_records_persist_only_what_changed(h):
    r = join(h, now_ms=0)
    assert h.heartbeat("g", r.member_id, r.member_epoch, r.assignment, now_ms=1).records == ()
    tick = h.tick(2)
    assert tick.records == () and tick.reply is None


# -- the model ---------------------------------------------------------------------------------


class Client:
    """What a member's process believes: its id, epoch, and the partitions it consumes now."""

    def __init__(self, group: str, reply: G.MemberReply):
        self.group, self.member_id, self.epoch = group, reply.member_id, reply.member_epoch
        self.owned: set = set(reply.assignment)


class GroupMachine(RuleBasedStateMachine):
    GROUPS = ("g1", "g2")

    def __init__(self):
        super().__init__()
        self.h = Harness()
        self.now_ms = 0
        self.topics = {"a": 3, "b": 2}
        self.next_topic = 0
        self.clients: dict[str, Client] = {}
        self.high_water: dict[tuple, int] = {}  # (group, tp) -> highest committed offset seen
        self.h.metadata(self.topics, now_ms=0)

    # Every rule runs at the current time after a tick, as the coordinator's loop does.
    def _tick(self) -> None:
        self._drop_evicted(self.h.tick(self.now_ms))

    def _drop_evicted(self, outcome: G.Outcome) -> None:
        for e in outcome.evictions:
            self.clients.pop(e.member_id, None)

    @rule(group=st.sampled_from(GROUPS), static=st.sampled_from([None, "i1", "i2"]),
          pattern=st.booleans(), assignor=st.sampled_from(G.ASSIGNOR_NAMES), timeout=st.sampled_from([50, 200]))
    def join(self, group, static, pattern, assignor, timeout):
        self._tick()
        sub = {"pattern": "[bt].*"} if pattern else {"topics": ["a", "b"]}
        try:
            out = self.h.join(group, "c", group_instance_id=static, session_timeout_ms=timeout,
                              assignor=assignor, now_ms=self.now_ms, **sub)
        except GroupError as exc:
            assert exc.code in (G.INCONSISTENT_ASSIGNOR,)
            return
        self._drop_evicted(out)
        self.clients[out.reply.member_id] = Client(group, out.reply)

    def _client(self, data) -> Client:
        return self.clients[data.draw(st.sampled_from(sorted(self.clients)))]

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), honour=st.booleans(), lose_reply=st.booleans())
    def heartbeat(self, data, honour, lose_reply):
        self._tick()
        self._heartbeat(self._client(data), honour, lose_reply)

    def _heartbeat(self, c: Client, honour: bool, lose_reply: bool) -> None:
        try:
            out = self.h.heartbeat(c.group, c.member_id, c.epoch, set(c.owned), now_ms=self.now_ms)
        except GroupError as exc:
            # Two lost replies in a row leave the client two epochs behind: it must leave and rejoin.
            assert exc.code == G.FENCED_MEMBER_EPOCH, exc
            self._drop_evicted(self.h.leave(c.group, c.member_id, c.epoch, now_ms=self.now_ms))
            assert c.member_id not in self.clients
            return
        if lose_reply:
            return
        r = out.reply
        assert r.assignment.isdisjoint(r.revoke)
        c.epoch = r.member_epoch
        c.owned |= r.assignment
        if honour:
            c.owned -= r.revoke

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), reason=st.sampled_from(G.LEAVE_REASONS))
    def leave(self, data, reason):
        self._tick()
        c = self._client(data)
        out = self.h.leave(c.group, c.member_id, c.epoch, reason, now_ms=self.now_ms)
        assert [(e.member_id, e.reason) for e in out.evictions][-1] == (c.member_id, reason)
        self._drop_evicted(out)

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), offset=st.integers(0, 50))
    def commit(self, data, offset):
        self._tick()
        c = self._client(data)
        candidates = sorted(c.owned) + [("a", 0), ("b", 1)]
        tp = data.draw(st.sampled_from(candidates))
        member = next(m for m in self.h.describe(c.group)["members"] if m["member_id"] == c.member_id)
        expect_ok = c.epoch == member["member_epoch"] and list(tp) in member["assignment"]
        before = self.h.groups.committed(c.group).get(tp)
        try:
            out = self.h.commit(c.group, c.member_id, c.epoch, {tp: (offset, None)}, now_ms=self.now_ms)
        except GroupError as exc:
            assert not expect_ok and exc.code in (G.NOT_ASSIGNED, G.FENCED_MEMBER_EPOCH), exc
            assert self.h.groups.committed(c.group).get(tp) == before
            return
        assert expect_ok
        assert out.reply.committed[tp] == max(offset, before[0] if before else 0)
        assert (tp in out.reply.ignored) == (before is not None and offset < before[0])

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def stale_commit(self, data):
        self._tick()
        c = self._client(data)
        member = next(m for m in self.h.describe(c.group)["members"] if m["member_id"] == c.member_id)
        tps = sorted(tuple(tp) for tp in member["assignment"]) or [("a", 0)]
        before, store = self.h.describe(c.group), dict(self.h.store)
        with pytest.raises(GroupError) as info:
            self.h.commit(c.group, c.member_id, member["member_epoch"] - 1, {tps[0]: (99, None)},
                          now_ms=self.now_ms)
        assert info.value.code == G.FENCED_MEMBER_EPOCH
        assert self.h.describe(c.group) == before and self.h.store == store

    @rule(group=st.sampled_from(GROUPS), offset=st.integers(0, 50))
    def reset_offsets(self, group, offset):
        self._tick()
        try:
            self.h.reset_offsets(group, {("a", 0): offset}, now_ms=self.now_ms)
        except GroupError as exc:
            assert exc.code == G.GROUP_NOT_EMPTY
            assert any(c.group == group for c in self.clients.values())
            return
        assert not any(c.group == group for c in self.clients.values())
        self.high_water[(group, ("a", 0))] = offset  # the one sanctioned way down

    @rule(ms=st.integers(0, 120))
    def advance_clock(self, ms):
        self.now_ms += ms
        self._tick()

    @rule()
    def restart_coordinator(self):
        self._tick()
        self.h.restart(self.now_ms)
        out = self.h.metadata(self.topics, now_ms=self.now_ms)
        assert out.records == (), "a restart must not change any group"

    @rule(kind=st.sampled_from(["new_topic", "grow", "delete"]))
    def change_topics(self, kind):
        self._tick()
        topics = dict(self.topics)
        if kind == "new_topic":
            topics[f"t{self.next_topic}"] = 1 + self.next_topic % 3
            self.next_topic += 1  # names are never reused, so a deleted topic never comes back
        elif kind == "grow":
            name = sorted(topics)[self.now_ms % len(topics)]
            topics[name] += 1
        else:
            extra = sorted(t for t in topics if t.startswith("t"))
            if not extra:
                return
            del topics[extra[0]]
        self.topics = topics
        self._drop_evicted(self.h.metadata(topics, now_ms=self.now_ms))

    @rule()
    def settle(self):
        """Everyone heartbeats promptly for a few rounds: every group must become stable."""
        self._tick()
        for _ in range(4):
            for mid in sorted(self.clients):
                if mid in self.clients:
                    self._heartbeat(self.clients[mid], honour=True, lose_reply=False)
        for g in self.h.list_groups():
            d = self.h.describe(g["group_id"])
            assert d["state"] in ("stable", "empty"), d
            for m in d["members"]:
                assert sorted(map(list, self.clients[m["member_id"]].owned)) == m["target"]

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def core_invariants(self):
        self.h.groups.check_invariants()

    @invariant()
    def each_partition_owned_by_at_most_one_member(self):
        existing = {(t, p) for t, n in self.topics.items() for p in range(n)}
        for group in self.GROUPS:
            owner: dict = {}
            try:
                members = {m["member_id"]: m for m in self.h.describe(group)["members"]}
            except GroupError:
                members = {}
            for c in self.clients.values():
                if c.group != group:
                    continue
                assert c.member_id in members, "a live client is a member"
                assigned = {tuple(tp) for tp in members[c.member_id]["assignment"]}
                assert c.owned & existing <= assigned, "a client owns only what it was granted"
                for tp in c.owned & existing:
                    assert tp not in owner, f"{tp} owned by {owner.get(tp)} and {c.member_id}"
                    owner[tp] = c.member_id

    @invariant()
    def all_subscribed_partitions_targeted(self):
        for g in self.h.list_groups():
            d = self.h.describe(g["group_id"])
            if not d["members"]:
                continue
            targeted = [tuple(tp) for m in d["members"] for tp in m["target"]]
            assert len(targeted) == len(set(targeted))
            import re
            wanted = set()
            for m in d["members"]:
                topics = m["topics"] if m["topics"] is not None else [
                    t for t in self.topics if re.fullmatch(m["pattern"], t)]
                wanted |= {(t, p) for t in topics if t in self.topics for p in range(self.topics[t])}
            assert set(targeted) == wanted

    @invariant()
    def committed_offsets_never_decrease(self):
        for group in self.GROUPS:
            for tp, (offset, _) in self.h.groups.committed(group).items():
                assert offset >= self.high_water.get((group, tp), 0)
                self.high_water[(group, tp)] = offset

    @invariant()
    def persisted_records_rebuild_the_same_state(self):
        restored = Groups.restore(list(self.h.store.items()), self.now_ms)
        assert restored.list_groups() == self.h.list_groups()
        for g in self.h.list_groups():
            assert restored.describe(g["group_id"]) == self.h.describe(g["group_id"])


GroupMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_group_machine = GroupMachine.TestCase
