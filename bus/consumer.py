"""The Consumer: pull-based reading of assigned partitions, from any retained offset, at its own pace.

A background fetcher thread (bus/fetcher.py) keeps long-poll fetches out to the partition owners and
fills a bounded prefetch buffer (``prefetch_bytes_max``); ``poll()`` decodes from that buffer in the
caller's thread and returns from memory.

The buffer is per partition, and ``poll()`` serves the partitions that have data in turn (bus/rotation.py):
each poll starts at the next one, so a partition with data is never more than one poll behind another,
however large the backlog ahead of it. A partition's fetched chunks are decoded a few batches at a time, as
its turn needs records, so at most a poll's worth (and the rest of one batch) of each is held decoded.

``prefetch_bytes_max`` bounds the fetched bytes not yet read, released batch by batch as their records are
handed out; bus/positions.py says what memory that bounds (at most ``prefetch_bytes_max`` plus, per
partition, the read part of one partly read chunk).

Deserializers (``key_deserializer=``, ``value_deserializer=``: callables, e.g.
``bus.serializers.json_deserializer``) run in ``poll()`` on each record's key and value; never on None (a
tombstone, no key). One that raises is a SerializationError naming the record, whose partition stays
positioned at it: the records before it are returned, and the next poll raises.

Pausing: ``pause(partitions)`` keeps a partition out of the rotation and out of the fetches, with its position
and what it has buffered kept, until ``resume(partitions)``; a partition that leaves the assignment (a
rebalance's revoke, ``assign()`` without it) is no longer paused, as in Kafka.

Positions: ``position(tp)`` is the offset of the next record ``poll()`` will return. Each partition's
``epoch`` goes up on every seek, so bytes fetched for an older position are dropped, never returned. The
positions, epochs, pending resets, pause state and the buffer's bookkeeping are a sans-IO core
(bus/positions.py): this class is its shell, and holds ``_lock`` around every call into it, from the
user's thread and from the fetcher's.

Lock order: ``Consumer._lock`` is the only lock shared with the fetcher thread. A group member's
``GroupMember._lock`` (bus/group_member.py) is never held while taking it. poll() lets ``Consumer._lock`` go
while it runs the fetcher's loop (``_wait_for_data``), and the loop's own ``_baton`` is held by neither
thread across a step.
"""

from __future__ import annotations

import gc
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import zmq

from . import fork_guard
from .connection import Requester
from .errors import ClosedError, ConfigError, SerializationError, Timeout
from .metadata import check_bootstrap
from .positions import FetchedPart, PartitionState, Positions
from .records import (CommitCallback, CommitOffsets, Deserializer, K, PartitionMap, Partitions,
                      PartitionsCallback, Record, TopicPartition, V)
from .rotation import take_in_turn
from .signal import Signal

if TYPE_CHECKING:
    from .fetcher import Fetcher
    from .group_member import GroupMember

_new_record = tuple.__new__
_T = TypeVar("_T")
RESETS = ("earliest", "latest", "none")
# A decode making fewer Records than this is not aged (Consumer._aged): above the young generation's threshold
# (700 allocations), so that it sets off one young collection at most.
AGED_RECORDS_MIN = 1_000


# The group options and their defaults, as GroupMember (bus/group_member.py) takes them; the suite checks
# that the two signatures agree.
GROUP_OPTION_DEFAULTS: dict[str, object] = {
    "pattern": None, "session_timeout_ms": 10_000, "heartbeat_interval_ms": 1_000, "max_poll_interval_ms": 300_000,
    "enable_auto_commit": True, "auto_commit_interval_ms": 5_000, "group_instance_id": None, "assignor": "sticky",
    "client_id": None, "on_assign": None, "on_revoke": None, "on_lost": None, "on_commit": None,
}


