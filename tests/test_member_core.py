"""bus.member_core, the group member's states and timers, on a fake clock: what its heartbeat thread asks
next and when, liveness apart from progress (a member that does not poll keeps heartbeating until
max_poll_interval_ms, and leaves 1 ms after it, never before; time blocked inside poll() is polling), a lost
session seen by ``lapsed``, fencing, join refusals, rejoining. tests/test_aio.py is the pair over a real
cluster."""

from __future__ import annotations

import itertools

from bus import wire
from bus.errors import FencedMemberEpoch, GroupFull, InvalidRequest, NodeUnavailable, UnknownMemberId
from bus.member_core import JOINING, LEFT, LOST, MEMBER, MemberCore

SESSION_MS, HEARTBEAT_MS, MAX_POLL_MS = 1_000, 100, 5_000


def make(now_ms: int = 0) -> MemberCore:
    ids = (f"m-{i}" for i in itertools.count())
    return MemberCore(join_fields={"group_id": "g", "client_id": "c", "group_instance_id": None, "topics": ["t"],
                                   "pattern": None, "session_timeout_ms": SESSION_MS, "assignor": "sticky"},
                      session_timeout_ms=SESSION_MS, heartbeat_interval_ms=HEARTBEAT_MS,
                      max_poll_interval_ms=MAX_POLL_MS, new_member_id=lambda: next(ids), now_ms=now_ms)


def joined(core: MemberCore, now_ms: int = 0, assignment=(("t", 0),)) -> None:
    op, args = core.next_request(now_ms)
    assert op == wire.GROUP_JOIN and args["member_id"] == core.member_id and args["topics"] == ["t"]
    core.answered(op, args["member_id"], {"member_epoch": 1, "assignment": [list(a) for a in assignment]}, None,
                  now_ms, now_ms)
    core.check_invariants()


def test_joins_then_heartbeats_every_interval_reporting_what_it_owns():
    core = make()
    joined(core)
    assert core.state == MEMBER and core.reconcile_pending and core.granted == {("t", 0)}
    assert core.next_request(HEARTBEAT_MS - 1) == (None, 1)  # not due yet: wait 1 ms
    op, args = core.next_request(HEARTBEAT_MS)
    assert op == wire.GROUP_HEARTBEAT and args["owned"] == [["t", 0]] and args["member_epoch"] == 1
    core.answered(op, "m-0", {"member_epoch": 2, "assignment": [["t", 0], ["t", 1]]}, None, HEARTBEAT_MS,
                  HEARTBEAT_MS + 5)
    assert core.epoch == 2 and core.granted == {("t", 0), ("t", 1)}
    assert core.next_request(2 * HEARTBEAT_MS)[0] == wire.GROUP_HEARTBEAT  # timed from the attempt's start
    core.check_invariants()


def test_a_member_that_does_not_poll_heartbeats_until_max_poll_interval_and_leaves_one_ms_after():
    core = make()
    joined(core)
    core.polling(0, 0)
    core.polled(0)  # the handler runs from here on, and never polls again
    now_ms = 0
    while now_ms < MAX_POLL_MS:  # far past the session: liveness does not depend on polling
        now_ms += HEARTBEAT_MS
        op, args = core.next_request(now_ms)
        assert op == wire.GROUP_HEARTBEAT, now_ms
        core.answered(op, core.member_id, {"member_epoch": 1, "assignment": [["t", 0]]}, None, now_ms, now_ms)
        assert not core.lapsed(now_ms)
    assert core.next_request(MAX_POLL_MS)[0] is None  # exactly at the limit: still a member
    assert core.state == MEMBER
    op, args = core.next_request(MAX_POLL_MS + 1)
    assert op == wire.GROUP_LEAVE and args["reason"] == "max_poll_interval" and args["member_id"] == "m-0"
    assert core.state == LEFT and core.reconcile_pending and "max_poll_interval_ms" in str(core.lost_error)
    core.check_invariants()
    core.rejoin()
    assert core.state == JOINING and core.member_id == "m-1" and core.epoch == 0 and not core.applied
    assert core.next_request(core.next_attempt_ms)[0] == wire.GROUP_JOIN


