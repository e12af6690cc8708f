"""The consumer's positions, seek epochs and prefetch buffer, sans I/O: where each assigned partition reads
next, what the fetcher may ask for, which fetched bytes are still wanted, and what poll() hands out.

Pure: no socket, no thread, no lock and no clock. Inputs are events (assign, seek, pause, resume, a fetch's
reply, an out-of-range answer, a resolved reset, records put back) and the outputs are decisions: what to
fetch (``fetchable``), which positions to resolve (``pending_resets``), which records poll() returns
(``take_from``), and whether waiters should be woken (the events' booleans, ``wake_fetcher``).
bus/consumer.py is its shell: it holds ``Consumer._lock`` around every call, so the user's thread and the
fetcher thread (bus/fetcher.py) drive one core, and bus.aio's Consumer drives it through the sync one.
tests/test_positions.py drives it with a seeded random schedule and checks its invariants after every step.

Positions: a partition's ``position`` is the offset of the next record poll() returns; ``fetch_offset`` is
the next to fetch (ahead of it by what is buffered). Each partition's ``epoch`` goes up on every seek (and
on whatever else moves its position other than handing records out: a reset, records put back, a corrupt
batch), and a fetch carries the epoch it was asked at, so bytes fetched for an older position are dropped,
never returned. A record is handed out only at its partition's position, which then moves past it: the
position moves forward except by a seek.

The buffer: per partition, the fetched chunks not yet wholly decoded, and runs of decoded records not yet
handed out. ``prefetch_bytes_max`` bounds the fetched bytes not yet read: a chunk's bytes count until they
are decoded, a decoded batch's until its last record is handed out, batch by batch. A partly read chunk is
held whole until its last batch is decoded, so the memory held is at most ``prefetch_bytes_max`` plus, per
partition, the already-read part of one partly read chunk (at most ``max_partition_fetch_bytes`` each), plus
what the fetch that crossed the bound brought. (Counting a chunk until its last record was out kept every
partition's chunk held while poll() served each a little at a time, and the fetcher stalled: docs/
benchmarks.md, L.)

Pausing keeps a partition out of ``ready`` (the rotation poll() serves, bus/rotation.py) and out of the
fetches, with its position and buffer kept; one that leaves the assignment is no longer paused.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeAlias, TypeVar

from .batch import HEADER_BYTES, iter_batches, read_columns
from .errors import ConfigError, CorruptRecord, OffsetOutOfRange
from .records import Buffer, Record, TopicPartition

_new_record = tuple.__new__
_map, _repeat = map, itertools.repeat

# A decode's outcome (decode_runs): the runs, the (end offset, bytes) of each batch decoded, the byte
# position of the first batch not decoded, and the CorruptRecord that stopped it there, if one did.
Decoded: TypeAlias = tuple[list[list[Any]], list[tuple[int, int]], int, CorruptRecord | None]
_T = TypeVar("_T")


class Aged(Protocol):
    """What take_from builds Records through: ``aged(build, records_max)`` returns ``build()``, which makes at
    most ``records_max`` Records. The shell's runs it with its lock let go and, for a build of many Records,
    the garbage collector aged around it (Consumer._aged), so any event may happen meanwhile; take_from
    checks what changed when it returns."""

    def __call__(self, build: Callable[[], _T], records_max: int) -> _T: ...


# A fetch reply's partition: (tp, epoch, fetched offset, data, next offset, log end).
FetchedPart: TypeAlias = tuple[TopicPartition, int, int, Buffer, int, int]


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
        # returned (all from chunks[0], or from the chunk just before it, wholly decoded). The last may be
        # [first offset, None, 0, count, columns]: the rest of a batch a decode did not need, kept as the
        # payload's columns until its turn (decode_runs).
        self.runs: deque[list[Any]] = deque()
        # Fetched bytes not yet read (counted in Positions.chunk_bytes): those of chunks not yet decoded, and
        # those of read_batches.
        self.held_bytes = 0
        # (end offset, bytes) of each decoded batch whose records are not all handed out, in offset order: its
        # bytes leave held_bytes when the position reaches its end.
        self.read_batches: deque[tuple[int, int]] = deque()

    def has_data(self) -> bool:
        return bool(self.runs or self.chunks)


class Positions:
    """Every assigned partition's state. ``auto_offset_reset``: where a partition without a position starts
    ("earliest", "latest" or "none"); ``prefetch_bytes_max``: the bound on the fetched bytes not yet read."""

    def __init__(self, auto_offset_reset: str, prefetch_bytes_max: int) -> None:
        assert prefetch_bytes_max >= 1
        self.auto_offset_reset = auto_offset_reset
        self.prefetch_bytes_max = prefetch_bytes_max
        self.states: dict[TopicPartition, PartitionState] = {}
        # The partitions that have buffered data, in the order poll() serves them (bus/rotation.py). Exactly
        # those whose state has_data() and that are not paused, between events.
        self.ready: OrderedDict[TopicPartition, None] = OrderedDict()
        self.paused: set[TopicPartition] = set()  # the assigned partitions pause() took out
        self.chunk_bytes = 0  # every partition's held_bytes, against prefetch_bytes_max
        self.bytes_fetched = 0  # bytes of the fetched chunks taken into the buffer, for metrics()
        # Set when a decision needs the fetcher at once (a corrupt batch to fetch again); the shell wakes it
        # and clears this.
        self.wake_fetcher = False

    # -- the user's events ---------------------------------------------------------------------------

    def assign(self, partitions: Iterable[TopicPartition], positions: Mapping[TopicPartition, int] | None = None
               ) -> None:
        """Read exactly ``partitions``: the others are dropped (and no longer paused); a new one starts at
        ``positions[tp]`` where given, else per ``auto_offset_reset``."""
        wanted = list(partitions)
        keep = set(wanted)
        for tp in list(self.states):
            if tp not in keep:
                self._drop_buffer(tp, self.states.pop(tp))
                self.paused.discard(tp)
        for tp in wanted:
            if tp not in self.states:
                state = self.states[tp] = PartitionState(self.auto_offset_reset)
                offset = (positions or {}).get(tp)
                if offset is not None:
                    state.position = state.fetch_offset = offset
                    state.reset = None

    def check_assigned(self, tps: Iterable[TopicPartition], call: str) -> None:
        for tp in tps:
            if tp not in self.states:
                raise ConfigError(f"{call}: {tp} is not assigned to this consumer")

    def seek(self, tps: Iterable[TopicPartition] | None, target: int | str) -> None:
        """``tps`` (every assigned partition when None) go on from ``target``: an offset, or a reset spec
        ("earliest", "latest", a timestamp) to resolve. What they buffered is dropped, their errors too. One
        not assigned is a ConfigError, and then nothing changes."""
        chosen = list(self.states) if tps is None else list(tps)
        for tp in chosen:
            if tp not in self.states:
                raise ConfigError(f"{tp} is not assigned to this consumer")
        for tp in chosen:
            state = self._moved(tp)
            state.error = None
            if isinstance(target, int):
                state.position = state.fetch_offset = target
                state.reset = None
            else:
                state.position = state.fetch_offset = None
                state.reset = target

    def pause(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.paused.add(tp)
            self.ready.pop(tp, None)

    def resume(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            if tp in self.paused:
                self.paused.discard(tp)
                if self.states[tp].has_data():
                    self.ready[tp] = None  # at the end of the rotation

    def unread(self, first: Mapping[TopicPartition, int]) -> None:
        """Records taken but not handed out are put back: each partition returns to ``first[tp]`` (the first
        of them), as a seek would, and what was buffered past it is fetched again."""
        for tp, offset in first.items():
            if tp in self.states:
                state = self._moved(tp)
                state.position = state.fetch_offset = offset
                state.reset = None

    def set_error(self, tp: TopicPartition, error: BaseException) -> None:
        """``error`` is raised by the next poll() (a record a deserializer refused, its partition at it)."""
        state = self.states.get(tp)
        if state is not None:
            state.error = error

    def take_error(self, grouped: bool) -> BaseException | None:
        """The error poll() raises now, if any: a partition's (raised once), or, for a consumer not in a group
        (``grouped`` False), that a partition has no position with auto_offset_reset "none" (raised until it
        is sought: nothing else will ever give it one, as Kafka's NoOffsetForPartition)."""
        for tp, state in self.states.items():
            if state.error is not None:
                error, state.error = state.error, None
                return error
            if state.reset == "none" and not grouped:
                return OffsetOutOfRange(f"{tp[0]}/{tp[1]} has no position and auto_offset_reset is "
                                        "'none'; seek() to an offset first")
        return None

    def position(self, tp: TopicPartition) -> int | None:
        """``tp``'s position, None while it is being resolved."""
        state = self.states.get(tp)
        if state is None:
            raise ConfigError(f"{tp} is not assigned to this consumer")
        return state.position

    def lag(self) -> dict[TopicPartition, int]:
        """{tp: log end - position} where both are known."""
        return {tp: max(0, s.log_end - s.position) for tp, s in self.states.items()
                if s.log_end is not None and s.position is not None}

    def has_room(self) -> bool:
        return self.chunk_bytes < self.prefetch_bytes_max

    # -- the fetcher's events ------------------------------------------------------------------------

    def pending_resets(self) -> list[tuple[TopicPartition, str | int, int]]:
        """(tp, reset spec, epoch) of the positions to resolve (list_offsets)."""
        return [(tp, s.reset, s.epoch) for tp, s in self.states.items() if s.reset is not None and s.reset != "none"]

    def resolved(self, tp: TopicPartition, spec: str | int, epoch: int, offset: int) -> bool:
        """A reset to ``spec`` asked at ``epoch`` resolved to ``offset``; True if taken (not stale). The spec
        is compared too: a partition assigned again starts again at epoch 0, so an answer asked before it
        left can carry the epoch it has now, for another spec (a seek_to_beginning's, now seek_to_end's)."""
        state = self.states.get(tp)
        if state is None or state.epoch != epoch or state.reset != spec:
            return False
        state.position = state.fetch_offset = offset
        state.reset = None
        return True

    def fetchable(self) -> dict[TopicPartition, tuple[int, int]]:
        """{tp: (fetch offset, epoch)} to fetch now: nothing while the buffer is full; never a paused one."""
        if self.chunk_bytes >= self.prefetch_bytes_max:
            return {}
        # The partitions with the least buffered first: a node fills a fetch's max_bytes in this order, so
        # what is cut short when it runs out is the partitions that already have the most to read.
        return {tp: (s.fetch_offset, s.epoch)
                for tp, s in sorted(self.states.items(), key=lambda item: item[1].held_bytes)
                if s.fetch_offset is not None and tp not in self.paused}

    def fetched(self, parts: Iterable[FetchedPart]) -> bool:
        """A fetch reply's data, taken unless stale (another epoch, or not at the fetch offset): the partitions
        of one reply join the rotation together, in the reply's order. True if any data arrived."""
        arrived = False
        for tp, epoch, offset, data, next_offset, log_end in parts:
            state = self.states.get(tp)
            if state is None or state.epoch != epoch or state.fetch_offset != offset:
                continue
            if log_end >= 0:  # -1: a new leader does not know its high watermark yet
                state.log_end = log_end
            if not data:
                continue
            assert next_offset > offset, (tp, offset, next_offset)
            state.fetch_offset = next_offset
            state.chunks.append((offset, data))
            state.held_bytes += len(data)
            self.chunk_bytes += len(data)
            self.bytes_fetched += len(data)
            if tp not in self.ready and tp not in self.paused:
                self.ready[tp] = None  # at the end of the rotation
            arrived = True
        return arrived

    def out_of_range(self, tp: TopicPartition, epoch: int, offset: int, log_start: int, log_end: int) -> bool:
        """A fetch at ``offset`` was outside the log: reset per ``auto_offset_reset`` (with "none", an error
        for poll()). True if taken (not stale)."""
        state = self.states.get(tp)
        if state is None or state.epoch != epoch or state.fetch_offset != offset:
            return False
        self._moved(tp)
        if self.auto_offset_reset == "none":
            state.fetch_offset = None
            state.error = OffsetOutOfRange(
                f"offset {offset} of {tp[0]}/{tp[1]} is outside the log [{log_start}, {log_end}]; "
                "seek to a retained offset")
        else:
            state.position = state.fetch_offset = None
            state.reset = self.auto_offset_reset
        return True

    def fetch_error(self, tp: TopicPartition, epoch: int, error: BaseException) -> bool:
        """A fetch failed for good: poll() raises ``error``. True if taken (not stale)."""
        state = self.states.get(tp)
        if state is None or state.epoch != epoch:
            return False
        state.error = error
        return True

    # -- poll() --------------------------------------------------------------------------------------

    def take_from(self, tp: TopicPartition, out: list[Record], n: int, aged: Aged) -> tuple[int, bool]:
        """Move up to ``n`` of ``tp``'s records into ``out`` from its position, in offset order; returns how
        many, and whether ``tp`` has data left (``take_in_turn``'s ``take``). Decodes its chunks as needed, a
        few batches at a time, building the Records through ``aged``.

        A run is handed out by slicing, and the partition's position moves once per slice. A record is
        returned only if its offset is the partition's position (so nothing is returned twice or out of
        order after a seek): within a run the records before the position are skipped, and a run that does
        not reach the position is dropped.
        """
        start = len(out)
        stop_at = start + n
        state = self.states.get(tp)
        while state is not None and len(out) < stop_at:
            runs = state.runs
            if not runs:
                if not state.chunks:
                    break
                self._release_read(state)
                self._decode(tp, state, stop_at - len(out), aged)
                state = self.states.get(tp)  # decode may have seen any event: tp may be gone, or re-sought
                if tp in self.paused:
                    break  # or paused: nothing more of it once pause() has returned
                continue
            run = runs[0]
            if run[1] is None:  # the rest of a batch, as columns: its Records built now, as its turn comes
                self._build(tp, state, run, aged)
                state = self.states.get(tp)
                if tp in self.paused:
                    break
                continue
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
        # Paused during a decode: it leaves the rotation now, its buffer kept.
        return len(out) - start, state.has_data() and tp not in self.paused

    def _build(self, tp: TopicPartition, state: PartitionState, run: list[Any], aged: Aged) -> None:
        """The Records of a run kept as columns (see decode_runs), unless ``tp`` was re-sought or reassigned
        meanwhile (then the run is gone with the buffer)."""
        epoch = state.epoch
        first, _, _, count, columns = run
        records = aged(lambda: build_records(tp, first, count, columns), count)
        if self.states.get(tp) is state and state.epoch == epoch and state.runs and state.runs[0] is run:
            run[1] = records
            del run[3:]

    def _decode(self, tp: TopicPartition, state: PartitionState, want: int, aged: Aged) -> None:
        """Decode batches of ``tp``'s first chunk into runs, until ``want`` records or the chunk's end; a chunk
        wholly decoded leaves ``chunks``. Any event may happen during ``aged``: a seek or reassignment
        meanwhile shows as another state, epoch or chunk, and then what was decoded is dropped. A corrupt
        batch becomes the partition's error, raised by the next poll(); the records before it are kept
        (handed out first), the rest of the partition's buffer is dropped, and it is fetched again from the
        corrupt batch on (as Kafka's consumer, it raises again for as long as the stored batch is bad)."""
        chunk = state.chunks[0]
        fetched_offset, data = chunk
        epoch, from_byte = state.epoch, state.decoded_at
        # Every record takes a byte at least: the bytes left bound the Records made.
        decoded, batches, at, error = aged(lambda: decode_runs(tp, fetched_offset, data, from_byte, want),
                                           min(want, len(data) - from_byte))
        if self.states.get(tp) is not state or state.epoch != epoch or not state.chunks or state.chunks[0] is not chunk:
            return  # re-sought or reassigned meanwhile: what was decoded is for a position no longer wanted
        state.runs += decoded
        state.read_batches += batches
        if error is not None:
            # The runs stay; nothing after them does. Their batches' bytes go when they are handed out.
            state.epoch += 1
            state.fetch_offset = _run_end(decoded[-1]) if decoded else state.position
            dropped = state.held_bytes - sum(size for _, size in state.read_batches)
            state.held_bytes -= dropped
            self.chunk_bytes -= dropped
            state.chunks.clear()
            state.decoded_at = 0
            state.error = error
            self.wake_fetcher = True
            return
        if at >= len(data):
            state.chunks.popleft()
            state.decoded_at = 0
        else:
            state.decoded_at = at

    def _release_read(self, state: PartitionState) -> None:
        """The batches whose records are all handed out (the position is at or past their end) leave the
        buffer."""
        read_batches, position = state.read_batches, state.position
        if read_batches and position is not None:
            released = 0
            while read_batches and read_batches[0][0] <= position:
                released += read_batches.popleft()[1]
            state.held_bytes -= released
            self.chunk_bytes -= released

    def _moved(self, tp: TopicPartition) -> PartitionState:
        """``tp``'s position moves other than by handing records out: a new epoch, and its buffer dropped."""
        state = self.states[tp]
        state.epoch += 1
        self._drop_buffer(tp, state)
        return state

    def _drop_buffer(self, tp: TopicPartition, state: PartitionState) -> None:
        self.chunk_bytes -= state.held_bytes
        state.held_bytes = state.decoded_at = 0
        state.chunks.clear()
        state.runs.clear()
        state.read_batches.clear()
        self.ready.pop(tp, None)

    def check_invariants(self) -> None:
        """What holds between events (the suite checks it around polls and after every step of
        tests/test_positions.py)."""
        assert self.chunk_bytes == sum(s.held_bytes for s in self.states.values()), self.chunk_bytes
        assert set(self.ready) == {tp for tp, s in self.states.items()
                                   if s.has_data() and tp not in self.paused}, list(self.ready)
        assert self.paused <= set(self.states), self.paused
        for tp, s in self.states.items():
            # The unread bytes: the chunks' not yet decoded, and the decoded batches' not all handed out.
            assert s.held_bytes == sum(len(data) for _, data in s.chunks) - s.decoded_at + sum(
                size for _, size in s.read_batches), tp
            # A batch leaves read_batches once the position reaches its end, and has records in runs until then.
            assert not s.read_batches or (s.runs and s.position is not None
                                          and s.read_batches[0][0] > s.position), tp
            assert not s.has_data() or s.position is not None, tp
            assert all(run[1] is not None for run in list(s.runs)[:-1]), tp  # only the last is kept as columns
            assert s.reset is None or s.position is None, tp  # a position being resolved is not known yet
            if s.position is not None and s.fetch_offset is not None:
                assert s.position <= s.fetch_offset, tp  # the buffer is what lies between the two
            if s.chunks:  # fetched from fetch offsets that only moved forward since
                assert s.fetch_offset is not None and s.chunks[0][0] < s.fetch_offset, tp


def decode_runs(tp: TopicPartition, fetched_offset: int, data: Buffer, at: int, want: int) -> Decoded:
    """The runs (see Positions.take_from) of the records at ``fetched_offset`` and after in the batches of
    ``data`` from byte ``at`` on: batch after batch until ``want`` records or the end, CRC-checked. Returns
    ``Decoded``: the runs, the (end offset, bytes) of each batch decoded (PartitionState.read_batches), the
    byte position of the first batch not decoded, and the CorruptRecord that stopped the decode there, if one
    did (the runs are the records before it).

    Records are built at C speed: ``map`` over ``zip`` of the payload's columns (timestamps, keys, values,
    headers; bus/batch.py), no Python code per record. A compressed batch's payload is decompressed here, one
    batch at a time (bus/batch.py bounds each to UNCOMPRESSED_BYTES_MAX).

    Of the last batch, only the ``want`` records are built: the rest are kept as its columns, in a run
    ``[first offset, None, 0, count, columns]`` whose Records are built when its turn comes
    (``build_records``). Built at once, they waited through the other partitions' turns, and handing them out
    then cost fair polling 1.13-1.15x the CPU per record of the draining order; built as their turn comes,
    1.00x (docs/benchmarks.md, L)."""
    topic, partition = tp
    runs: list[list[Any]] = []
    batches_read: list[tuple[int, int]] = []
    run: list[Any] | None = None
    decoded = 0
    # The payload's columns (bus/batch.py read_columns), and what stands in for one that is None.
    headers: list[Any] | None
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
        headers = None if headers is None else [None if h is None else [tuple(x) for x in h] for h in headers]
        need = want - decoded
        end = base + count if need >= count - skip else base + skip + need
        # zip stops at the range's end: only the records up to ``end`` are built.
        records = list(_map(_new_record, _repeat(Record), zip(
            _repeat(topic), _repeat(partition), range(base + skip, end),
            _repeat(None) if keys is None else keys, values, _repeat(None) if headers is None else headers,
            timestamps)))
        if run is not None and run[0] + len(run[1]) == base + skip:
            run[1] += records  # the next batch follows on: one run per decode
        else:
            run = [base + skip, records, 0]
            runs.append(run)
        if end < base + count:
            rest = slice(need, None)
            runs.append([end, None, 0, base + count - end, (
                None if keys is None else keys[rest], values[rest], None if headers is None else headers[rest],
                timestamps[rest] if isinstance(timestamps, list) else header.append_ts_ms)])
            break
        decoded += count - skip
        if decoded >= want:
            break
    return runs, batches_read, at, None


def build_records(tp: TopicPartition, first: int, count: int, columns: tuple[Any, ...]) -> list[Record]:
    """The Records of a run kept as columns by decode_runs: ``count`` of them from offset ``first``."""
    keys, values, headers, timestamps = columns
    return list(_map(_new_record, _repeat(Record), zip(
        _repeat(tp[0]), _repeat(tp[1]), range(first, first + count), _repeat(None) if keys is None else keys,
        values, _repeat(None) if headers is None else headers,
        _repeat(timestamps) if isinstance(timestamps, int) else timestamps)))


def _run_end(run: list[Any]) -> int:
    """The offset after a run's last record."""
    first, records = run[0], run[1]
    return int(first + (run[3] if records is None else len(records)))
