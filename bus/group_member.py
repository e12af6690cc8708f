"""The client side of a consumer group, run inside a Consumer: membership, heartbeats, cooperative
reconciliation of the assignment, and offset commits.

This module owns what a member does; the coordinator (nodes/group_service.py over nodes/groups.py) owns
what the group decides. It must never let a partition be read by this consumer while the coordinator may
already have granted it to another member, and never commit an offset past a record ``poll()`` has not
returned (at-least-once: a record is handled once the next ``poll()`` is called, or ``commit()`` is).

The member's states and timers (joining, member, lost, left; when to heartbeat, when max_poll_interval_ms
has passed, what an answer changes) are a pure core, bus/member_core.py, that this module drives under
``GroupMember._lock``; what is left here is the I/O, the threads and the reconciliation.

Threads (DESIGN.md: liveness is not progress):
- The heartbeat thread owns its own DEALER to the coordinator. It joins, heartbeats every
  ``heartbeat_interval_ms`` with the member epoch and the partitions owned, and takes the coordinator's
  answer (the partitions this member may own now). A slow handler in the user's thread therefore never
  costs the membership; ``max_poll_interval_ms`` guards progress instead: when ``poll()`` has not been
  called for that long, this thread leaves the group with reason "max_poll_interval".
- The user's thread, at the start of every ``poll()``, reconciles: for partitions the coordinator took
  away, it commits their positions (auto-commit on), calls ``on_revoke``, removes them from the consumer,
  and only then stops reporting them (the coordinator hands a partition on once the heartbeat no longer
  reports it). For partitions granted, it fetches the committed offsets (else ``auto_offset_reset``),
  adds them to the consumer and calls ``on_assign``. A member the coordinator fenced or evicted drops all
  its partitions as lost (``on_lost``, else ``on_revoke``), rejoins under a new member id, and goes on.
- The committer thread (started by the first asynchronous or automatic commit) sends those commits in
  order, so a slow coordinator never blocks ``poll()``.

What a heartbeat reports as owned is ``applied | granted | adding`` (below): everything the consumer reads
or may start reading. Reporting more than needed only delays a hand-over; reporting less could let two
members read one partition, so the user's thread removes a partition from ``applied`` only after the
consumer dropped it.

A frozen process (SIGSTOP, a long GC pause) cannot know it was evicted until it asks. So when no heartbeat
attempt began within the last session timeout, ``poll()`` first waits (briefly) for a fresh one: a live
coordinator answers at once, and an evicted member drops its partitions before it reads any more of them.
A freeze can also land inside ``poll()``, with records taken or arriving meanwhile: ``poll()`` checks again
before it returns, and hands nothing out after such a freeze, nor once the member knows it was fenced or
evicted (``on_records``).
If the coordinator is down, attempts keep failing quickly and the member keeps reading what it owns.

Lock order: ``GroupMember._lock`` is never held while taking ``Consumer._lock`` or calling anything that
takes it; code holding ``Consumer._lock`` only reads ``GroupMember.reconcile_pending``, a plain flag.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Set
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from . import wire
from .clock import monotonic_ms
from .connection import Connection
from .errors import (
    BusError,
    ClosedError,
    ConfigError,
    FencedMemberEpoch,
    OffsetOutOfRange,
    Timeout,
    UnknownMemberId,
)
from .member_core import CLOSED, LEFT, LOST, MEMBER, MemberCore
from .records import CommitCallback, CommitOffsets, PartitionsCallback, Record, TopicPartition

if TYPE_CHECKING:
    from .consumer import Consumer

# A commit's offsets once checked: {tp: (offset, metadata or None)}.
Offsets: TypeAlias = dict[TopicPartition, tuple[int, str | None]]

log = logging.getLogger("bus.group")

ASSIGNORS = ("range", "roundrobin", "sticky")  # as nodes/assignors.py; the coordinator checks again
NAME_CHARS_MAX = 249
CLIENT_ID_CHARS_MAX = 200  # leaves room for the "-<uuid>" of a member id within NAME_CHARS_MAX
PATTERN_CHARS_MAX = 1_000
SESSION_TIMEOUT_MS_MAX = 30 * 60 * 1000
INTERVAL_MS_MAX = 24 * 3600 * 1000
COMMIT_QUEUE_MAX = 64  # asynchronous commits waiting for the committer thread
RECONCILE_PASSES_MAX = 4  # per poll(): each pass acts on the latest assignment
CLOSE_WAIT_S_MAX = 5.0  # close() waits at most this long for queued asynchronous commits



def _check_name(what: str, value: object, chars_max: int = NAME_CHARS_MAX) -> None:
    if not isinstance(value, str) or not value or len(value) > chars_max or "\x00" in value:
        raise ConfigError(f"{what} must be a string of 1..{chars_max} characters without NUL, not {value!r}")


def _check_ms(what: str, value: object, high: int = INTERVAL_MS_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= high:
        raise ConfigError(f"{what} must be an integer of milliseconds in 1..{high}, not {value!r}")
    return value


def _check_callback(what: str, fn: object) -> None:
    if fn is not None and not callable(fn):
        raise ConfigError(f"{what} must be callable or None, not {fn!r}")


def check_subscription(topics: Any, pattern: Any) -> tuple[list[str] | None, str | None]:
    """(sorted topic names, None) or (None, pattern) for a subscription given as ``topics`` (names, or a
    compiled regular expression) or ``pattern`` (a str); a ConfigError for anything else."""
    if isinstance(topics, re.Pattern):
        if pattern is not None:
            raise ConfigError("pass a pattern either as topics=re.compile(...) or as pattern=..., not both")
        topics, pattern = None, topics.pattern
    if (topics is None) == (pattern is None):
        raise ConfigError("subscribe with exactly one of topics=[...] or pattern=...")
    if topics is not None:
        if isinstance(topics, (str, bytes)) or not isinstance(topics, (list, tuple, set, frozenset)) or not topics:
            raise ConfigError(f"topics must be a non-empty list of topic names, not {topics!r}")
        for topic in topics:
            _check_name("a topic name", topic)
        return sorted(set(topics)), None
    if not isinstance(pattern, str) or not pattern or len(pattern) > PATTERN_CHARS_MAX:
        raise ConfigError(f"pattern must be a regular expression of 1..{PATTERN_CHARS_MAX} characters")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"pattern {pattern!r} does not compile: {exc}") from None
    return None, pattern


class GroupMember:
    """One consumer's membership of ``group``. Built by ``Consumer(..., topics=..., group=...)``."""

    def __init__(self, consumer: Consumer[Any, Any], group: str, topics: Iterable[str] | re.Pattern[str] | None = None,
                 *, pattern: str | None = None,
                 session_timeout_ms: int = 10_000, heartbeat_interval_ms: int = 1_000,
                 max_poll_interval_ms: int = 300_000, enable_auto_commit: bool = True,
                 auto_commit_interval_ms: int = 5_000, group_instance_id: str | None = None,
                 assignor: str = "sticky", client_id: str | None = None, on_assign: PartitionsCallback | None = None,
                 on_revoke: PartitionsCallback | None = None, on_lost: PartitionsCallback | None = None,
                 on_commit: CommitCallback | None = None) -> None:
        _check_name("group", group)
        topics, pattern = check_subscription(topics, pattern)
        _check_ms("session_timeout_ms", session_timeout_ms, SESSION_TIMEOUT_MS_MAX)
        _check_ms("heartbeat_interval_ms", heartbeat_interval_ms)
        _check_ms("max_poll_interval_ms", max_poll_interval_ms)
        _check_ms("auto_commit_interval_ms", auto_commit_interval_ms)
        if heartbeat_interval_ms >= session_timeout_ms:
            raise ConfigError(f"heartbeat_interval_ms ({heartbeat_interval_ms}) must be below session_timeout_ms "
                              f"({session_timeout_ms}); a third of it is usual")
        if not isinstance(enable_auto_commit, bool):
            raise ConfigError(f"enable_auto_commit must be True or False, not {enable_auto_commit!r}")
        if group_instance_id is not None:
            _check_name("group_instance_id", group_instance_id)
        if assignor not in ASSIGNORS:
            raise ConfigError(f"assignor must be one of {ASSIGNORS}, not {assignor!r}")
        if client_id is None:
            client_id = f"consumer-{os.getpid()}"
        _check_name("client_id", client_id, CLIENT_ID_CHARS_MAX)
        for what, fn in (("on_assign", on_assign), ("on_revoke", on_revoke), ("on_lost", on_lost),
                         ("on_commit", on_commit)):
            _check_callback(what, fn)

        self.consumer = consumer
        self.group_id = group
        self.topics = topics  # explicit subscription, or None
        self.pattern = pattern  # regular expression (re.fullmatch over topic names), or None
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.max_poll_interval_ms = max_poll_interval_ms
        self.enable_auto_commit = enable_auto_commit
        self.auto_commit_interval_ms = auto_commit_interval_ms
        self.group_instance_id = group_instance_id
        self.assignor = assignor
        self.client_id = client_id
        self.on_assign, self.on_revoke, self.on_lost, self.on_commit = on_assign, on_revoke, on_lost, on_commit
        # A heartbeat or join attempt ends within a third of the session, and a failed one is retried within
        # another third (MemberCore.retry_backoff_ms): a member whose coordinator is down still completes an
        # attempt every session.
        self._heartbeat_timeout_ms = max(1, session_timeout_ms // 3)
        # Commits and offset fetches come from the user's thread; a dead coordinator must not block it long.
        self._request_timeout_ms = max(1, min(consumer.request_timeout_ms, session_timeout_ms))

        self._lock = threading.Condition()
        now_ms = monotonic_ms()
        # The membership's states and timers (bus/member_core.py): read and changed under _lock only.
        self._core = MemberCore(
            join_fields={"group_id": group, "client_id": client_id, "group_instance_id": group_instance_id,
                         "topics": topics, "pattern": pattern, "session_timeout_ms": session_timeout_ms,
                         "assignor": assignor},
            session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_interval_ms=max_poll_interval_ms, new_member_id=self._new_member_id, now_ms=now_ms)
        self._next_auto_commit_ms = now_ms + auto_commit_interval_ms
        self._committed: dict[TopicPartition, int] = {}  # tp -> offset this incarnation committed last (unchanged: not resent)
        self._auto_commit_inflight = False
        # (offsets, callback, member id) of each asynchronous commit; None stops the committer.
        self._commit_queue: queue.Queue[tuple[Offsets, CommitCallback | None, str] | None] | None = None
        self._commits_waiting = 0  # asynchronous commits queued or being sent
        self._committer: threading.Thread | None = None
        self._thread = threading.Thread(target=self._heartbeat_loop, name="bus-group-heartbeat", daemon=True)
        self._thread.start()

    # -- public (through the Consumer) ---------------------------------------------------------------

    # The core's state and last attempt under their old names: tests/test_faults_groups.py sets them (under
    # _lock) to stand for a freeze inside poll() and for a fencing learned meanwhile.
    _state = property(lambda self: self._core.state, lambda self, value: setattr(self._core, "state", value))
    _last_attempt_ms = property(lambda self: self._core.last_attempt_ms,
                                lambda self, value: setattr(self._core, "last_attempt_ms", value))

    @property
    def reconcile_pending(self) -> bool:
        """Whether poll() has work to do: a plain flag, read without the lock by Consumer.poll."""
        return self._core.reconcile_pending

    @property
    def member_id(self) -> str:
        with self._lock:
            return self._core.member_id

    @property
    def member_epoch(self) -> int:
        with self._lock:
            return self._core.epoch

    @property
    def state(self) -> str:
        with self._lock:
            return self._core.state

    def commit(self, offsets: CommitOffsets | None = None) -> dict[TopicPartition, int]:
        """Commit ``offsets`` ({tp: offset} or {tp: (offset, metadata)}), by default the positions of what
        poll() returned for every partition this member reads. Synchronous; returns {tp: committed offset}.
        Raises FencedMemberEpoch / UnknownMemberId if the member was fenced (it then rejoins on poll())."""
        checked = self._positions(self._applied_now()) if offsets is None else self._normalize(offsets)
        return self._commit_sync(checked)

    def commit_async(self, offsets: CommitOffsets | None = None, callback: CommitCallback | None = None) -> None:
        """As ``commit`` but in the committer thread; ``callback(offsets, exception_or_None)`` afterwards."""
        _check_callback("callback", callback)
        checked = self._positions(self._applied_now()) if offsets is None else self._normalize(offsets)
        self._enqueue_commit(checked, callback, block=True)

    def committed(self, tp: tuple[str, int]) -> int | None:
        """The offset the group committed for ``tp`` (None if none)."""
        tp = TopicPartition(*tp)
        return self._fetch_committed([tp])[tp]

    # -- hooks called by the Consumer ------------------------------------------------------------------

    def on_poll(self, timeout_ms: int = 0) -> None:
        """Start of every poll() (and again when woken with work): raise a join refusal, notice a lost
        session, reconcile, auto-commit. Time blocked inside poll() counts as polling, as in Kafka."""
        now_ms = monotonic_ms()
        with self._lock:
            self._core.polling(now_ms, timeout_ms)
            error, self._core.join_error = self._core.join_error, None
        if error is not None:
            raise error
        self._check_session()
        for _ in range(RECONCILE_PASSES_MAX):
            if self._drop_if_lost():
                continue
            if self._reconcile():
                break
        if self.enable_auto_commit:
            self._maybe_auto_commit(now_ms)

    def on_poll_is_quick(self) -> bool:
        """Whether ``on_poll()`` would now make no request, wait for no heartbeat and call no callback: nothing
        to reconcile, not lost, not lapsed. bus.aio polls in the event loop's thread only then (and in a worker
        thread otherwise), so that a rebalance's commits and offset fetches never block the loop."""
        with self._lock:
            return self._core.poll_is_quick(monotonic_ms())

    def on_records(self, records: list[Record]) -> bool:
        """End of every poll(): from now on the user's handler runs, timed by max_poll_interval_ms.

        Returns False when ``records`` must not be handed out, because their partitions may belong to another
        member by now: the member learned meanwhile that it was fenced, evicted or left (the next poll() drops
        its partitions as lost), or no heartbeat attempt began within the last session timeout, so the process
        was frozen (or starved) inside this poll() and the coordinator may have evicted it without it knowing
        yet (the next poll() first waits for a fresh heartbeat, ``_check_session``). The Consumer puts them
        back."""
        now_ms = monotonic_ms()
        with self._lock:
            self._core.last_poll_ms = self._core.poll_until_ms = now_ms
            if not records:
                return True
            return self._core.state not in (LOST, LEFT) and not self._core.lapsed(now_ms)

    def close(self) -> None:
        """Commit what poll() returned (auto-commit on), call on_revoke, and leave so the partitions move now.

        A static member (``group_instance_id``) does not leave: as in Kafka, its partitions wait for it
        (or for its session timeout) so a restart does not rebalance the group.
        """
        with self._lock:
            if self._core.state == CLOSED or self._core.closing:
                return
            was_member = self._core.state == MEMBER
            was_lost = self._core.state in (LOST, LEFT)
        try:
            if was_member:
                applied = self._applied_now()
                if self.enable_auto_commit and applied:
                    self._drain_commits()
                    try:
                        self._commit_sync(self._positions(applied))
                    except BusError as exc:
                        log.warning("group %s: commit on close failed: %s", self.group_id, exc)
                if applied:
                    self._call(self.on_revoke, sorted(applied))
            elif was_lost:
                # Fenced or evicted, and closed before a poll() dropped them: they are lost, not given
                # back (as Kafka's close calls onPartitionsLost for a fenced member); nothing to commit.
                applied = self._applied_now()
                if applied:
                    self._call(self.on_lost or self.on_revoke, sorted(applied))
        finally:
            with self._lock:
                self._core.closing = True
                self._lock.notify_all()
            self._thread.join()
            self._stop_committer()
            with self._lock:  # read after the thread stopped: a join answered meanwhile must be left too
                still_member = self._core.state == MEMBER
                member_id, epoch = self._core.member_id, self._core.epoch
            if still_member and self.group_instance_id is None:
                try:
                    self.consumer._requester.coordinator(wire.GROUP_LEAVE, {
                        "group_id": self.group_id, "member_id": member_id, "member_epoch": epoch, "reason": "left"},
                        timeout_ms=self._request_timeout_ms)
                except BusError as exc:
                    log.info("group %s: leave on close failed (the session timeout will do): %s", self.group_id, exc)
            with self._lock:
                self._core.state = CLOSED
                self._lock.notify_all()

    # -- the heartbeat thread ---------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        connection: Connection | None = None
        result: Any
        error: BusError | None
        try:
            while True:
                with self._lock:
                    if self._core.closing:
                        return
                    op, args = self._core.next_request(monotonic_ms())
                    if op is None:
                        self._lock.wait(cast(int, args) / 1000)  # args: how long to wait, in ms
                        continue
                    if op == wire.GROUP_LEAVE:
                        self._lock.notify_all()  # left for max_poll_interval: a poll() waiting for a heartbeat
                    member_id = self._core.member_id
                if connection is None:
                    connection = Connection(self.consumer._context, self.consumer.bootstrap)
                started_ms = monotonic_ms()
                try:
                    result, _ = connection.request(op, args, timeout_ms=self._heartbeat_timeout_ms)
                    error = None
                except BusError as exc:
                    result, error = None, exc
                if error is not None and error.retriable:
                    # A fresh socket: nothing queued for a dead coordinator is delivered late to a new one.
                    connection.close()
                    connection = None
                with self._lock:
                    wake = self._core.answered(op, member_id, result, error, started_ms, monotonic_ms())
                    self._lock.notify_all()
                if wake:
                    self._wake_consumer()
        except Exception:
            log.exception("group %s: heartbeat thread failed", self.group_id)
            raise
        finally:
            if connection is not None:
                connection.close()

    def _wake_consumer(self) -> None:
        with self.consumer._lock:
            self.consumer._data.notify_all()
        self.consumer._wake()  # a poll() waiting in the fetcher's loop (Consumer._wait_for_data) wakes by it

    # -- the user's thread: reconciliation ------------------------------------------------------------

    def _check_session(self) -> None:
        """After a freeze longer than the session, wait for a fresh heartbeat before reading on."""
        with self._lock:
            now_ms = monotonic_ms()
            if not self._core.lapsed(now_ms):
                return
            self._core.force_heartbeat = True
            self._lock.notify_all()
            deadline_ms = now_ms + self._heartbeat_timeout_ms + 200
            while self._core.state == MEMBER and self._core.last_attempt_ms < now_ms and not self._core.closing:
                remaining_ms = deadline_ms - monotonic_ms()
                if remaining_ms <= 0:
                    break
                self._lock.wait(remaining_ms / 1000)

    def _drop_if_lost(self) -> bool:
        """If fenced, evicted or left: drop every partition (on_lost), rejoin as a new member. True if so."""
        with self._lock:
            if self._core.state not in (LOST, LEFT) or self._core.closing:
                return False
            lost = sorted(self._core.applied)
            error = self._core.lost_error
        self.consumer._set_assignment([])
        with self._lock:
            self._core.rejoin()
            self._committed.clear()
            self._lock.notify_all()
        log.warning("group %s: lost %d partition(s) (%s); rejoining", self.group_id, len(lost), error)
        if lost:
            self._call(self.on_lost or self.on_revoke, lost)
        return True

    def _reconcile(self) -> bool:
        """One pass towards the granted assignment. True when there is nothing (more) to do now."""
        with self._lock:
            self._core.reconcile_pending = False
            if self._core.state != MEMBER or self._core.closing:
                return True
            granted = self._core.granted
            revoke = self._core.applied - granted
            add = granted - self._core.applied
            if not revoke and not add:
                return True
            self._core.adding = set(add)
            member_id = self._core.member_id
        if revoke and not self._revoke(revoke, member_id):
            return False
        if add and not self._add(add, member_id):
            return True  # offsets not fetched (coordinator down?): the next poll() tries again
        return False

    def _revoke(self, revoke: Set[TopicPartition], member_id: str) -> bool:
        if self.enable_auto_commit:
            try:
                self._commit_sync(self._positions(revoke), member_id)
            except (UnknownMemberId, FencedMemberEpoch):
                with self._lock:
                    self._core.adding.clear()
                return False  # fenced meanwhile: everything is dropped as lost instead
            except BusError as exc:
                # Given back all the same: the next owner starts at the last commit (at-least-once).
                log.warning("group %s: commit of revoked partitions failed: %s", self.group_id, exc)
        self._call(self.on_revoke, sorted(revoke))
        with self._lock:
            keep = sorted(self._core.applied - revoke)
        self.consumer._set_assignment(keep)
        with self._lock:
            self._core.applied -= revoke
            for tp in revoke:
                self._committed.pop(tp, None)
            self._core.force_heartbeat = True  # tell the coordinator now, so the partitions move at once
            self._lock.notify_all()
        return True

    def _add(self, add: Set[TopicPartition], member_id: str) -> bool:
        try:
            committed = self._fetch_committed(sorted(add))
        except BusError as exc:
            log.warning("group %s: fetching committed offsets failed: %s", self.group_id, exc)
            with self._lock:
                self._core.adding.clear()
            return False
        positions = {tp: offset for tp, offset in committed.items() if offset is not None}
        with self._lock:
            if self._core.state != MEMBER or self._core.member_id != member_id or self._core.closing:
                self._core.adding.clear()
                return False
            wanted = sorted(self._core.applied | add)
        self.consumer._set_assignment(wanted, positions)
        with self._lock:
            self._core.applied |= add
            self._core.adding.clear()
            self._committed.update(positions)
        if self.consumer.auto_offset_reset == "none":
            for tp in sorted(add - positions.keys()):
                self.consumer._fetch_error(tp, 0, OffsetOutOfRange(
                    f"{tp[0]}/{tp[1]} has no committed offset in group {self.group_id!r} and auto_offset_reset "
                    "is 'none'; seek() to an offset or reset the group's offsets"))
        self._call(self.on_assign, sorted(add))
        return True

    # -- commits and offsets -------------------------------------------------------------------------------

    def _applied_now(self) -> set[TopicPartition]:
        with self._lock:
            return set(self._core.applied)

    def _positions(self, tps: Iterable[TopicPartition]) -> Offsets:
        """{tp: (position, None)}: the offset after the last record poll() returned, where known."""
        consumer = self.consumer
        out: Offsets = {}
        with consumer._lock:
            for tp in tps:
                state = consumer._states.get(tp)
                if state is not None and state.position is not None:
                    out[TopicPartition(*tp)] = (state.position, None)
        return out

    @staticmethod
    def _normalize(offsets: object) -> Offsets:
        if not isinstance(offsets, dict):
            raise ConfigError("offsets must be a dict of (topic, partition) to offset or (offset, metadata)")
        out: Offsets = {}
        for tp, value in offsets.items():
            offset, metadata = value if isinstance(value, (tuple, list)) else (value, None)
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise ConfigError(f"offset for {tp} must be an integer >= 0, not {offset!r}")
            if metadata is not None and not isinstance(metadata, str):
                raise ConfigError(f"commit metadata for {tp} must be a string or None")
            out[TopicPartition(*tp)] = (offset, metadata)
        return out

    def _commit_sync(self, offsets: Offsets, member_id: str | None = None) -> dict[TopicPartition, int]:
        """Commit {tp: (offset, metadata)} as this member; on_commit hears of the outcome either way."""
        try:
            committed = self._send_commit(offsets, member_id)
        except BusError as exc:
            self._call(self.on_commit, offsets, exc)
            raise
        self._call(self.on_commit, offsets, None)
        return committed

    def _send_commit(self, offsets: Offsets, member_id: str | None) -> dict[TopicPartition, int]:
        epoch: int | None
        with self._lock:
            if self._core.state == CLOSED:
                raise ClosedError("commit on a closed consumer")
            if member_id is not None and member_id != self._core.member_id:
                raise UnknownMemberId(f"member {member_id} of group {self.group_id!r} was fenced and rejoined "
                                      f"as {self._core.member_id}")
            if self._core.state in (LOST, LEFT):
                assert self._core.lost_error is not None  # set with LOST and LEFT (MemberCore.set_lost)
                raise self._core.lost_error
            if not offsets:
                return {}
            if self._core.state != MEMBER:
                raise UnknownMemberId(f"not a member of group {self.group_id!r} yet (joining)")
            member_id, epoch = self._core.member_id, self._core.epoch
        parts = [[t, p, offset, metadata] for (t, p), (offset, metadata) in sorted(offsets.items())]
        for _ in range(3):
            try:
                result = self.consumer._requester.coordinator(wire.OFFSET_COMMIT, {
                    "group_id": self.group_id, "member_id": member_id, "member_epoch": epoch, "offsets": parts},
                    timeout_ms=self._request_timeout_ms)
            except FencedMemberEpoch:
                # Usually a heartbeat moved the epoch while this commit was on its way: retry at the new one.
                epoch = self._await_new_epoch(member_id, epoch)
                if epoch is None:
                    raise
                continue
            except UnknownMemberId as exc:
                with self._lock:
                    if self._core.member_id == member_id and self._core.state == MEMBER:
                        self._core.set_lost(LOST, exc)
                        self._lock.notify_all()
                self._wake_consumer()
                raise
            committed = {TopicPartition(t, p): offset for t, p, offset in result["committed"]}
            with self._lock:
                if self._core.member_id == member_id:
                    self._committed.update(committed)
            return committed
        raise FencedMemberEpoch(f"member {member_id} of group {self.group_id!r}: epoch kept moving during a commit")

    def _await_new_epoch(self, member_id: str, epoch: int) -> int | None:
        """After FENCED_MEMBER_EPOCH: the member's new epoch once a fresh heartbeat answered, else None."""
        with self._lock:
            if self._core.member_id == member_id and self._core.state == MEMBER and self._core.epoch != epoch:
                return self._core.epoch
            start_ms = monotonic_ms()
            deadline_ms = start_ms + self._heartbeat_timeout_ms + 200
            self._core.force_heartbeat = True
            self._lock.notify_all()
            while (self._core.member_id == member_id and self._core.state == MEMBER and not self._core.closing
                   and self._core.last_attempt_ms < start_ms):
                remaining_ms = deadline_ms - monotonic_ms()
                if remaining_ms <= 0:
                    break
                self._lock.wait(remaining_ms / 1000)
            if self._core.member_id == member_id and self._core.state == MEMBER and self._core.epoch != epoch:
                return self._core.epoch
            return None

    def _fetch_committed(self, tps: Iterable[tuple[str, int]]) -> dict[TopicPartition, int | None]:
        result = self.consumer._requester.coordinator(wire.OFFSET_FETCH, {
            "group_id": self.group_id, "partitions": [[t, p] for t, p in tps]}, timeout_ms=self._request_timeout_ms)
        return {TopicPartition(t, p): offset for t, p, offset, _ in result["offsets"]}

    def _maybe_auto_commit(self, now_ms: int) -> None:
        with self._lock:
            if now_ms < self._next_auto_commit_ms or self._auto_commit_inflight or self._core.state != MEMBER:
                return
            self._next_auto_commit_ms = now_ms + self.auto_commit_interval_ms
            applied, committed = set(self._core.applied), dict(self._committed)
        offsets = {tp: v for tp, v in self._positions(applied).items() if committed.get(tp) != v[0]}
        if not offsets:
            return
        with self._lock:
            self._auto_commit_inflight = True

        def done(offsets: Offsets, error: BaseException | None) -> None:
            with self._lock:
                self._auto_commit_inflight = False
            if error is not None:
                log.info("group %s: auto-commit failed: %s", self.group_id, error)

        self._enqueue_commit(offsets, done, block=False)

    def _enqueue_commit(self, offsets: Offsets, callback: CommitCallback | None, block: bool) -> None:
        with self._lock:
            if self._core.closing or self._core.state == CLOSED:
                raise ClosedError("commit_async on a closed consumer")
            member_id = self._core.member_id
            if self._committer is None:
                self._commit_queue = queue.Queue(COMMIT_QUEUE_MAX)
                self._committer = threading.Thread(target=self._commit_loop, name="bus-group-committer", daemon=True)
                self._committer.start()
            commit_queue = self._commit_queue
            assert commit_queue is not None  # made with the committer
            self._commits_waiting += 1
        try:
            commit_queue.put((offsets, callback, member_id), block=block, timeout=self._request_timeout_ms / 1000)
        except queue.Full:
            with self._lock:
                self._commits_waiting -= 1
                self._lock.notify_all()
            error = Timeout(f"{COMMIT_QUEUE_MAX} asynchronous commits already waiting; commit less often")
            if callback is not None:
                self._call(callback, offsets, error)
            else:
                raise error from None

    def _commit_loop(self) -> None:
        while True:
            assert self._commit_queue is not None  # made before the committer thread that runs this
            item = self._commit_queue.get()
            if item is None:
                return
            offsets, callback, member_id = item
            try:
                self._commit_sync(offsets, member_id)
                error = None
            except BusError as exc:
                error = exc
            if callback is not None:
                self._call(callback, offsets, error)
            with self._lock:
                self._commits_waiting -= 1
                self._lock.notify_all()

    def _drain_commits(self) -> None:
        """Wait (bounded) until the queued asynchronous commits were sent."""
        deadline_s = time.monotonic() + CLOSE_WAIT_S_MAX
        with self._lock:
            while self._commits_waiting > 0:
                remaining_s = deadline_s - time.monotonic()
                if remaining_s <= 0:
                    return
                self._lock.wait(remaining_s)

    def _stop_committer(self) -> None:
        with self._lock:
            committer, commit_queue = self._committer, self._commit_queue
        if committer is None:
            return
        assert commit_queue is not None  # made with the committer
        try:
            commit_queue.put(None, timeout=CLOSE_WAIT_S_MAX)
        except queue.Full:
            pass
        committer.join(CLOSE_WAIT_S_MAX + self._request_timeout_ms / 1000)

    # -- helpers -----------------------------------------------------------------------------------------

    def _new_member_id(self) -> str:
        return f"{self.client_id}-{uuid.uuid4().hex}"

    def _call(self, fn: Callable[..., object] | None, *args: object) -> None:
        """Run a user callback; its exception is logged, never allowed to leave the membership half-changed."""
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("group %s: callback %s raised", self.group_id, getattr(fn, "__name__", fn))
