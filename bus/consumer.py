"""The Consumer: pull-based reading of assigned partitions, from any retained offset, at its own pace.

A background fetcher thread (bus/fetcher.py) keeps long-poll fetches out to the partition owners and
fills a bounded prefetch buffer (``prefetch_bytes_max``); ``poll()`` decodes from that buffer in the
caller's thread and returns from memory.

The buffer is per partition, and ``poll()`` serves the partitions that have data in turn (bus/rotation.py):
each poll starts at the next one, so a partition with data is never more than one poll behind another,
however large the backlog ahead of it. A partition's fetched chunks are decoded a few batches at a time, as
its turn needs records, so at most a poll's worth (and the rest of one batch) of each is held decoded.

What ``prefetch_bytes_max`` bounds is the fetched bytes not yet read: a chunk's bytes count against it until
they are decoded, and a decoded batch's until its last record is handed out, batch by batch. (Counting a
chunk until its last record was out kept every partition's chunk held when poll() serves each a little at a
time, and the fetcher stalled: fair polling read 0.81-0.93x the records/s of draining one partition after
another; docs/benchmarks.md, L.) A partly read chunk stays in memory whole until its last batch is decoded,
so the memory held is at most ``prefetch_bytes_max`` plus, per partition, the already-read part of one
partly read chunk (at most ``max_partition_fetch_bytes`` each), plus what the fetch that crossed the bound
brought (at most ``fetch_max_bytes``).

Deserializers (``key_deserializer=``, ``value_deserializer=``: callables, e.g.
``bus.serializers.json_deserializer``) run in ``poll()`` on each record's key and value; never on None (a
tombstone, no key). One that raises is a SerializationError naming the record, whose partition stays
positioned at it: the records before it are returned, and the next poll raises.

Pausing: ``pause(partitions)`` keeps a partition out of the rotation and out of the fetches, with its position
and what it has buffered kept, until ``resume(partitions)``; a partition that leaves the assignment (a
rebalance's revoke, ``assign()`` without it) is no longer paused, as in Kafka.

Positions: ``position(tp)`` is the offset of the next record ``poll()`` will return. Each partition's
``epoch`` goes up on every seek, so bytes fetched for an older position are dropped, never returned.

Lock order: ``Consumer._lock`` is the only lock shared with the fetcher thread. A group member's
``GroupMember._lock`` (bus/group_member.py) is never held while taking it.
"""

from __future__ import annotations

import gc
import itertools
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import zmq

from . import fork_guard
from .batch import HEADER_BYTES, iter_batches, read_columns
from .connection import Requester
from .errors import ClosedError, ConfigError, CorruptRecord, OffsetOutOfRange, SerializationError, Timeout
from .metadata import check_bootstrap
from .records import (Buffer, CommitCallback, CommitOffsets, Deserializer, PartitionMap, Partitions,
                      PartitionsCallback, Record, TopicPartition)
from .rotation import take_in_turn
from .signal import Signal

if TYPE_CHECKING:
    from .fetcher import Fetcher
    from .group_member import GroupMember

_new_record = tuple.__new__
_map, _repeat = map, itertools.repeat
RESETS = ("earliest", "latest", "none")


class PartitionState:
    __slots__ = ("position", "fetch_offset", "epoch", "reset", "error", "log_end", "chunks", "decoded_at", "runs",
                 "held_bytes", "read_batches")

    def __init__(self, reset: str | int | None) -> None:
        self.position: int | None = None  # next offset poll() returns; None until resolved
        self.fetch_offset: int | None = None  # next offset to fetch (ahead of position by what is buffered)
        self.epoch = 0  # goes up on every seek; fetches of an older epoch are dropped, and the buffer with it
        self.reset = reset  # "earliest" / "latest" / a timestamp while the position is being resolved
        self.error: BaseException | None = None  # an error to raise from poll() for this partition
        self.log_end: int | None = None  # last seen log end offset, for lag
        # (fetched offset, bytes) of this epoch not yet wholly decoded, in order
        self.chunks: deque[tuple[int, Buffer]] = deque()
        self.decoded_at = 0  # byte position in chunks[0] of its first batch not yet decoded
        # [first offset, records, next index]: runs of records at consecutive offsets, decoded and not yet
        # returned (all from chunks[0], or from the chunk just before it, wholly decoded).
        self.runs: deque[list[Any]] = deque()
        # Fetched bytes not yet read (counted in _chunk_bytes): those of chunks not yet decoded, and those of
        # read_batches.
        self.held_bytes = 0
        # (end offset, bytes) of each decoded batch whose records are not all handed out, in offset order: its
        # bytes leave held_bytes when the position reaches its end.
        self.read_batches: deque[tuple[int, int]] = deque()

    def has_data(self) -> bool:
        return bool(self.runs or self.chunks)


