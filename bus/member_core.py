"""A consumer group member's states and timers, sans I/O: which request its heartbeat thread makes next and
when, what each answer changes, and when the member is lost, left or lapsed.

Pure: no socket, no thread, no clock and no lock. Every method takes ``now_ms`` (bus/clock.py's monotonic
milliseconds) and the answers as values; a new member id comes from the ``new_member_id`` callable it is
given. bus/group_member.py is its shell: it holds ``GroupMember._lock`` around every call, sends what
``next_request()`` returns on its own DEALER, from its own heartbeat thread (so the member's liveness never
depends on the thread that polls, nor on an asyncio loop: bus/aio.py), and does the reconciliation (commits,
offset fetches, callbacks) in the polling thread. tests/test_member_core.py drives it with a fake clock.

States: JOINING -> MEMBER on a join's answer; MEMBER -> LOST when a heartbeat is fenced (UnknownMemberId,
FencedMemberEpoch), MEMBER -> LEFT when poll() was not called for ``max_poll_interval_ms`` (time blocked
inside a poll() counts as polling, as in Kafka); LOST and LEFT -> JOINING once the polling thread dropped
the partitions (``rejoin``); any -> CLOSED.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from . import wire
from .errors import BusError, FencedMemberEpoch, InvalidRequest, UnknownMemberId
from .clock import LOOP_WAIT_MS_MAX
from .records import TopicPartition

log = logging.getLogger("bus.group")

JOINING = "joining"  # the heartbeat thread is joining under ``member_id``
MEMBER = "member"  # joined; heartbeating
LOST = "lost"  # fenced or evicted: the user's thread must drop every partition, then rejoin
LEFT = "left"  # left for max_poll_interval: as LOST, on the next poll()
CLOSED = "closed"


class MemberCore:
    """One member's state. ``join_fields``: the join request's fixed arguments (group, client id, instance
    id, subscription, session, assignor)."""

    def __init__(self, *, join_fields: dict[str, Any], session_timeout_ms: int, heartbeat_interval_ms: int,
                 max_poll_interval_ms: int, new_member_id: Callable[[], str], now_ms: int) -> None:
        self.join_fields = join_fields
        self.group_id: str = join_fields["group_id"]
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.max_poll_interval_ms = max_poll_interval_ms
        # A failed attempt is retried within a third of the session: a member whose coordinator is down
        # still completes an attempt every session.
        self.retry_backoff_ms = max(1, min(heartbeat_interval_ms, session_timeout_ms // 3))
        self.new_member_id = new_member_id
        self.state = JOINING
        self.member_id = new_member_id()  # chosen here: a retried join finds its member
        self.epoch: int = 0  # the member epoch of the latest reply
        # The partitions the latest reply says this member may own.
        self.granted: frozenset[TopicPartition] = frozenset()
        # The partitions the consumer reads now; changed by the polling thread only.
        self.applied: set[TopicPartition] = set()
        self.adding: set[TopicPartition] = set()  # being added by the polling thread (committed offsets being fetched)
        self.lost_error: BusError | None = None  # why the member was fenced, evicted or left
        self.join_error: BusError | None = None  # a join refusal for poll() to raise, once
        self.force_heartbeat = False
        self.closing = False
        self.reconcile_pending = False  # poll() has work to do
        self.last_poll_ms = now_ms  # when poll() last began or ended
        self.poll_until_ms = now_ms  # the latest a poll() in progress may block until (its timeout)
        self.last_attempt_ms = now_ms  # start time of the latest completed heartbeat or join attempt
        self.next_attempt_ms = 0  # no join or heartbeat before this

    # -- the heartbeat thread -------------------------------------------------------------------------

    def next_request(self, now_ms: int) -> tuple[str | None, dict[str, Any] | int]:
        """(op, args) of the request to make now, or (None, how many ms to wait before asking again). A
        member that has not polled for ``max_poll_interval_ms`` leaves: the state is LEFT from here on."""
        polled_ms = max(self.last_poll_ms, min(now_ms, self.poll_until_ms))  # now, inside poll()
        if self.state == MEMBER and now_ms - polled_ms > self.max_poll_interval_ms:
            log.warning("group %s: poll() not called for %d ms (max_poll_interval_ms=%d); leaving the group, the "
                        "next poll() rejoins", self.group_id, now_ms - polled_ms, self.max_poll_interval_ms)
            args = {"group_id": self.group_id, "member_id": self.member_id, "member_epoch": self.epoch,
                    "reason": "max_poll_interval"}
            self.set_lost(LEFT, UnknownMemberId(
                f"member {self.member_id} left group {self.group_id!r}: poll() was not called within "
                f"max_poll_interval_ms={self.max_poll_interval_ms}"))
            return wire.GROUP_LEAVE, args
        if self.state == JOINING and now_ms >= self.next_attempt_ms:
            return wire.GROUP_JOIN, {**self.join_fields, "member_id": self.member_id}
        if self.state == MEMBER and (self.force_heartbeat or now_ms >= self.next_attempt_ms):
            self.force_heartbeat = False
            owned = self.applied | self.granted | self.adding
            return wire.GROUP_HEARTBEAT, {"group_id": self.group_id, "member_id": self.member_id,
                                          "member_epoch": self.epoch, "owned": sorted([t, p] for t, p in owned)}
        wait_ms = min(LOOP_WAIT_MS_MAX, max(1, self.next_attempt_ms - now_ms))
        if self.state == MEMBER:
            poll_deadline_ms = max(self.last_poll_ms, self.poll_until_ms) + self.max_poll_interval_ms + 1
            wait_ms = min(wait_ms, max(1, poll_deadline_ms - now_ms))
        return None, wait_ms

    def answered(self, op: str, member_id: str, result: Any, error: BusError | None, started_ms: int,
                 now_ms: int) -> bool:
        """Take the answer to ``op`` (asked under ``member_id`` at ``started_ms``); returns whether the
        polling thread has work now."""
        self.last_attempt_ms = max(self.last_attempt_ms, started_ms)
        if op == wire.GROUP_JOIN:
            self.next_attempt_ms, wake = self._joined(member_id, result, error, started_ms, now_ms)
        elif op == wire.GROUP_HEARTBEAT:
            self.next_attempt_ms, wake = self._heartbeat_answered(member_id, result, error, started_ms, now_ms)
        else:
            wake = True  # left: the next poll() drops the partitions and rejoins
        return wake

    def _joined(self, member_id: str, result: Any, error: BusError | None, started_ms: int, now_ms: int
                ) -> tuple[int, bool]:
        if self.state != JOINING or self.member_id != member_id:
            return now_ms, False
        if error is None:
            self.state = MEMBER
            self.epoch = result["member_epoch"]
            self.granted = frozenset(TopicPartition(t, p) for t, p in result["assignment"])
            log.info("group %s: joined as %s at epoch %d with %d partition(s)", self.group_id, member_id,
                     self.epoch, len(self.granted))
            self.reconcile_pending = bool(self.granted)
            return started_ms + self.heartbeat_interval_ms, self.reconcile_pending
        if error.retriable:
            log.info("group %s: join not answered (%s); retrying", self.group_id, error)
            return now_ms + self.retry_backoff_ms, False
        if type(error) is InvalidRequest:  # e.g. "member id is being evicted": join under a new id
            self.member_id = self.new_member_id()
            return now_ms + self.retry_backoff_ms, False
        # INVALID_CONFIG, INCONSISTENT_ASSIGNOR, GROUP_FULL ...: the user must hear of it; keep trying slowly.
        log.warning("group %s: join refused: %s", self.group_id, error)
        self.join_error = error
        return now_ms + max(self.retry_backoff_ms, min(self.session_timeout_ms, 1_000)), True

    def _heartbeat_answered(self, member_id: str, result: Any, error: BusError | None, started_ms: int, now_ms: int
                            ) -> tuple[int, bool]:
        if self.state != MEMBER or self.member_id != member_id:
            return now_ms, False
        if error is None:
            self.epoch = result["member_epoch"]
            self.granted = frozenset(TopicPartition(t, p) for t, p in result["assignment"])
            if self.granted != self.applied:
                self.reconcile_pending = True
            return started_ms + self.heartbeat_interval_ms, self.reconcile_pending
        if isinstance(error, (UnknownMemberId, FencedMemberEpoch)):
            log.warning("group %s: member %s fenced: %s", self.group_id, member_id, error)
            self.set_lost(LOST, error)
            return now_ms, True
        log.info("group %s: heartbeat failed (%s); retrying", self.group_id, error)
        return now_ms + self.retry_backoff_ms, False

    # -- the polling thread ---------------------------------------------------------------------------

    def set_lost(self, state: str, error: BusError) -> None:
        """The member is gone (LOST or LEFT); the polling thread drops its partitions at the next poll()."""
        assert state in (LOST, LEFT), state
        self.state = state
        self.lost_error = error
        self.reconcile_pending = True

    def rejoin(self) -> None:
        """After the polling thread dropped every partition of a lost or left member: join again, anew."""
        assert self.state in (LOST, LEFT), self.state
        self.applied.clear()
        self.adding.clear()
        self.granted = frozenset()
        self.epoch = 0
        self.member_id = self.new_member_id()
        self.state = JOINING
        self.reconcile_pending = False

    def polling(self, now_ms: int, timeout_ms: int) -> None:
        """A poll() begins, and may block up to ``timeout_ms``: all of it counts as polling."""
        self.last_poll_ms = now_ms
        self.poll_until_ms = now_ms + max(0, timeout_ms)

    def polled(self, now_ms: int) -> None:
        """A poll() ended: from now on the user's handler runs, timed by max_poll_interval_ms."""
        self.last_poll_ms = self.poll_until_ms = now_ms

    def lapsed(self, now_ms: int) -> bool:
        """Whether no heartbeat attempt began within the last session timeout: the coordinator may have
        evicted this member without it knowing yet (a frozen process)."""
        return self.state == MEMBER and not self.closing and now_ms - self.last_attempt_ms > self.session_timeout_ms

    def poll_is_quick(self, now_ms: int) -> bool:
        """Whether a poll() now has nothing to reconcile, no join refusal to raise and no heartbeat to wait
        for (see GroupMember.on_poll_is_quick)."""
        if self.reconcile_pending or self.join_error is not None:
            return False
        if self.state == JOINING:
            return True
        return (self.state == MEMBER and self.granted == self.applied and not self.adding
                and not self.lapsed(now_ms))

    def check_invariants(self) -> None:
        """What holds between any two calls."""
        assert self.state in (JOINING, MEMBER, LOST, LEFT, CLOSED), self.state
        assert self.poll_until_ms >= self.last_poll_ms, (self.poll_until_ms, self.last_poll_ms)
        assert self.state != JOINING or self.epoch == 0, (self.state, self.epoch)
        assert self.state not in (LOST, LEFT) or (self.lost_error is not None and self.reconcile_pending), self.state