class Consumer(Generic[K, V]):
    """Reads partitions it is assigned (``assign()``), or, with ``group=`` and ``topics=`` (a list of names
    or a compiled regular expression), those a consumer group gives it; ``subscribe()`` replaces that
    subscription, ``unsubscribe()`` gives it up.

    Fetching: ``auto_offset_reset`` ("latest", "earliest" or "none": where a partition without a position
    starts), ``fetch_max_wait_ms`` / ``fetch_min_bytes`` (the long poll), ``fetch_max_bytes`` (per request),
    ``max_partition_fetch_bytes``, ``prefetch_bytes_max`` (the buffer: fetched bytes not yet read),
    ``request_timeout_ms``, ``retry_backoff_ms``; ``key_deserializer`` / ``value_deserializer`` (callables on bytes).

    Group options (only with ``group=``; bus/group_member.py has the details):

    - ``pattern``: subscribe to the topics whose names fully match this regular expression (str), instead
      of ``topics=``; new matching topics join.
    - ``session_timeout_ms`` (10 s): the coordinator expels a member it has not heard from for this long.
    - ``heartbeat_interval_ms`` (1 s): how often the member's own thread heartbeats; below the session.
    - ``max_poll_interval_ms`` (5 min): a member that does not call poll() for this long leaves the group
      (reason "max_poll_interval"); the next poll() rejoins.
    - ``enable_auto_commit`` (True) and ``auto_commit_interval_ms`` (5 s): commit the positions of what
      poll() returned, in the background, that often (and on revoke and close).
    - ``group_instance_id``: a static member: a restart within the session keeps its partitions, and
      close() does not leave.
    - ``assignor``: "sticky" (the default), "range" or "roundrobin".
    - ``client_id``: names the member (its member id is ``<client_id>-<uuid>``); default consumer-<pid>.
    - ``on_assign(partitions)``, ``on_revoke(partitions)``, ``on_lost(partitions)`` (fenced or expelled;
      default on_revoke): callbacks run in the polling thread; ``on_commit(offsets, error_or_None)`` after
      every commit, in the thread that made it (the committer thread for asynchronous and automatic ones).
    """

    # The order poll() serves the partitions with data in (bus/rotation.py); the bench swaps in the draining
    # order to measure fairness's cost.
    _take_order = staticmethod(take_in_turn)

    def __init__(self, bootstrap: str | None = None, topics: Iterable[str] | re.Pattern[str] | None = None,
                 group: str | None = None, *,
                 auto_offset_reset: str = "latest", fetch_max_wait_ms: int = 500, fetch_min_bytes: int = 1,
                 fetch_max_bytes: int = 50 << 20, max_partition_fetch_bytes: int = 8 << 20,
                 prefetch_bytes_max: int = 64 << 20, request_timeout_ms: int = 30_000,
                 retry_backoff_ms: int = 50, key_deserializer: Deserializer[K] | None = None,
                 value_deserializer: Deserializer[V] | None = None,
                 pattern: str | None = None, session_timeout_ms: int = 10_000, heartbeat_interval_ms: int = 1_000,
                 max_poll_interval_ms: int = 300_000, enable_auto_commit: bool = True,
                 auto_commit_interval_ms: int = 5_000, group_instance_id: str | None = None,
                 assignor: str = "sticky", client_id: str | None = None, on_assign: PartitionsCallback | None = None,
                 on_revoke: PartitionsCallback | None = None, on_lost: PartitionsCallback | None = None,
                 on_commit: CommitCallback | None = None) -> None:
        group_options: dict[str, Any] = {
            "pattern": pattern, "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": heartbeat_interval_ms, "max_poll_interval_ms": max_poll_interval_ms,
            "enable_auto_commit": enable_auto_commit, "auto_commit_interval_ms": auto_commit_interval_ms,
            "group_instance_id": group_instance_id, "assignor": assignor, "client_id": client_id,
            "on_assign": on_assign, "on_revoke": on_revoke, "on_lost": on_lost, "on_commit": on_commit}
        if auto_offset_reset not in RESETS:
            raise ConfigError(f"auto_offset_reset must be one of {RESETS}, not {auto_offset_reset!r}")
        for name, value, low in (("fetch_max_wait_ms", fetch_max_wait_ms, 0), ("fetch_min_bytes", fetch_min_bytes, 0),
                                 ("fetch_max_bytes", fetch_max_bytes, 1),
                                 ("max_partition_fetch_bytes", max_partition_fetch_bytes, 1),
                                 ("prefetch_bytes_max", prefetch_bytes_max, 1),
                                 ("request_timeout_ms", request_timeout_ms, 1), ("retry_backoff_ms", retry_backoff_ms, 0)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, not {value!r}")
        for name, fn in (("key_deserializer", key_deserializer), ("value_deserializer", value_deserializer)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"{name} must be a callable (bytes -> object) or None, not {fn!r}")
        if topics is not None and group is None:
            raise ConfigError("subscribing to topics needs a group; without one, use assign()")
        # Compared by identity and type, so that e.g. enable_auto_commit=1 is not taken for the default True.
        changed = sorted(name for name, value in group_options.items()
                         if value is not GROUP_OPTION_DEFAULTS[name] and (type(value) is not type(
                             GROUP_OPTION_DEFAULTS[name]) or value != GROUP_OPTION_DEFAULTS[name]))
        if changed and group is None:
            raise ConfigError(f"options {changed} need a group")
        self.bootstrap = check_bootstrap(bootstrap)
        self.auto_offset_reset = auto_offset_reset
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.fetch_min_bytes = fetch_min_bytes
        self.fetch_max_bytes = fetch_max_bytes
        self.max_partition_fetch_bytes = max_partition_fetch_bytes
        self.prefetch_bytes_max = prefetch_bytes_max
        self.request_timeout_ms = request_timeout_ms
        self.retry_backoff_s = retry_backoff_ms / 1000
        self.key_deserializer, self.value_deserializer = key_deserializer, value_deserializer
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()  # one poll() at a time (see poll())
        # Signalled when data, errors or positions arrive; bus.aio's consumer hooks its loop to it (on_notify).
        self._data = Signal(self._lock)
        # The positions, epochs, pause state and buffer of every assigned partition (bus/positions.py): only
        # under _lock.
        self._positions = Positions(auto_offset_reset, prefetch_bytes_max)
        self._records_consumed = 0  # records poll() handed out, for metrics()
        self._closed = False
        self._context = zmq.Context()
        self._requester = Requester(self._context, self.bootstrap, request_timeout_ms)
        from .fetcher import Fetcher

        self._fetcher: Fetcher = Fetcher(self, self._context)
        self._wake: Callable[[], None] = self._fetcher.waker
        self._fetcher.start()
        self._group: GroupMember | None = None
        self._left_group: str | None = None  # the group this consumer left by unsubscribe(), for the errors after it
        self._group_options = group_options  # for subscribe(): the same options, another subscription
        if group is not None:
            from .group_member import GroupMember

            try:
                self._group = GroupMember(self, group, topics, **group_options)
            except BaseException:
                self.close()  # e.g. a ConfigError from the group options: leave no thread behind
                raise
        fork_guard.register(self)  # in a forked child, every call raises ForkedError instead of hanging

    # -- assignment and positions ------------------------------------------------------------------

    def _check_open(self, call: str) -> None:
        """Every public call but close() starts here: on a closed consumer it raises ClosedError, having done
        nothing (its sockets are gone: what would leak otherwise is a ZeroMQ error, or a wrong answer)."""
        if self._closed:
            raise ClosedError(f"{call} on a closed Consumer")

    def assign(self, partitions: Partitions) -> None:
        """Read exactly these (topic, partition) pairs; positions start per ``auto_offset_reset``."""
        self._check_open("assign()")
        if self._group is not None:
            raise ConfigError("a group member's partitions are assigned by the coordinator; don't call assign()")
        metadata = self._requester.metadata([t for t, _ in partitions], strict=True)
        for topic, partition in partitions:
            if not 0 <= partition < metadata.partition_count(topic):
                raise ConfigError(f"topic {topic!r} has no partition {partition}")
        self._set_assignment([TopicPartition(t, p) for t, p in partitions])

    def _set_assignment(self, partitions: list[TopicPartition], positions: Mapping[TopicPartition, int] | None = None
                        ) -> None:
        with self._lock:
            self._positions.assign(partitions, positions)
            self._data.notify_all()
        self._wake()

    def assignment(self) -> set[TopicPartition]:
        """The (topic, partition) pairs this consumer reads now: assign()'s, or those the group gave it."""
        self._check_open("assignment()")
        with self._lock:
            return set(self._positions.states)

    def subscription(self) -> set[str] | str:
        """The topics this group member subscribed to (a set), or the pattern it subscribed with (a str, the
        regular expression's source); an empty set for a consumer without a subscription (one that uses
        assign(), or one after unsubscribe())."""
        self._check_open("subscription()")
        group = self._group
        if group is None:
            return set()
        # One of the two is None (check_subscription).
        return group.pattern if group.pattern is not None else set(cast("list[str]", group.topics))

    def subscribe(self, topics: Iterable[str] | re.Pattern[str] | None = None, *, pattern: str | None = None) -> None:
        """Replace the group subscription with ``topics`` (a list of names, or a compiled regular expression)
        or ``pattern`` (a str): the member first gives back everything as unsubscribe() does (so this is an
        eager rebalance of this member, not a cooperative one), then joins the group again with the new
        subscription and the Consumer's group options. Also after unsubscribe(). Only for a consumer made
        with ``group=``; one reading partitions by assign() must unsubscribe() first."""
        self._check_open("subscribe()")
        from .group_member import GroupMember, check_subscription

        group_id = self._group.group_id if self._group is not None else self._left_group
        if group_id is None:
            raise ConfigError("subscribing to topics needs a group; make the Consumer with group=..., or use assign()")
        if self._group is None and self.assignment():
            raise ConfigError("this consumer reads partitions by assign(): unsubscribe() first, then subscribe()")
        check_subscription(topics, pattern)  # before anything is given back
        self.unsubscribe()
        self._group = GroupMember(self, group_id, topics, **{**self._group_options, "pattern": pattern})
        self._left_group = None

    def unsubscribe(self) -> None:
        """Stop reading everything. A group member gives its partitions back as close() does: it commits
        their positions (with auto-commit on), calls ``on_revoke``, and leaves the group so they move at once
        (a static member, ``group_instance_id``, does not leave: its partitions wait out its session). Then
        every partition and its position is dropped; an assign() consumer's assignment is cleared the same
        way. Afterwards the consumer is one without a group: assign() works, commits are refused.

        Call it from the thread that polls (a poll() in another thread may still return records of the
        partitions being given back)."""
        self._check_open("unsubscribe()")
        group = self._group
        if group is not None:
            try:
                group.close()
            finally:
                self._group = None
                self._left_group = group.group_id
        self._set_assignment([])

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        """The partition ids of ``topic`` ({0, 1, ...}) from the cluster's metadata; None for a topic that
        does not exist, as kafka-python."""
        self._check_open("partitions_for_topic()")
        if not isinstance(topic, str) or not topic:
            raise ConfigError(f"topic must be a topic name (a non-empty str), not {topic!r}")
        meta = self._requester.metadata([topic]).topics.get(topic)
        return None if meta is None else set(range(len(meta["partitions"])))

    def pause(self, partitions: Partitions) -> None:
        """Stop fetching ``partitions`` (assigned (topic, partition) pairs) and returning their records from
        poll(), until resume(); their positions and what they have buffered stay. Pausing a paused partition
        does nothing. A partition revoked or unassigned is no longer paused."""
        self._check_open("pause()")
        tps = self._assigned_now(partitions, "pause()")
        with self._lock:
            self._positions.pause(tps)
        self._wake()  # a fetch out for them is superseded by one without them

    def resume(self, partitions: Partitions) -> None:
        """Serve ``partitions`` again, from their positions (first what they had buffered). Resuming one that
        is not paused does nothing."""
        self._check_open("resume()")
        tps = self._assigned_now(partitions, "resume()")
        with self._lock:
            self._positions.resume(tps)
            self._data.notify_all()
        self._wake()

    def paused(self) -> set[TopicPartition]:
        """The partitions paused now."""
        self._check_open("paused()")
        with self._lock:
            return set(self._positions.paused)

    def _assigned_now(self, partitions: object, call: str) -> list[TopicPartition]:
        if isinstance(partitions, (str, bytes, TopicPartition)) or not hasattr(partitions, "__iter__"):
            raise ConfigError(f"{call} takes a list of (topic, partition) pairs, not {partitions!r}")
        tps = []
        for tp in partitions:
            if not isinstance(tp, (tuple, list)) or len(tp) != 2:
                raise ConfigError(f"{call} takes a list of (topic, partition) pairs, not {partitions!r}")
            tps.append(TopicPartition(*tp))
        with self._lock:
            self._positions.check_assigned(tps, call)
        return tps

    # -- group offsets (bus/group_member.py) -------------------------------------------------------------

    def _member(self) -> GroupMember:
        if self._group is None and self._left_group is not None:
            raise ConfigError(f"this consumer left group {self._left_group!r} by unsubscribe(): it has no "
                              "committed offsets any more; make a Consumer with group=... for them")
        if self._group is None:
            raise ConfigError("committed offsets belong to a group; construct the Consumer with group=...")
        return self._group

    def commit(self, offsets: CommitOffsets | None = None) -> dict[TopicPartition, int]:
        """Commit ``offsets`` ({tp: offset}), by default the positions of what poll() returned. Synchronous;
        returns {tp: committed offset}. A fenced member gets FencedMemberEpoch / UnknownMemberId (it then
        drops its partitions and rejoins on the next poll())."""
        self._check_open("commit()")
        return self._member().commit(offsets)

    def commit_async(self, offsets: CommitOffsets | None = None, callback: CommitCallback | None = None) -> None:
        """As commit(), in the background; ``callback(offsets, exception_or_None)`` when done."""
        self._check_open("commit_async()")
        self._member().commit_async(offsets, callback)

    def committed(self, tp: tuple[str, int]) -> int | None:
        """The offset the group has committed for ``tp``, or None."""
        self._check_open("committed()")
        return self._member().committed(tp)

    def seek(self, tp: tuple[str, int], offset: int) -> None:
        """Next poll() returns ``tp`` from ``offset`` (OffsetOutOfRange then applies auto_offset_reset)."""
        self._reposition([TopicPartition(*tp)], offset)

    def seek_to_beginning(self, partitions: Partitions | None = None) -> None:
        self._reposition(partitions, "earliest")

    def seek_to_end(self, partitions: Partitions | None = None) -> None:
        self._reposition(partitions, "latest")

    def _reposition(self, partitions: Partitions | None, target: int | str) -> None:
        self._check_open("seek()")
        tps = None if partitions is None else [TopicPartition(*tp) for tp in partitions]
        with self._lock:
            self._positions.seek(tps, target)
        self._wake()

    def position(self, tp: tuple[str, int], timeout_ms: int = 30_000) -> int:
        """The offset of the next record poll() returns for ``tp`` (waits for it to be resolved)."""
        self._check_open("position()")
        tp = TopicPartition(*tp)
        deadline_s = time.monotonic() + timeout_ms / 1000
        with self._lock:
            while True:
                position = self._positions.position(tp)
                if position is not None:
                    return position
                self._check_open("position()")  # closed while waiting: no fetcher will resolve it now
                remaining = deadline_s - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"position of {tp} not resolved within {timeout_ms} ms")
                self._data.wait(remaining)

    def offsets_for_times(self, timestamps: PartitionMap[int]) -> dict[TopicPartition, int]:
        """{tp: earliest offset whose timestamp >= ts} (the log end offset where no record is that new)."""
        self._check_open("offsets_for_times()")
        return self._list_offsets({TopicPartition(*tp): ts for tp, ts in timestamps.items()})

    def beginning_offsets(self, partitions: Partitions) -> dict[TopicPartition, int]:
        self._check_open("beginning_offsets()")
        return self._list_offsets({TopicPartition(*tp): "earliest" for tp in partitions})

    def end_offsets(self, partitions: Partitions) -> dict[TopicPartition, int]:
        self._check_open("end_offsets()")
        return self._list_offsets({TopicPartition(*tp): "latest" for tp in partitions})

    def _list_offsets(self, specs: dict[tuple[str, int], str | int]) -> dict[TopicPartition, int]:
        from .admin import list_offsets

        return list_offsets(self._requester, specs)

    # -- polling -----------------------------------------------------------------------------------

    def poll(self, timeout_ms: int = 1000, max_records: int = 10_000) -> list[Record[K, V]]:
        """Records from the prefetch buffer, waiting up to ``timeout_ms`` for the first. Raises a partition's
        fetch error (e.g. OffsetOutOfRange with auto_offset_reset="none") once, then goes on.

        Calls from several threads take turns: each decodes chunks with ``_lock`` let go (_decode), and two
        at once could hand a partition's chunks out of order."""
        with self._poll_lock:
            records = self._poll(timeout_ms, max_records)
            if records and (self.key_deserializer is not None or self.value_deserializer is not None):
                out = self._deserialized(records)
            else:  # as decoded: without deserializers K and V are bytes (their defaults)
                out = cast("list[Record[K, V]]", records)
            self._records_consumed += len(out)
            return out

    def _deserialized(self, records: list[Record]) -> list[Record[K, V]]:
        """``records`` with their keys and values deserialized. At a record that fails, the ones from it on
        are put back (its partition's position stays at it): those before it are returned and the error is its
        partition's, raised by the next poll(); with none before it, it is raised now."""
        key_fn, value_fn = self.key_deserializer, self.value_deserializer
        out: list[Record[K, V]] = []
        for r in records:
            key: Any = r[3]
            value: Any = r[4]
            argument = "key"
            try:
                if key_fn is not None and key is not None:
                    key = key_fn(key)
                argument = "value"
                if value_fn is not None and value is not None:
                    value = value_fn(value)
            except Exception as exc:
                error = SerializationError(
                    f"{argument}_deserializer raised {type(exc).__name__} for the record at {r[0]}/{r[1]} offset "
                    f"{r[2]}: {exc}; seek({(r[0], r[1])}, {r[2] + 1}) to skip it", argument=argument, topic=r[0],
                    partition=r[1], offset=r[2])
                error.__cause__ = exc
                self._unread(records[len(out):])
                if not out:
                    raise error from exc
                with self._lock:
                    self._positions.set_error(TopicPartition(r[0], r[1]), error)
                return out
            out.append(_new_record(Record, (r[0], r[1], r[2], key, value, r[5], r[6])))
        return out

    def _poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        self._check_open("poll()")
        group = self._group  # once: unsubscribe() may drop it meanwhile
        if group is not None:
            group.on_poll(timeout_ms)
        deadline_s = time.monotonic() + timeout_ms / 1000
        out: list[Record] = []
        if self._fetcher.held():
            # The fetcher's loop is this thread's while it polls (Consumer._wait_for_data): what came in since
            # the last call is taken now, and the next fetches go out, even with records still buffered.
            self._fetcher.step_here(0)
        while True:
            with self._lock:
                while True:
                    self._raise_errors()
                    self._take(out, max_records)
                    if out:
                        break
                    self._raise_errors()  # one the decode found (a corrupt batch): now, not after the wait
                    self._check_open("poll()")  # closed by another thread while this one waited
                    remaining = deadline_s - time.monotonic()
                    if remaining <= 0 or (group is not None and group.reconcile_pending):
                        break
                    self._wait_for_data(remaining)
            if out or group is None or deadline_s - time.monotonic() <= 0:
                break
            # The group's assignment changed while waiting: act on it now, not at the next poll().
            group.on_poll(int((deadline_s - time.monotonic()) * 1000))
        if self._positions.has_room() and not self._fetcher.held():
            self._wake()
        if group is not None and group.on_records(out) is False:
            # The member may have lost these partitions meanwhile (frozen inside this call past its session,
            # or it heard it was fenced): hand nothing out (bus/group_member.py, on_records).
            self._unread(out)
            out = []
        return out

    def _wait_for_data(self, remaining_s: float) -> None:
        """Wait (``_lock`` held, and let go meanwhile) up to ``remaining_s`` for what poll() waits on. With the
        buffer empty, a fetch reply is the likely wake-up: this thread runs the fetcher's loop itself for a
        step (Fetcher.step_here), so the reply reaches poll() without the fetcher thread's wake-up and
        hand-over (scripts/latency_trace.py's ``fetched -> polled``: p50 0.33-0.37 -> 0.22-0.31 ms). What else
        ends the wait (a seek, an assignment, the group's news, close()) rings the fetcher's waker, which ends
        the step's poll too."""
        self._lock.release()
        try:
            ran = self._fetcher.step_here(math.ceil(remaining_s * 1000))
        finally:
            self._lock.acquire()
        if not ran:  # the fetcher's loop has ended (close()): wait to be told
            self._data.wait(remaining_s)

    def __iter__(self) -> Iterator[Record[K, V]]:
        """Records as they come, until the consumer is closed (from another thread, or a handler)."""
        while not self._closed:
            try:
                records = self.poll(timeout_ms=1000)
            except ClosedError:
                if self._closed:
                    return
                raise
            yield from records

    def _unread(self, records: Sequence[Record[Any, Any]]) -> None:
        """Put back records taken for poll() but not handed out: each partition's position returns to the first
        of them, as a seek would, and what was buffered past it is fetched again."""
        first: dict[TopicPartition, int] = {}
        for r in records:
            first.setdefault(TopicPartition(r.topic, r.partition), r.offset)
        with self._lock:
            self._positions.unread(first)
        self._wake()

    def _raise_errors(self) -> None:
        error = self._positions.take_error(self._group is not None)
        if error is not None:
            raise error

    def _take(self, out: list[Record], max_records: int) -> None:
        """Move up to ``max_records`` returnable records into ``out``: from the partitions with data in turn
        (bus/rotation.py), as many of each as it has, decoding its chunks as needed (Positions.take_from).
        Caller holds ``_lock``."""
        positions = self._positions
        if len(out) < max_records and positions.ready:
            aged = self._aged
            self._take_order(positions.ready, max_records - len(out),
                             lambda tp, n: positions.take_from(tp, out, n, aged))
            if positions.wake_fetcher:  # a corrupt batch to fetch again
                positions.wake_fetcher = False
                self._wake()

    def _aged(self, build: Callable[[], _T], records_max: int) -> _T:
        """``build()``: bus/positions.py decoding a chunk or building a run's Records, with ``_lock`` let go
        (Positions.take_from calls it with the lock held), so the fetcher thread can hand over chunks meanwhile
        (only poll() decodes, from one thread at a time: see poll()); the core then sees whatever happened
        meanwhile (a seek, a reassignment).

        A Record is a tuple subclass, which the cyclic garbage collector tracks for as long as it lives (it
        untracks plain tuples only). Decoding tens of thousands of them with the collector on runs a
        collection every 700 allocations (measured: 2.5x slower), and even with it paused each young record is
        walked later by the young and the middle collections. So the collector is paused for the decode and,
        when it is on, aged around it: first the young and middle generations are collected (the program's
        own objects there: a few thousand at most), and after the decode freeze() + unfreeze() move every
        tracked object to the oldest generation without walking any. What moves is live: these records and
        the survivors of that collection (records are freed by reference count as ever). Measured +25 %
        records/s (docs/benchmarks.md). Not aged when the collector is off, nor when the program froze objects
        itself (unfreeze() would undo that), nor for a build of fewer than AGED_RECORDS_MIN Records: they set
        off one young collection at most, and the collection before the decode costs more than that (~50 us
        in a consumer's process, on every poll() of a record or two at a steady rate)."""
        enabled = gc.isenabled()
        age = enabled and gc.get_freeze_count() == 0 and records_max >= AGED_RECORDS_MIN
        self._lock.release()
        if age:
            gc.collect(1)
        gc.disable()
        try:
            return build()
        finally:
            if age:
                gc.freeze()
                gc.unfreeze()
            if enabled:
                gc.enable()
            self._lock.acquire()

    # The core's state, as the suite and bus/group_member.py look at it (under _lock).
    @property
    def _states(self) -> dict[TopicPartition, PartitionState]:
        return self._positions.states

    @property
    def _ready(self) -> OrderedDict[TopicPartition, None]:
        return self._positions.ready

    @property
    def _chunk_bytes(self) -> int:
        return self._positions.chunk_bytes

    def _check_invariants(self) -> None:
        """What holds whenever ``_lock`` is free and no poll() is decoding (the suite checks it around polls)."""
        with self._lock:
            self._positions.check_invariants()

    # -- called by the fetcher thread --------------------------------------------------------------

    def _pending_resets(self) -> list[tuple[TopicPartition, str | int, int]]:
        with self._lock:
            return self._positions.pending_resets()

    def _resolved(self, tp: TopicPartition, spec: str | int, epoch: int, offset: int) -> None:
        with self._lock:
            if self._positions.resolved(tp, spec, epoch, offset):
                self._data.notify_all()

    def _fetchable(self) -> dict[TopicPartition, tuple[int, int]]:
        with self._lock:
            return self._positions.fetchable()

    def _fetched(self, parts: Iterable[FetchedPart]) -> None:
        """A fetch reply's data, ``[(tp, epoch, fetched offset, data, next offset, log end)]``, taken in one
        hold of the lock: the partitions of one reply join the rotation together, in the reply's order."""
        with self._lock:
            if self._positions.fetched(parts):
                self._data.notify_all()

    def _out_of_range(self, tp: TopicPartition, epoch: int, offset: int, log_start: int, log_end: int) -> None:
        with self._lock:
            if self._positions.out_of_range(tp, epoch, offset, log_start, log_end):
                self._data.notify_all()

    def _fetch_error(self, tp: TopicPartition, epoch: int, error: BaseException) -> None:
        with self._lock:
            if self._positions.fetch_error(tp, epoch, error):
                self._data.notify_all()

    # -- metrics -----------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Counters since the consumer was made, as kafka-python's metrics() holds them (snake_case names):
        ``records_consumed`` (handed out by poll(); put back records not counted), ``bytes_fetched``,
        ``fetch_requests``, ``fetch_errors``, ``buffered_bytes`` (the prefetch buffer now), and per assigned
        partition ``lag`` ({(topic, partition): log end offset - position}, where both are known; the log
        end is the high watermark the last fetch saw), ``records_lag_max`` the largest of them."""
        self._check_open("metrics()")
        fetcher = self._fetcher
        with self._lock:
            positions = self._positions
            lag = positions.lag()
            out = {"records_consumed": self._records_consumed, "bytes_fetched": positions.bytes_fetched,
                   "fetch_requests": fetcher.fetch_requests, "fetch_errors": fetcher.fetch_errors,
                   "buffered_bytes": positions.chunk_bytes}
        return {**out, "lag": lag, "records_lag_max": max(lag.values(), default=0)}

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._group is not None:
                self._group.close()
        finally:
            self._closed = True
            with self._lock:
                self._data.notify_all()
            self._fetcher.stop()
            self._requester.close()
            self._context.term()

    def __enter__(self) -> Consumer[K, V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