# The group options and their defaults, as GroupMember (bus/group_member.py) takes them; the suite checks
# that the two signatures agree.
GROUP_OPTION_DEFAULTS: dict[str, object] = {
    "pattern": None, "session_timeout_ms": 10_000, "heartbeat_interval_ms": 1_000, "max_poll_interval_ms": 300_000,
    "enable_auto_commit": True, "auto_commit_interval_ms": 5_000, "group_instance_id": None, "assignor": "sticky",
    "client_id": None, "on_assign": None, "on_revoke": None, "on_lost": None, "on_commit": None,
}


class Consumer:
    """Reads partitions it is assigned (``assign()``), or, with ``group=`` and ``topics=`` (a list of names
    or a compiled regular expression), those a consumer group gives it; ``subscribe()`` replaces that
    subscription, ``unsubscribe()`` gives it up.

    Fetching: ``auto_offset_reset`` ("latest", "earliest" or "none": where a partition without a position
    starts), ``fetch_max_wait_ms`` / ``fetch_min_bytes`` (the long poll), ``fetch_max_bytes`` (per request),
    ``max_partition_fetch_bytes``, ``prefetch_bytes_max`` (the buffer), ``request_timeout_ms``,
    ``retry_backoff_ms``; ``key_deserializer`` / ``value_deserializer`` (callables on bytes).

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
                 retry_backoff_ms: int = 50, key_deserializer: Deserializer | None = None,
                 value_deserializer: Deserializer | None = None,
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
        self._states: dict[TopicPartition, PartitionState] = {}
        # The partitions that have buffered data, in the order poll() serves them (bus/rotation.py). Exactly
        # those whose state has_data() and that are not paused, at every release of _lock.
        self._ready: OrderedDict[TopicPartition, None] = OrderedDict()
        # The assigned partitions pause() took out of the rotation and the fetches.
        self._paused: set[TopicPartition] = set()
        self._chunk_bytes = 0  # bytes of every partition's held chunks (held_bytes), against prefetch_bytes_max
        self._records_consumed = 0  # records poll() handed out, for metrics()
        self._bytes_fetched = 0  # bytes of the fetched chunks taken into the buffer, for metrics()
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
            wanted = set(partitions)
            for tp in list(self._states):
                if tp not in wanted:
                    self._drop_buffer(tp, self._states.pop(tp))
                    self._paused.discard(tp)  # a partition that leaves the assignment is no longer paused
            for tp in partitions:
                if tp not in self._states:
                    state = self._states[tp] = PartitionState(self.auto_offset_reset)
                    offset = (positions or {}).get(tp)
                    if offset is not None:
                        state.position = state.fetch_offset = offset
                        state.reset = None
            self._data.notify_all()
        self._wake()

    def assignment(self) -> set[TopicPartition]:
        """The (topic, partition) pairs this consumer reads now: assign()'s, or those the group gave it."""
        self._check_open("assignment()")
        with self._lock:
            return set(self._states)

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
            for tp in tps:
                self._paused.add(tp)
                self._ready.pop(tp, None)
        self._wake()  # a fetch out for them is superseded by one without them

    def resume(self, partitions: Partitions) -> None:
        """Serve ``partitions`` again, from their positions (first what they had buffered). Resuming one that
        is not paused does nothing."""
        self._check_open("resume()")
        tps = self._assigned_now(partitions, "resume()")
        with self._lock:
            for tp in tps:
                if tp in self._paused:
                    self._paused.discard(tp)
                    if self._states[tp].has_data():
                        self._ready[tp] = None  # at the end of the rotation
            self._data.notify_all()
        self._wake()

    def paused(self) -> set[TopicPartition]:
        """The partitions paused now."""
        self._check_open("paused()")
        with self._lock:
            return set(self._paused)

    def _assigned_now(self, partitions: object, call: str) -> list[TopicPartition]:
        if isinstance(partitions, (str, bytes, TopicPartition)) or not hasattr(partitions, "__iter__"):
            raise ConfigError(f"{call} takes a list of (topic, partition) pairs, not {partitions!r}")
        tps = []
        for tp in partitions:
            if not isinstance(tp, (tuple, list)) or len(tp) != 2:
                raise ConfigError(f"{call} takes a list of (topic, partition) pairs, not {partitions!r}")
            tps.append(TopicPartition(*tp))
        with self._lock:
            for tp in tps:
                if tp not in self._states:
                    raise ConfigError(f"{call}: {tp} is not assigned to this consumer")
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
        with self._lock:
            tps = list(self._states) if partitions is None else [TopicPartition(*tp) for tp in partitions]
            for tp in tps:
                state = self._states.get(tp)
                if state is None:
                    raise ConfigError(f"{tp} is not assigned to this consumer")
                state.epoch += 1
                self._drop_buffer(tp, state)
                state.error = None
                if isinstance(target, int):
                    state.position = state.fetch_offset = target
                    state.reset = None
                else:
                    state.position = state.fetch_offset = None
                    state.reset = target
        self._wake()

    def position(self, tp: tuple[str, int], timeout_ms: int = 30_000) -> int:
        """The offset of the next record poll() returns for ``tp`` (waits for it to be resolved)."""
        self._check_open("position()")
        tp = TopicPartition(*tp)
        deadline_s = time.monotonic() + timeout_ms / 1000
        with self._lock:
            while True:
                state = self._states.get(tp)
                if state is None:
                    raise ConfigError(f"{tp} is not assigned to this consumer")
                if state.position is not None:
                    return state.position
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

    def poll(self, timeout_ms: int = 1000, max_records: int = 10_000) -> list[Record]:
        """Records from the prefetch buffer, waiting up to ``timeout_ms`` for the first. Raises a partition's
        fetch error (e.g. OffsetOutOfRange with auto_offset_reset="none") once, then goes on.

        Calls from several threads take turns: each decodes chunks with ``_lock`` let go (_decode), and two
        at once could hand a partition's chunks out of order."""
        with self._poll_lock:
            records = self._poll(timeout_ms, max_records)
            if records and (self.key_deserializer is not None or self.value_deserializer is not None):
                records = self._deserialized(records)
            self._records_consumed += len(records)
            return records

    def _deserialized(self, records: list[Record]) -> list[Record]:
        """``records`` with their keys and values deserialized. At a record that fails, the ones from it on
        are put back (its partition's position stays at it): those before it are returned and the error is its
        partition's, raised by the next poll(); with none before it, it is raised now."""
        key_fn, value_fn = self.key_deserializer, self.value_deserializer
        out: list[Record] = []
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
                    state = self._states.get(TopicPartition(r[0], r[1]))
                    if state is not None:
                        state.error = error
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
                    self._data.wait(remaining)
            if out or group is None or deadline_s - time.monotonic() <= 0:
                break
            # The group's assignment changed while waiting: act on it now, not at the next poll().
            group.on_poll(int((deadline_s - time.monotonic()) * 1000))
        if self._chunk_bytes < self.prefetch_bytes_max:
            self._wake()
        if group is not None and group.on_records(out) is False:
            # The member may have lost these partitions meanwhile (frozen inside this call past its session,
            # or it heard it was fenced): hand nothing out (bus/group_member.py, on_records).
            self._unread(out)
            out = []
        return out

    def __iter__(self) -> Iterator[Record]:
        """Records as they come, until the consumer is closed (from another thread, or a handler)."""
        while not self._closed:
            try:
                records = self.poll(timeout_ms=1000)
            except ClosedError:
                if self._closed:
                    return
                raise
            yield from records

    def _unread(self, records: list[Record]) -> None:
        """Put back records taken for poll() but not handed out: each partition's position returns to the first
        of them, as a seek would, and what was buffered past it is fetched again."""
        first: dict[TopicPartition, int] = {}
        for r in records:
            first.setdefault(TopicPartition(r.topic, r.partition), r.offset)
        with self._lock:
            for tp, offset in first.items():
                state = self._states.get(tp)
                if state is not None:
                    state.epoch += 1
                    self._drop_buffer(tp, state)
                    state.position = state.fetch_offset = offset
                    state.reset = None
        self._wake()

    def _raise_errors(self) -> None:
        for tp, state in self._states.items():
            if state.error is not None:
                error, state.error = state.error, None
                raise error
            if state.reset == "none" and self._group is None:
                # Nothing will ever give it a position (as Kafka's NoOffsetForPartition): say so, don't idle.
                raise OffsetOutOfRange(f"{tp[0]}/{tp[1]} has no position and auto_offset_reset is "
                                       "'none'; seek() to an offset first")

    def _take(self, out: list[Record], max_records: int) -> None:
        """Move up to ``max_records`` returnable records into ``out``: from the partitions with data in turn
        (bus/rotation.py), as many of each as it has, decoding its chunks as needed. Caller holds ``_lock``."""
        if len(out) < max_records and self._ready:
            self._take_order(self._ready, max_records - len(out), lambda tp, n: self._take_from(tp, out, n))

    def _take_from(self, tp: TopicPartition, out: list[Record], n: int) -> tuple[int, bool]:
        """Move up to ``n`` of ``tp``'s records into ``out`` from its position, in offset order; returns how
        many, and whether ``tp`` has data left (``take_in_turn``'s ``take``). Caller holds ``_lock``.

        A run is handed out by slicing, and the partition's position moves once per slice. A record is
        returned only if its offset is the partition's position (so nothing is returned twice or out of
        order after a seek): within a run the records before the position are skipped, and a run that does
        not reach the position is dropped.
        """
        start = len(out)
        stop_at = start + n
        state = self._states.get(tp)
        while state is not None and len(out) < stop_at:
            runs = state.runs
            if not runs:
                if not state.chunks:
                    break
                self._release_read(state)  # before the decode lets go of the lock
                self._decode(tp, state, stop_at - len(out))
                state = self._states.get(tp)  # the decode let go of the lock: tp may be gone, or re-sought
                if tp in self._paused:
                    break  # or paused: nothing more of it once pause() has returned
                continue
            run = runs[0]
            position = state.position
            first, records, index = run
            if position is None or not first + index <= position < first + len(records):
                runs.popleft()  # re-sought, or already returned: never handed out
                continue
            index = position - first
            stop = min(len(records), index + stop_at - len(out))
            out += records[index:stop]
            state.position = first + stop
            if stop == len(records):
                runs.popleft()
            else:
                run[2] = stop
        if state is None:
            return len(out) - start, False
        self._release_read(state)
        # Paused during a decode (the lock let go): it leaves the rotation now, its buffer kept.
        return len(out) - start, state.has_data() and tp not in self._paused

    def _release_read(self, state: PartitionState) -> None:
        """The batches whose records are all handed out (the position is at or past their end) leave the
        prefetch buffer. Caller holds ``_lock``."""
        read_batches, position = state.read_batches, state.position
        if read_batches and position is not None:
            released = 0
            while read_batches and read_batches[0][0] <= position:
                released += read_batches.popleft()[1]
            state.held_bytes -= released
            self._chunk_bytes -= released

    def _decode(self, tp: TopicPartition, state: PartitionState, want: int) -> None:
        """Decode batches of ``tp``'s first chunk (whole batches, CRC-checked) into runs of Records, until
        ``want`` records or the chunk's end; a chunk wholly decoded leaves ``chunks``.

        Called with ``_lock`` held; it lets go of it while decoding, so the fetcher thread can hand over
        chunks meanwhile (only poll() decodes, from one thread at a time: see poll()). A seek or
        reassignment during the decode shows as another state or epoch, and then the runs are dropped. A
        corrupt batch becomes the partition's error, raised by the next poll(); the records before it are
        kept (handed out first), the rest of the partition's buffer is dropped, and it is fetched again from
        the corrupt batch on (as Kafka's consumer, it raises again for as long as the stored batch is bad).

        Records are built at C speed: ``map`` over ``zip`` of the payload's columns (timestamps, keys,
        values, headers; bus/batch.py), no Python code per record. A compressed batch's payload is
        decompressed here, in the caller's thread, one batch at a time (bus/batch.py bounds each to
        UNCOMPRESSED_BYTES_MAX).
        """
        chunk = state.chunks[0]
        fetched_offset, data = chunk
        epoch, at = state.epoch, state.decoded_at
        # A Record is a tuple subclass, which the cyclic garbage collector tracks for as long as it lives
        # (it untracks plain tuples only). Decoding tens of thousands of them with the collector on runs a
        # collection every 700 allocations (measured: 2.5x slower), and even with it paused each young record
        # is walked later by the young and the middle collections. So the collector is paused for the
        # decode and, when it is on, aged around it: first the young and middle generations are collected
        # (the program's own objects there: a few thousand at most), and after the decode freeze() +
        # unfreeze() move every tracked object to the oldest generation without walking any. What moves is
        # live: these records and the survivors of that collection (records are freed by reference count as
        # ever). Measured +25 % records/s (docs/benchmarks.md). Not aged when the collector is off, nor when
        # the program froze objects itself (unfreeze() would undo that).
        enabled = gc.isenabled()
        age = enabled and gc.get_freeze_count() == 0
        self._lock.release()
        if age:
            gc.collect(1)
        gc.disable()
        try:
            decoded, batches, at, error = self._decode_runs(tp, fetched_offset, data, at, want)
        finally:
            if age:
                gc.freeze()
                gc.unfreeze()
            if enabled:
                gc.enable()
            self._lock.acquire()
        if self._states.get(tp) is not state or state.epoch != epoch or not state.chunks or state.chunks[0] is not chunk:
            return  # re-sought or reassigned meanwhile: what was decoded is for a position no longer wanted
        state.runs += decoded
        state.read_batches += batches
        if error is not None:
            # The runs stay; nothing after them does. Their batches' bytes go when they are handed out.
            state.epoch += 1
            state.fetch_offset = decoded[-1][0] + len(decoded[-1][1]) if decoded else state.position
            dropped = state.held_bytes - sum(n for _, n in state.read_batches)
            state.held_bytes -= dropped
            self._chunk_bytes -= dropped
            state.chunks.clear()
            state.decoded_at = 0
            state.error = error
            self._wake()
            return
        if at >= len(data):
            state.chunks.popleft()
            state.decoded_at = 0
        else:
            state.decoded_at = at

    @staticmethod
    def _decode_runs(tp: TopicPartition, fetched_offset: int, data: Buffer, at: int, want: int
                     ) -> tuple[list[list[Any]], list[tuple[int, int]], int, CorruptRecord | None]:
        """The runs (see _take_from) of the records at ``fetched_offset`` and after in the batches of ``data``
        from byte ``at`` on: batch after batch until ``want`` records or the end. Returns the runs, the
        (end offset, bytes) of each batch decoded (read_batches), the byte position of the first batch not
        decoded, and the CorruptRecord that stopped the decode there, if one did (the runs are the records
        before it)."""
        topic, partition = tp
        runs: list[list[Any]] = []
        batches_read: list[tuple[int, int]] = []
        run: list[Any] | None = None
        decoded = 0
        # The payload's columns (bus/batch.py read_columns), and what stands in for one that is None.
        headers: Iterable[Any] | None
        timestamps: Iterable[Any]
        batches = iter_batches(memoryview(data)[at:])
        while True:
            try:
                header, payload = next(batches)
                base, count = header.base_offset, header.record_count
                skip = fetched_offset - base if base < fetched_offset else 0
                if skip >= count:
                    batches_read.append((base + count, HEADER_BYTES + header.payload_len))
                    at += HEADER_BYTES + header.payload_len
                    continue
                stamps, keys, values, headers = (c if c is None or not skip else c[skip:]
                                                 for c in read_columns(payload, count, header.attributes))
            except StopIteration:
                break
            except CorruptRecord as exc:
                return runs, batches_read, at, exc
            batches_read.append((base + count, HEADER_BYTES + header.payload_len))
            at += HEADER_BYTES + header.payload_len
            assert values is not None  # read_columns gives every column but values as None when none has one
            # A column that is None: no record of the batch has one (the usual batch has values only).
            if stamps is None:
                timestamps = _repeat(header.append_ts_ms)  # one int shared by the batch's records
            else:
                append_ts_ms = header.append_ts_ms
                timestamps = [append_ts_ms if ts is None else ts for ts in stamps]
            headers = _repeat(None) if headers is None else \
                [None if h is None else [tuple(x) for x in h] for h in headers]
            records = list(_map(_new_record, _repeat(Record), zip(
                _repeat(topic), _repeat(partition), range(base + skip, base + count),
                _repeat(None) if keys is None else keys, values, headers, timestamps)))
            if run is not None and run[0] + len(run[1]) == base + skip:
                run[1] += records  # the next batch follows on: one run per decode
            else:
                run = [base + skip, records, 0]
                runs.append(run)
            decoded += count - skip
            if decoded >= want:
                break
        return runs, batches_read, at, None

    def _drop_buffer(self, tp: TopicPartition, state: PartitionState) -> None:
        """Forget what ``tp`` has buffered (a seek, a put-back, a reset, its removal). Caller holds ``_lock``."""
        self._chunk_bytes -= state.held_bytes
        state.held_bytes = state.decoded_at = 0
        state.chunks.clear()
        state.read_batches.clear()
        state.runs.clear()
        self._ready.pop(tp, None)

    def _check_invariants(self) -> None:
        """What holds whenever ``_lock`` is free (the suite checks it around polls)."""
        with self._lock:
            assert self._chunk_bytes == sum(s.held_bytes for s in self._states.values()), self._chunk_bytes
            assert set(self._ready) == {tp for tp, s in self._states.items()
                                        if s.has_data() and tp not in self._paused}, list(self._ready)
            assert self._paused <= set(self._states), self._paused
            for tp, s in self._states.items():
                # The unread bytes: the chunks' not yet decoded, and the decoded batches' not all handed out.
                assert s.held_bytes == sum(len(data) for _, data in s.chunks) - s.decoded_at + sum(
                    n for _, n in s.read_batches), tp
                # A batch leaves read_batches once the position reaches its end, and has records in runs until then.
                assert not s.read_batches or (s.runs and s.position is not None
                                              and s.read_batches[0][0] > s.position), tp
                assert not s.has_data() or s.position is not None, tp

    # -- called by the fetcher thread --------------------------------------------------------------

    def _pending_resets(self) -> list[tuple[TopicPartition, str | int, int]]:
        with self._lock:
            return [(tp, s.reset, s.epoch) for tp, s in self._states.items() if s.reset is not None and s.reset != "none"]

    def _resolved(self, tp: TopicPartition, epoch: int, offset: int) -> None:
        with self._lock:
            state = self._states.get(tp)
            if state is not None and state.epoch == epoch and state.reset is not None:
                state.position = state.fetch_offset = offset
                state.reset = None
                self._data.notify_all()

    def _fetchable(self) -> dict[TopicPartition, tuple[int, int]]:
        with self._lock:
            if self._chunk_bytes >= self.prefetch_bytes_max:
                return {}
            # The partitions with the least buffered first: a node fills a fetch's max_bytes in this order, so
            # what is cut short when it runs out is the partitions that already have the most to read.
            return {tp: (s.fetch_offset, s.epoch)
                    for tp, s in sorted(self._states.items(), key=lambda item: item[1].held_bytes)
                    if s.fetch_offset is not None and tp not in self._paused}

    def _fetched(self, parts: Iterable[tuple[TopicPartition, int, int, Buffer, int, int]]) -> None:
        """A fetch reply's data, ``[(tp, epoch, fetched offset, data, next offset, log end)]``, taken in one
        hold of the lock: the partitions of one reply join the rotation together, in the reply's order."""
        with self._lock:
            arrived = False
            for tp, epoch, offset, data, next_offset, log_end in parts:
                state = self._states.get(tp)
                if state is None or state.epoch != epoch or state.fetch_offset != offset:
                    continue
                if log_end >= 0:  # -1: a new leader does not know its high watermark yet
                    state.log_end = log_end
                if not data:
                    continue
                state.fetch_offset = next_offset
                state.chunks.append((offset, data))
                state.held_bytes += len(data)
                self._chunk_bytes += len(data)
                self._bytes_fetched += len(data)
                if tp not in self._ready and tp not in self._paused:
                    self._ready[tp] = None  # at the end of the rotation
                arrived = True
            if arrived:
                self._data.notify_all()

    def _out_of_range(self, tp: TopicPartition, epoch: int, offset: int, log_start: int, log_end: int) -> None:
        with self._lock:
            state = self._states.get(tp)
            if state is None or state.epoch != epoch or state.fetch_offset != offset:
                return
            state.epoch += 1
            self._drop_buffer(tp, state)
            if self.auto_offset_reset == "none":
                state.fetch_offset = None
                state.error = OffsetOutOfRange(
                    f"offset {offset} of {tp[0]}/{tp[1]} is outside the log [{log_start}, {log_end}]; "
                    "seek to a retained offset")
            else:
                state.position = state.fetch_offset = None
                state.reset = self.auto_offset_reset
            self._data.notify_all()

    def _fetch_error(self, tp: TopicPartition, epoch: int, error: BaseException) -> None:
        with self._lock:
            state = self._states.get(tp)
            if state is not None and state.epoch == epoch:
                state.error = error
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
            lag = {tp: max(0, s.log_end - s.position) for tp, s in self._states.items()
                   if s.log_end is not None and s.position is not None}
            out = {"records_consumed": self._records_consumed, "bytes_fetched": self._bytes_fetched,
                   "fetch_requests": fetcher.fetch_requests, "fetch_errors": fetcher.fetch_errors,
                   "buffered_bytes": self._chunk_bytes}
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

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