def test_time_blocked_inside_poll_counts_as_polling():
    core = make()
    joined(core)
    core.polling(0, 3 * MAX_POLL_MS)  # a long poll() with nothing to read
    for now_ms in range(HEARTBEAT_MS, 3 * MAX_POLL_MS, HEARTBEAT_MS):
        op, _ = core.next_request(now_ms)
        assert op == wire.GROUP_HEARTBEAT, now_ms
        core.answered(op, core.member_id, {"member_epoch": 1, "assignment": [["t", 0]]}, None, now_ms, now_ms)
    core.polled(3 * MAX_POLL_MS)
    assert core.state == MEMBER
    assert core.next_request(4 * MAX_POLL_MS + 1)[0] == wire.GROUP_LEAVE  # its handler then stalled


def test_the_wait_never_sleeps_past_the_max_poll_deadline():
    core = make()
    joined(core)
    core.next_attempt_ms = 10 * MAX_POLL_MS  # no heartbeat due for long (say, a backoff)
    op, wait_ms = core.next_request(MAX_POLL_MS - 10)
    assert op is None and wait_ms <= 100  # at most LOOP_WAIT_MS_MAX, and never past the deadline


def test_no_attempt_within_a_session_is_lapsed_one_ms_after_not_before():
    core = make()
    joined(core, now_ms=0)
    assert not core.lapsed(SESSION_MS) and core.poll_is_quick(SESSION_MS) is False  # reconcile pending
    core.reconcile_pending = False
    core.applied = {("t", 0)}
    assert core.poll_is_quick(SESSION_MS)
    assert core.lapsed(SESSION_MS + 1) and not core.poll_is_quick(SESSION_MS + 1)


def test_a_fenced_heartbeat_loses_the_member_a_retriable_failure_retries_after_the_backoff():
    core = make()
    joined(core)
    op, _ = core.next_request(HEARTBEAT_MS)
    core.answered(op, "m-0", None, NodeUnavailable("down"), HEARTBEAT_MS, HEARTBEAT_MS + 3)
    assert core.state == MEMBER and core.next_attempt_ms == HEARTBEAT_MS + 3 + core.retry_backoff_ms
    op, _ = core.next_request(core.next_attempt_ms)
    core.answered(op, "m-0", None, FencedMemberEpoch("fenced"), 300, 301)
    assert core.state == LOST and isinstance(core.lost_error, FencedMemberEpoch)
    assert core.next_request(10_000)[0] is None  # a lost member asks nothing until the poller drops all
    core.check_invariants()


def test_answers_for_an_old_member_id_change_nothing():
    core = make()
    joined(core)
    op, _ = core.next_request(HEARTBEAT_MS)
    core.answered(op, "m-0", None, UnknownMemberId("gone"), HEARTBEAT_MS, HEARTBEAT_MS)
    core.rejoin()
    assert core.member_id == "m-1"
    late = {"member_epoch": 7, "assignment": [["t", 3]]}
    core.answered(wire.GROUP_HEARTBEAT, "m-0", late, None, 0, 0)
    core.answered(wire.GROUP_JOIN, "m-0", late, None, 0, 0)
    assert core.state == JOINING and core.epoch == 0 and core.granted == frozenset()


def test_join_refusals_are_kept_for_poll_and_an_evicted_id_joins_anew():
    core = make()
    op, args = core.next_request(0)
    assert core.answered(op, args["member_id"], None, GroupFull("full"), 0, 0) is True
    assert isinstance(core.join_error, GroupFull) and not core.poll_is_quick(0)
    assert core.next_request(core.next_attempt_ms - 1)[0] is None  # slowly: not before the longer backoff
    core.join_error = None
    op, args = core.next_request(core.next_attempt_ms)
    core.answered(op, args["member_id"], None, InvalidRequest("member id is being evicted"), 0, 0)
    assert core.member_id == "m-1" and core.state == JOINING
