"""The Consumer: pull-based reading of assigned partitions, from any retained offset, at its own pace.

A background fetcher thread (bus/fetcher.py) keeps long-poll fetches out to the partition owners and
fills a bounded prefetch buffer (``prefetch_bytes_max``); ``poll()`` decodes from that buffer in the
caller's thread and returns from memory.

Positions: ``position(tp)`` is the offset of the next record ``poll()`` will return. Each partition's
``epoch`` goes up on every seek, so bytes fetched for an older position are dropped, never returned.

Lock order: ``Consumer._lock`` is the only lock shared with the fetcher thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import zmq

from . import wire
from .batch import iter_batches, unpack_payload
from .connection import Requester
from .errors import ClosedError, ConfigError, OffsetOutOfRange, Timeout
from .metadata import default_bootstrap
from .records import Record, TopicPartition

_new_record = tuple.__new__
RESETS = ("earliest", "latest", "none")


class PartitionState:
    __slots__ = ("position", "fetch_offset", "epoch", "reset", "error", "log_end")

    def __init__(self, reset):
        self.position = None  # next offset poll() returns; None until resolved
        self.fetch_offset = None  # next offset to fetch (ahead of position by what is buffered)
        self.epoch = 0
        self.reset = reset  # "earliest" / "latest" / a timestamp while the position is being resolved
        self.error = None  # an error to raise from poll() for this partition
        self.log_end = None  # last seen log end offset, for lag


class Consumer:
    def __init__(self, bootstrap: str | None = None, topics=None, group: str | None = None, *,
                 auto_offset_reset: str = "latest", fetch_max_wait_ms: int = 500, fetch_min_bytes: int = 1,
                 fetch_max_bytes: int = 50 << 20, max_partition_fetch_bytes: int = 8 << 20,
                 prefetch_bytes_max: int = 64 << 20, request_timeout_ms: int = 30_000,
                 retry_backoff_ms: int = 50, **group_options):
        if auto_offset_reset not in RESETS:
            raise ConfigError(f"auto_offset_reset must be one of {RESETS}, not {auto_offset_reset!r}")
        for name, value, low in (("fetch_max_wait_ms", fetch_max_wait_ms, 0), ("fetch_min_bytes", fetch_min_bytes, 0),
                                 ("fetch_max_bytes", fetch_max_bytes, 1),
                                 ("max_partition_fetch_bytes", max_partition_fetch_bytes, 1),
                                 ("prefetch_bytes_max", prefetch_bytes_max, 1),
                                 ("request_timeout_ms", request_timeout_ms, 1), ("retry_backoff_ms", retry_backoff_ms, 0)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, not {value!r}")
        if topics is not None and group is None:
            raise ConfigError("subscribing to topics needs a group; without one, use assign()")
        self.bootstrap = bootstrap or default_bootstrap()
        self.auto_offset_reset = auto_offset_reset
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.fetch_min_bytes = fetch_min_bytes
        self.fetch_max_bytes = fetch_max_bytes
        self.max_partition_fetch_bytes = max_partition_fetch_bytes
        self.prefetch_bytes_max = prefetch_bytes_max
        self.request_timeout_ms = request_timeout_ms
        self.retry_backoff_s = retry_backoff_ms / 1000
        self._lock = threading.Lock()
        self._data = threading.Condition(self._lock)  # signalled when data, errors or positions arrive
        self._states: dict[tuple, PartitionState] = {}
        self._chunks: deque = deque()  # (tp, epoch, fetched offset, bytes) from the fetcher
        self._chunk_bytes = 0
        self._records: deque = deque()  # decoded records not yet returned, with their epoch
        self._closed = False
        self._context = zmq.Context()
        self._requester = Requester(self._context, self.bootstrap, request_timeout_ms)
        from .fetcher import Fetcher

        self._fetcher = Fetcher(self, self._context)
        self._wake = self._fetcher.waker()
        self._fetcher.start()
        self._group = None
        if group is not None:
            from .group_member import GroupMember

            self._group = GroupMember(self, group, topics, **group_options)
        elif group_options:
            raise ConfigError(f"options {sorted(group_options)} need a group")

    # -- assignment and positions ------------------------------------------------------------------

    def assign(self, partitions) -> None:
        """Read exactly these (topic, partition) pairs; positions start per ``auto_offset_reset``."""
        if self._group is not None:
            raise ConfigError("a group member's partitions are assigned by the coordinator; don't call assign()")
        metadata = self._requester.metadata([t for t, _ in partitions], strict=True)
        for topic, partition in partitions:
            if not 0 <= partition < metadata.partition_count(topic):
                raise ConfigError(f"topic {topic!r} has no partition {partition}")
        self._set_assignment([TopicPartition(t, p) for t, p in partitions])

    def _set_assignment(self, partitions, positions: dict | None = None) -> None:
        with self._lock:
            wanted = set(partitions)
            for tp in list(self._states):
                if tp not in wanted:
                    del self._states[tp]
            for tp in partitions:
                if tp not in self._states:
                    state = self._states[tp] = PartitionState(self.auto_offset_reset)
                    offset = (positions or {}).get(tp)
                    if offset is not None:
                        state.position = state.fetch_offset = offset
                        state.reset = None
            self._records = deque(r for r in self._records if r[0] in self._states)
            self._data.notify_all()
        self._wake()

    def assignment(self) -> set:
        with self._lock:
            return set(self._states)

    def seek(self, tp, offset: int) -> None:
        """Next poll() returns ``tp`` from ``offset`` (OffsetOutOfRange then applies auto_offset_reset)."""
        self._reposition([TopicPartition(*tp)], offset)

    def seek_to_beginning(self, partitions=None) -> None:
        self._reposition(partitions, "earliest")

    def seek_to_end(self, partitions=None) -> None:
        self._reposition(partitions, "latest")

    def _reposition(self, partitions, target) -> None:
        with self._lock:
            tps = list(self._states) if partitions is None else [TopicPartition(*tp) for tp in partitions]
            for tp in tps:
                state = self._states.get(tp)
                if state is None:
                    raise ConfigError(f"{tp} is not assigned to this consumer")
                state.epoch += 1
                state.error = None
                if isinstance(target, int):
                    state.position = state.fetch_offset = target
                    state.reset = None
                else:
                    state.position = state.fetch_offset = None
                    state.reset = target
            self._records = deque(r for r in self._records if r[0] not in tps)
        self._wake()

    def position(self, tp, timeout_ms: int = 30_000) -> int:
        """The offset of the next record poll() returns for ``tp`` (waits for it to be resolved)."""
        tp = TopicPartition(*tp)
        deadline_s = time.monotonic() + timeout_ms / 1000
        with self._lock:
            while True:
                state = self._states.get(tp)
                if state is None:
                    raise ConfigError(f"{tp} is not assigned to this consumer")
                if state.position is not None:
                    return state.position
                remaining = deadline_s - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"position of {tp} not resolved within {timeout_ms} ms")
                self._data.wait(remaining)

    def offsets_for_times(self, timestamps: dict) -> dict:
        """{tp: earliest offset whose timestamp >= ts} (the log end offset where no record is that new)."""
        return self._list_offsets({TopicPartition(*tp): ts for tp, ts in timestamps.items()})

    def beginning_offsets(self, partitions) -> dict:
        return self._list_offsets({TopicPartition(*tp): "earliest" for tp in partitions})

    def end_offsets(self, partitions) -> dict:
        return self._list_offsets({TopicPartition(*tp): "latest" for tp in partitions})

    def _list_offsets(self, specs: dict) -> dict:
        from .admin import list_offsets

        return list_offsets(self._requester, specs)

    # -- polling -----------------------------------------------------------------------------------

    def poll(self, timeout_ms: int = 1000, max_records: int = 10_000) -> list:
        """Records from the prefetch buffer, waiting up to ``timeout_ms`` for the first. Raises a partition's
        fetch error (e.g. OffsetOutOfRange with auto_offset_reset="none") once, then goes on."""
        if self._closed:
            raise ClosedError("poll() on a closed Consumer")
        if self._group is not None:
            self._group.on_poll()
        deadline_s = time.monotonic() + timeout_ms / 1000
        out = []
        with self._lock:
            while True:
                self._raise_errors()
                self._take(out, max_records)
                if out:
                    break
                remaining = deadline_s - time.monotonic()
                if remaining <= 0:
                    break
                self._data.wait(remaining)
        if self._chunk_bytes < self.prefetch_bytes_max:
            self._wake()
        if self._group is not None and out:
            self._group.on_records(out)
        return out

    def __iter__(self):
        while not self._closed:
            yield from self.poll(timeout_ms=1000)

    def _raise_errors(self) -> None:
        for state in self._states.values():
            if state.error is not None:
                error, state.error = state.error, None
                raise error

    def _take(self, out: list, max_records: int) -> None:
        """Move up to ``max_records`` returnable records into ``out``, decoding chunks as needed."""
        states = self._states
        while len(out) < max_records:
            if not self._records:
                if not self._chunks:
                    return
                self._decode(self._chunks.popleft())
                continue
            record = self._records.popleft()
            state = states.get((record[0], record[1]))
            if state is None or state.position is None or record[2] != state.position:
                continue  # unassigned or re-sought since it was fetched
            state.position = record[2] + 1
            out.append(record)

    def _decode(self, chunk) -> None:
        tp, epoch, fetched_offset, data = chunk
        self._chunk_bytes -= len(data)
        state = self._states.get(tp)
        if state is None or state.epoch != epoch:
            return
        topic, partition = tp
        append = self._records.append
        for header, payload in iter_batches(data):
            flat = unpack_payload(payload)
            base, first_ts = header.base_offset, header.first_ts_ms
            for index in range(header.record_count):
                offset = base + index
                if offset < fetched_offset:
                    continue
                at = 4 * index
                headers = flat[at + 3]
                append(_new_record(Record, (topic, partition, offset, flat[at + 1], flat[at + 2],
                                            None if headers is None else [tuple(h) for h in headers],
                                            first_ts + flat[at])))

    # -- called by the fetcher thread --------------------------------------------------------------

    def _pending_resets(self) -> list:
        with self._lock:
            return [(tp, s.reset, s.epoch) for tp, s in self._states.items() if s.reset is not None and s.reset != "none"]

    def _resolved(self, tp, epoch: int, offset: int) -> None:
        with self._lock:
            state = self._states.get(tp)
            if state is not None and state.epoch == epoch and state.reset is not None:
                state.position = state.fetch_offset = offset
                state.reset = None
                self._data.notify_all()

    def _fetchable(self) -> dict:
        with self._lock:
            if self._chunk_bytes >= self.prefetch_bytes_max:
                return {}
            return {tp: (s.fetch_offset, s.epoch) for tp, s in self._states.items() if s.fetch_offset is not None}

    def _fetched(self, tp, epoch: int, offset: int, data: bytes, next_offset: int, log_end: int) -> None:
        with self._lock:
            state = self._states.get(tp)
            if state is None or state.epoch != epoch or state.fetch_offset != offset:
                return
            state.log_end = log_end
            if not data:
                return
            state.fetch_offset = next_offset
            self._chunks.append((tp, epoch, offset, data))
            self._chunk_bytes += len(data)
            self._data.notify_all()

    def _out_of_range(self, tp, epoch: int, offset: int, log_start: int, log_end: int) -> None:
        with self._lock:
            state = self._states.get(tp)
            if state is None or state.epoch != epoch or state.fetch_offset != offset:
                return
            state.epoch += 1
            if self.auto_offset_reset == "none":
                state.fetch_offset = None
                state.error = OffsetOutOfRange(
                    f"offset {offset} of {tp.topic}/{tp.partition} is outside the log [{log_start}, {log_end}]; "
                    "seek to a retained offset")
            else:
                state.position = state.fetch_offset = None
                state.reset = self.auto_offset_reset
            self._data.notify_all()

    def _fetch_error(self, tp, epoch: int, error) -> None:
        with self._lock:
            state = self._states.get(tp)
            if state is not None and state.epoch == epoch:
                state.error = error
                self._data.notify_all()

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
            self._fetcher.stop(self._wake)
            self._wake.close()
            self._requester.close()
            self._context.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
