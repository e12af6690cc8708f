"""The history of a fault-harness run: every client operation, recorded as events.

This module owns the event format, the thread-safe recorder and the JSON-lines file layout.
It must never interpret events (that is checker.py's job), never block on anything but its own
lock, and never do I/O except in `save` and `load`.

An operation is an *invoke* event followed by at most one *completion* event with the same
`op_id`, Jepsen style:

    invoke   the client is about to issue the request
    ok       the request definitely took effect
    fail     the request definitely did not take effect (safe to retry or give up)
    unknown  the request may or may not have taken effect (timeout, lost connection)

An invoke that is never completed means the same as `unknown`. Observations that have no
duration (one polled record, an assignment the consumer learned of) are recorded in one shot
with `record(...)`, which writes a single completion event with a fresh `op_id`.

Operations (`f`) and the fields the checker reads from them:

    send    topic, partition, value (unique per send); the ok completion adds offset
    poll    ONE EVENT PER POLLED RECORD: topic, partition, offset, value, group, member
            (one-shot, or an invoke stamped when poll() was called and an ok when it returned:
            the record was handed out somewhere in between)
    commit  group, topic, partition, offset (the next offset to consume), member, epoch;
            observed=True marks not a commit request but the group's committed offset read
            back (e.g. after the run): judged for regression and delivery, not for epochs
    assign  group, topic, partition, member, epoch (the epoch at which the member got it)
    revoke  group, member, epoch; topic/partition None means "all of the member's partitions"
            (record an eviction by the coordinator as a revoke, e.g. with reason="evicted");
            lost=True marks a loss the member learned of late (on_lost after being fenced
            or evicted while frozen): its ownership ends at its last act as owner
    reset   group, topic, partition, offset: an explicit offset reset (seek + commit lower)
    drain   topic, partition, offset, value: one event per record of the final drain,
            written by `record_drain`, so that a saved history can be re-checked on its own
    nemesis a fault the harness injected (tests/harness/nemesis.py): what, target and
            timings in `extra`; the checker ignores it, a reader of a failing history needs it
    hw      topic, partition; the ok completion adds offset: the high watermark (end offset)
            a client was told by the partition's leader (`node` in extra), invoked before the
            request, ok after its answer; a refusal (a new leader's OFFSET_NOT_AVAILABLE) is a
            fail and is not an observation
    replica topic, partition, offset (the high watermark it was compared under): one replica's
            log at the end of a run, read from its node's stopped data directory; extra:
            `node`, `digest` (of the bytes below offset), `end` (where the bytes read ended,
            below offset when the replica lacks records), `diverges_at` (the first batch where
            it differs from the leader's, if it does)

`member` defaults to the recording process when absent. Any other keyword is kept in
`extra` (free-form, e.g. `error="timeout"`).

Time: each event is stamped with `time_ms` from the history's clock, read under the lock, so
ordering events by `(time_ms, index)` agrees with the order they were recorded in. Pass
`time_ms=` explicitly only if it comes from the same clock (e.g. a simulated clock); a
simulated run should rather construct `History(clock_ms=sim.now_ms)`.

File layout (`save`/`load`): JSON lines, one event per line in index order, as an object with
keys `index, op_id, type, process, f`, the named fields that are not None, and `extra` when
non-empty. Bytes anywhere in a value are written as `{"$bytes": "<base64>"}`; tuples in
extras come back as lists, so keep extras to JSON types and bytes.

Lock order: `History._lock` is the only lock and a leaf lock; nothing is called while holding
it except the clock, which must not call back into the history.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

TYPES = ("invoke", "ok", "fail", "unknown")
COMPLETIONS = ("ok", "fail", "unknown")
FUNCTIONS = ("send", "poll", "commit", "assign", "revoke", "reset", "drain", "nemesis", "hw", "replica")
# Named fields: stored as attributes so the checker reads them without dict lookups or typos.
FIELDS = ("topic", "partition", "value", "offset", "member", "epoch", "group", "time_ms")
# Keys that would collide with an event's own attributes in the JSON layout.
_RESERVED = frozenset(("index", "op_id", "type", "process", "f", "extra"))
_BYTES_TAG = "$bytes"


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Event:
    index: int  # position in the history; the total order in which events were recorded
    op_id: int  # shared by an invoke and its completion; fresh for a one-shot event
    type: str  # one of TYPES
    process: str  # the client that performed the operation, e.g. "producer-1"
    f: str  # the operation, one of FUNCTIONS
    topic: str | None = None  # topic name
    partition: int | None = None  # partition number within the topic
    value: Any = None  # record value (bytes or str), unique per send
    offset: int | None = None  # record offset; for commits, the next offset to consume
    member: str | None = None  # group member id; the checker falls back to `process`
    epoch: int | None = None  # member epoch carried by assign/revoke/commit
    group: str | None = None  # consumer group id
    time_ms: int | None = None  # recording time from the history's clock
    extra: dict[str, Any] = field(default_factory=dict)  # free-form fields, never interpreted

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "op_id": self.op_id,
            "type": self.type,
            "process": self.process,
            "f": self.f,
        }
        for name in FIELDS:
            v = getattr(self, name)
            if v is not None:
                out[name] = _encode(v)
        if self.extra:
            out["extra"] = _encode(self.extra)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Event:
        named = {name: _decode(obj[name]) for name in FIELDS if name in obj}
        return cls(
            index=obj["index"],
            op_id=obj["op_id"],
            type=obj["type"],
            process=obj["process"],
            f=obj["f"],
            extra=_decode(obj.get("extra", {})),
            **named,
        )


def _encode(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {_BYTES_TAG: base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, dict):
        return {str(k): _encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        if len(v) == 1 and _BYTES_TAG in v:
            return base64.b64decode(v[_BYTES_TAG])
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def _split_fields(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    reserved = _RESERVED.intersection(fields)
    if reserved:
        raise ValueError(f"field names {sorted(reserved)} are reserved")
    named = {k: v for k, v in fields.items() if k in FIELDS}
    extra = {k: v for k, v in fields.items() if k not in FIELDS}
    return named, extra


class History:
    """Thread-safe, append-only recorder of client operations."""

    def __init__(self, clock_ms: Callable[[], int] | None = None, events: Iterable[Event] = ()):
        self._lock = threading.Lock()
        self._clock_ms = clock_ms if clock_ms is not None else _monotonic_ms
        self._events: list[Event] = []  # every event, in index order
        self._open: dict[int, Event] = {}  # op_id -> invoke event still awaiting its completion
        self._next_op_id = 0  # op ids are never reused, so completions cannot be misattributed
        for e in sorted(events, key=lambda e: e.index):
            self._adopt(e)

    def _adopt(self, e: Event) -> None:
        # Rebuilds the bookkeeping from stored events (load), checking the same rules as recording.
        if e.index != len(self._events):
            raise ValueError(f"event index {e.index} out of sequence, "
                             f"expected {len(self._events)}")
        if e.type not in TYPES:
            raise ValueError(f"event {e.index}: unknown type {e.type!r}")
        if e.type == "invoke":
            self._open[e.op_id] = e
        else:
            self._open.pop(e.op_id, None)
        self._events.append(e)
        self._next_op_id = max(self._next_op_id, e.op_id + 1)

    def _append(self, *, op_id: int | None, type: str, process: str, f: str,
                fields: dict[str, Any]) -> int:
        # Caller holds the lock. Returns the op id used.
        named, extra = _split_fields(fields)
        if op_id is None:
            op_id = self._next_op_id
            self._next_op_id += 1
        if named.get("time_ms") is None:
            named["time_ms"] = self._clock_ms()
        self._events.append(Event(index=len(self._events), op_id=op_id, type=type,
                                  process=process, f=f, extra=extra, **named))
        return op_id

    # --- recording -------------------------------------------------------------------------

    def invoke(self, process: str, f: str, **fields: Any) -> int:
        """Records the start of an operation; returns the op id its completion must name."""
        _check_process_and_f(process, f)
        with self._lock:
            op_id = self._append(op_id=None, type="invoke", process=process, f=f, fields=fields)
            self._open[op_id] = self._events[-1]
            return op_id

    def ok(self, op_id: int, **fields: Any) -> None:
        """The operation definitely took effect; `fields` add to the invoke's (e.g. offset)."""
        self._complete(op_id, "ok", fields)

    def fail(self, op_id: int, **fields: Any) -> None:
        """The operation definitely did not take effect."""
        self._complete(op_id, "fail", fields)

    def unknown(self, op_id: int, **fields: Any) -> None:
        """The operation may or may not have taken effect."""
        self._complete(op_id, "unknown", fields)

    def _complete(self, op_id: int, type: str, fields: dict[str, Any]) -> None:
        with self._lock:
            invoke = self._open.pop(op_id, None)
            if invoke is None:
                # A second completion, or one for an op never invoked, would make the history
                # ambiguous; it is a harness bug, so refuse it loudly.
                raise KeyError(f"op {op_id} is not awaiting a completion")
            self._append(op_id=op_id, type=type, process=invoke.process, f=invoke.f,
                         fields=fields)

    def record(self, process: str, f: str, *, type: str = "ok", **fields: Any) -> int:
        """Records a one-shot event (a polled record, an assignment); returns its op id."""
        _check_process_and_f(process, f)
        if type not in COMPLETIONS:
            raise ValueError(f"one-shot event type must be one of {COMPLETIONS}, not {type!r}")
        with self._lock:
            return self._append(op_id=None, type=type, process=process, f=f, fields=fields)

    def record_drain(self, records: Iterable[Any], process: str = "drain") -> int:
        """Records the final drain: one ok "drain" event per (topic, partition, offset, value)
        record, then a marker event without an offset, so an empty drain is still a drain.
        Returns the number of records."""
        n = 0
        for r in records:
            topic, partition, offset, value = _drain_tuple(r)
            self.record(process, "drain", topic=topic, partition=partition, offset=offset,
                        value=value)
            n += 1
        self.record(process, "drain", records=n)
        return n

    # --- reading ---------------------------------------------------------------------------

    def events(self) -> list[Event]:
        """A snapshot of all events so far, in index order."""
        with self._lock:
            return list(self._events)

    def open_ops(self) -> list[int]:
        """Op ids invoked but not yet completed (the checker treats them as unknown)."""
        with self._lock:
            return list(self._open)

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events())

    # --- files -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Writes the history as JSON lines (layout in the module docstring)."""
        events = self.events()
        with open(path, "w", encoding="utf-8") as fh:
            for e in events:
                fh.write(json.dumps(e.to_json(), separators=(",", ":")))
                fh.write("\n")

    @classmethod
    def load(cls, path: str | Path, clock_ms: Callable[[], int] | None = None) -> History:
        """Reads a history written by `save`."""
        with open(path, encoding="utf-8") as fh:
            events = [Event.from_json(json.loads(line)) for line in fh if line.strip()]
        return cls(clock_ms=clock_ms, events=events)


def _check_process_and_f(process: str, f: str) -> None:
    if not isinstance(process, str) or not process:
        raise ValueError(f"process must be a non-empty str, not {process!r}")
    if f not in FUNCTIONS:
        raise ValueError(f"unknown operation {f!r}; expected one of {FUNCTIONS}")


def _drain_tuple(r: Any) -> tuple[Any, Any, Any, Any]:
    """Accepts a (topic, partition, offset, value) sequence or an object with those attributes."""
    if isinstance(r, (tuple, list)):
        if len(r) != 4:
            raise ValueError(f"drain record must be (topic, partition, offset, value), not {r!r}")
        return r[0], r[1], r[2], r[3]
    return r.topic, r.partition, r.offset, r.value
