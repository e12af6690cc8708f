"""The checker: finds anomalies in the History of a fault-harness run.

This module owns the definition of every anomaly (ANOMALIES) and the Report. It is pure: it
takes events (and the final drain) and returns a Report. It must never touch a socket, a clock,
a file or a thread, and never mutate the history. Where the history cannot tell (an operation
whose outcome is unknown, a commit that was in flight while ownership changed) it gives the
system the benefit of the doubt, so every anomaly it reports is a real violation.

Ordering: each event gets the key `(time_ms, index)`. An operation spans from its invoke key to
its completion key (one-shot events: a single key; never completed: to the end of time).
Assignments and revocations take effect at their completion key.

The final drain is every record read from the log start to the end of each partition, as
(topic, partition, offset, value) tuples, passed as `final_drain=` or recorded into the history
with `History.record_drain`. Anomalies that need the drain (lost, unseen, duplicates,
drain_gaps, poll_skips, undelivered_below_commit) are skipped when there is none; phantom_reads
then compares polls with later polls only. `log_start`
maps (topic, partition) to the first offset retention kept (default 0): acked sends below it
are not lost, and the drain must be consecutive from it.

Values are compared as bytes (a str is UTF-8 encoded), so a client may record either.

Anomalies, each counted once per offending item (one fault may show up under several names:
an acked record missing from the log is both lost and unseen):

  lost              per ok send with an offset whose value is not at that offset in the drain
  unseen            per ok send whose value is nowhere in the drain
  duplicates        per value found at more than one offset in the drain
  inconsistent_offsets  per (topic, partition, offset) with two different values among the
                    drain, ok polls and ok sends' acked offsets
  reordered         per adjacent pair of one producer's ok sends to one partition, in invoke
                    order, whose acked offsets do not strictly increase
  drain_gaps        per run of missing offsets in the drain of a partition, from its log start
  poll_skips        per jump from offset o to o+k (k > 1) between two consecutive polls of one
                    process and partition, within one ownership (no assign/revoke of that
                    process or member in between), when some offset in (o, o+k) is in the drain
  committed_regression  per ok commit whose offset is lower than an ok commit of the same
                    (group, topic, partition) completed before it was invoked, with no ok
                    "reset" of that partition completed in between
  stale_epoch_commit_accepted  per ok commit for a (group, topic, partition) that has any
                    assign events, when no ownership interval of the committing member
                    overlaps the commit's span with an assign epoch <= the commit's epoch. So
                    a commit by a member that did not own the partition, or that owned it
                    only under a newer epoch than the one it presented, was wrongly accepted.
                    Here an interval runs to the member's revoke as the member recorded it
                    (its own view: a commit in flight across a revoke or a freeze is believed),
                    but no further than the next assign of the partition to another member:
                    once another member was told it owns the partition, the coordinator had
                    taken it from this one, so a commit invoked after that was sent too late.
                    Commits marked observed=True (an offset read back, not a request) are
                    never judged here.
  double_ownership  per pair of ownership intervals of different members of one (group,
                    topic, partition) that overlap. An interval runs from an ok assign to the
                    member's next ok revoke of it (or a re-assign, or the end of the history).
                    A revoke marked lost=True says the member learned it had been fenced or
                    evicted at some earlier moment it cannot know (it was frozen, or its
                    heartbeats failed), so it ends the interval at the member's last act as
                    owner instead: the start of its last ok poll of a record of the partition
                    or of its last ok commit of it (the assign itself if neither came later).
                    A frozen member that believed it owned a partition while another member
                    read it is fine; one that read or committed it meanwhile is not.
  undelivered_below_commit  per drained record at an offset below the final ok commit of a
                    (group, topic, partition) (the last to complete) and at or above the
                    offset of the latest ok reset before it (if any), that no ok poll of the
                    group (or a poll recorded without a group) returned
  failed_but_present  per failed send whose value is in the drain or was polled, unless
                    another send of the same value succeeded or is unknown
  phantom_reads     per (topic, partition, offset, value) returned by an ok poll that the log
                    does not keep: the final drain holds another value at that offset, or
                    nothing. Where the drain cannot tell (none was given, or the offset is below
                    the log start, gone by retention), a later read judges instead: an ok poll
                    invoked after this one completed that returned another value there. A
                    consumer must only ever read what stays: committed records
  hw_regressions    per drop of an observed high watermark ("hw" events, ok, offset >= 0: the
                    end offset a client was told; unknowns such as a new leader's -1 are not
                    recorded): an observation lower than the highest one of the same (topic,
                    partition) completed before it was invoked. Counted once per (partition,
                    highest, lower) pair, so a leader that keeps answering the same stale value
                    is one regression
  replica_divergence  per (topic, partition) whose "replica" events (one per replica, taken
                    from each node's stopped data directory at the end of a run) disagree below
                    the high watermark they were compared under (``offset``): digests of the
                    bytes below it differ, or a replica's log ends (``end``) below it
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .history import FIELDS, Event, History, _drain_tuple

ANOMALIES = (
    "lost",
    "unseen",
    "duplicates",
    "inconsistent_offsets",
    "reordered",
    "drain_gaps",
    "poll_skips",
    "committed_regression",
    "stale_epoch_commit_accepted",
    "double_ownership",
    "undelivered_below_commit",
    "failed_but_present",
    "phantom_reads",
    "hw_regressions",
    "replica_divergence",
)
EXAMPLES_PER_ANOMALY_MAX = 3
EXAMPLE_CHARS_MAX = 120  # the table truncates longer examples; Report.examples keeps them whole

Key = tuple  # (time_ms, index)
END_KEY: Key = (math.inf, math.inf)  # the completion key of an op that never completed


@dataclass(slots=True)
class Op:
    """One operation: its invoke and completion merged (completion fields win)."""

    op_id: int
    process: str
    f: str
    type: str | None  # ok / fail / unknown; None only while resolving
    fields: dict[str, Any]  # named fields (value normalized to bytes) and extras
    start: Key  # invoke key, or the key of a one-shot event
    end: Key  # completion key; END_KEY if never completed

    def get(self, name: str) -> Any:
        return self.fields.get(name)

    @property
    def member(self) -> Any:
        m = self.fields.get("member")
        return self.process if m is None else m

    def __str__(self) -> str:
        shown = {k: v for k, v in self.fields.items() if k != "time_ms"}
        args = " ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"op#{self.op_id} {self.process} {self.f} {self.type} {args}"


@dataclass(frozen=True)
class Report:
    counts: Mapping[str, int]  # anomaly -> number of offending items, every anomaly present
    examples: Mapping[str, tuple[str, ...]]  # anomaly -> the first few, human readable
    drain_checked: bool  # False when no final drain was given, so drain anomalies were skipped

    @property
    def ok(self) -> bool:
        return all(n == 0 for n in self.counts.values())

    def table(self) -> str:
        """Plain-text table: anomaly | count | first example."""
        rows = [("anomaly", "count", "example")]
        for a in ANOMALIES:
            ex = self.examples[a][0] if self.examples[a] else "-"
            if len(ex) > EXAMPLE_CHARS_MAX:
                ex = ex[: EXAMPLE_CHARS_MAX - 3] + "..."
            rows.append((a, str(self.counts[a]), ex))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{r[0]:<{w0}} | {r[1]:>{w1}} | {r[2]}" for r in rows]
        lines.insert(1, f"{'-' * w0}-+-{'-' * w1}-+-{'-' * 7}")
        verdict = "OK" if self.ok else "ANOMALIES FOUND"
        drain = "checked" if self.drain_checked else "not given: drain anomalies skipped"
        lines.append(f"{verdict}; final drain {drain}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class _Tally:
    def __init__(self) -> None:
        self.counts = {a: 0 for a in ANOMALIES}
        self.examples: dict[str, list[str]] = {a: [] for a in ANOMALIES}

    def add(self, anomaly: str, example: str) -> None:
        self.counts[anomaly] += 1
        if len(self.examples[anomaly]) < EXAMPLES_PER_ANOMALY_MAX:
            self.examples[anomaly].append(example)

    def report(self, drain_checked: bool) -> Report:
        return Report(dict(self.counts), {a: tuple(x) for a, x in self.examples.items()},
                      drain_checked)


def normalize_value(v: Any) -> Any:
    """Values compare as bytes, whichever of str or bytes the client recorded."""
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    return v


def resolve_ops(events: Iterable[Event]) -> list[Op]:
    """Pairs invokes with completions; returns ops ordered by start key."""
    ops: dict[int, Op] = {}
    time_ms = 0
    for e in sorted(events, key=lambda e: e.index):
        # An event without a time inherits the previous one's, keeping keys monotone.
        if e.time_ms is not None:
            time_ms = e.time_ms
        key = (time_ms, e.index)
        fields = {n: getattr(e, n) for n in FIELDS
                  if n != "time_ms" and getattr(e, n) is not None}
        if "value" in fields:
            fields["value"] = normalize_value(fields["value"])
        for k, v in e.extra.items():
            fields.setdefault(k, v)
        op = ops.get(e.op_id)
        if e.type == "invoke":
            if op is not None:
                raise ValueError(f"event {e.index}: op {e.op_id} invoked twice")
            ops[e.op_id] = Op(e.op_id, e.process, e.f, None, fields, key, END_KEY)
        elif op is None:
            ops[e.op_id] = Op(e.op_id, e.process, e.f, e.type, fields, key, key)
        else:
            if op.type is not None:
                raise ValueError(f"event {e.index}: op {e.op_id} completed twice")
            if (op.process, op.f) != (e.process, e.f):
                raise ValueError(f"event {e.index}: completion does not match op {e.op_id}")
            op.type = e.type
            op.fields.update(fields)
            op.end = key
    for op in ops.values():
        if op.type is None:
            op.type = "unknown"  # never completed: it may or may not have happened
    return sorted(ops.values(), key=lambda op: op.start)


def _tp(t: Any, p: Any) -> str:
    return f"{t}/{p}"


def _matches(op: Op, topic: Any, partition: Any) -> bool:
    # None in a revoke or reset means "every topic" / "every partition".
    t, p = op.get("topic"), op.get("partition")
    return (t is None or t == topic) and (p is None or p == partition)


class _Drain:
    """Indexes of the final drain."""

    def __init__(self, records: list[tuple[Any, Any, int, Any]]):
        self.at: dict[tuple, set] = defaultdict(set)  # (t, p, o) -> values there
        self.positions: dict[Any, set] = defaultdict(set)  # value -> {(t, p, o)}
        offsets: dict[tuple, set] = defaultdict(set)
        for t, p, o, v in records:
            self.at[(t, p, o)].add(v)
            self.positions[v].add((t, p, o))
            offsets[(t, p)].add(o)
        self.offsets = {tp: sorted(os) for tp, os in offsets.items()}  # (t, p) -> sorted offsets

    def any_between(self, tp: tuple, lo: int, hi: int) -> bool:
        """Whether some drained offset o of tp has lo < o < hi."""
        offs = self.offsets.get(tp, [])
        i = bisect.bisect_right(offs, lo)
        return i < len(offs) and offs[i] < hi

    def in_range(self, tp: tuple, lo: int, hi: int) -> list[int]:
        """Drained offsets o of tp with lo <= o < hi."""
        offs = self.offsets.get(tp, [])
        return offs[bisect.bisect_left(offs, lo): bisect.bisect_left(offs, hi)]


def _drain_records(final_drain: Iterable[Any] | None, ops: list[Op]) -> list[tuple] | None:
    if final_drain is not None:
        raw = [_drain_tuple(r) for r in final_drain]
    else:
        drain_ops = [op for op in ops if op.f == "drain" and op.type == "ok"]
        if not drain_ops:
            return None
        # Drain events without an offset are record_drain's end marker, not records.
        raw = [(op.get("topic"), op.get("partition"), op.get("offset"), op.get("value"))
               for op in drain_ops if op.get("offset") is not None]
    out = []
    for t, p, o, v in raw:
        if t is None or p is None or not isinstance(o, int) or o < 0:
            raise ValueError(f"malformed drain record {(t, p, o, v)!r}")
        out.append((t, p, o, normalize_value(v)))
    return out


def check(history: History | Iterable[Event], final_drain: Iterable[Any] | None = None, *,
          log_start: Mapping[tuple[Any, Any], int] | None = None) -> Report:
    """Checks a history (and the final drain) for every anomaly in ANOMALIES."""
    events = history.events() if isinstance(history, History) else list(history)
    ops = resolve_ops(events)
    records = _drain_records(final_drain, ops)
    starts = dict(log_start or {})
    tally = _Tally()

    sends = [op for op in ops if op.f == "send"]
    for op in sends:
        if op.get("value") is None:
            raise ValueError(f"send without a value: {op}")
    polls = [op for op in ops if op.f == "poll" and op.type == "ok"
             and None not in (op.get("topic"), op.get("partition"), op.get("offset"))]
    commits = [op for op in ops if op.f == "commit" and op.type == "ok"
               and None not in (op.get("topic"), op.get("partition"), op.get("offset"))]
    resets = [op for op in ops if op.f == "reset" and op.type == "ok"]
    ownership = _ownership_intervals(ops)
    drain = _Drain(records) if records is not None else None

    if drain is not None:
        _check_acked_sends(sends, drain, starts, tally)
        _check_duplicates(records, drain, tally)
    _check_inconsistent_offsets(sends, polls, records or [], tally)
    _check_send_order(sends, tally)
    if drain is not None:
        _check_drain_gaps(drain, starts, tally)
        _check_poll_skips(ops, drain, tally)
    _check_committed_regression(commits, resets, tally)
    _check_stale_epoch_commits(commits, ownership, tally)
    _check_double_ownership(ownership, tally)
    if drain is not None:
        _check_undelivered_below_commit(commits, resets, polls, drain, starts, tally)
    _check_failed_but_present(sends, polls, drain, tally)
    _check_phantom_reads(polls, drain, starts, tally)
    _check_hw_regressions([op for op in ops if op.f == "hw" and op.type == "ok"], tally)
    _check_replica_divergence([op for op in ops if op.f == "replica" and op.type == "ok"], tally)
    return tally.report(drain_checked=drain is not None)


def _check_acked_sends(sends: list[Op], drain: _Drain, starts: dict, tally: _Tally) -> None:
    for op in sends:
        if op.type != "ok":
            continue
        t, p, o, v = op.get("topic"), op.get("partition"), op.get("offset"), op.get("value")
        located = None not in (t, p, o)
        if located and o < starts.get((t, p), 0):
            continue  # removed by retention, not lost
        if located and v not in drain.at.get((t, p, o), ()):
            there = sorted(drain.at.get((t, p, o), ()), key=repr)
            tally.add("lost", f"{op}: drain has {there or 'nothing'} at {_tp(t, p)}@{o}")
        if v not in drain.positions:
            tally.add("unseen", f"{op}: value not in the drain")


def _check_duplicates(records: list[tuple], drain: _Drain, tally: _Tally) -> None:
    reported = set()
    for _t, _p, _o, v in records:  # drain order, so examples are the first ones drained
        if v in reported or len(drain.positions[v]) < 2:
            continue
        reported.add(v)
        where = ", ".join(f"{_tp(t, p)}@{o}" for t, p, o in sorted(drain.positions[v], key=repr))
        tally.add("duplicates", f"value {v!r} at {where}")


def _check_inconsistent_offsets(sends: list[Op], polls: list[Op], records: list[tuple],
                                tally: _Tally) -> None:
    seen: dict[tuple, dict[Any, str]] = {}  # (t, p, o) -> value -> where it was first seen
    order: list[tuple] = []

    def observe(t: Any, p: Any, o: Any, v: Any, source: str) -> None:
        if (t, p, o) not in seen:
            seen[(t, p, o)] = {}
            order.append((t, p, o))
        seen[(t, p, o)].setdefault(v, source)

    for t, p, o, v in records:
        observe(t, p, o, v, "drain")
    for op in polls:
        observe(op.get("topic"), op.get("partition"), op.get("offset"), op.get("value"),
                f"poll op#{op.op_id} by {op.process}")
    for op in sends:
        if op.type == "ok" and None not in (op.get("topic"), op.get("partition"), op.get("offset")):
            observe(op.get("topic"), op.get("partition"), op.get("offset"), op.get("value"),
                    f"ack of op#{op.op_id} by {op.process}")
    for tpo in order:
        values = seen[tpo]
        if len(values) > 1:
            shown = ", ".join(f"{v!r} ({src})" for v, src in values.items())
            tally.add("inconsistent_offsets", f"{_tp(tpo[0], tpo[1])}@{tpo[2]}: {shown}")


def _check_send_order(sends: list[Op], tally: _Tally) -> None:
    by_stream: dict[tuple, list[Op]] = defaultdict(list)
    for op in sends:  # already in invoke order
        if op.type == "ok" and None not in (op.get("topic"), op.get("partition"), op.get("offset")):
            by_stream[(op.process, op.get("topic"), op.get("partition"))].append(op)
    for (process, t, p), stream in by_stream.items():
        for a, b in zip(stream, stream[1:]):
            if b.get("offset") <= a.get("offset"):
                tally.add("reordered", f"{process} {_tp(t, p)}: op#{a.op_id} acked at "
                          f"{a.get('offset')}, later-invoked op#{b.op_id} at {b.get('offset')}")


def _check_drain_gaps(drain: _Drain, starts: dict, tally: _Tally) -> None:
    for (t, p), offs in drain.offsets.items():
        expected = starts.get((t, p), 0)
        for o in offs:
            if o > expected:
                tally.add("drain_gaps", f"{_tp(t, p)}: offsets {expected}..{o - 1} missing")
            expected = max(expected, o + 1)


def _check_poll_skips(ops: list[Op], drain: _Drain, tally: _Tally) -> None:
    last: dict[tuple, Op] = {}  # (process, topic, partition) -> last poll in this ownership
    member_of: dict[str, Any] = {}  # process -> member id it polled as
    stream = [op for op in ops if op.type == "ok" and op.f in ("poll", "assign", "revoke")]
    stream.sort(key=lambda op: op.end)
    for op in stream:
        if op.f == "poll":
            t, p, o = op.get("topic"), op.get("partition"), op.get("offset")
            if None in (t, p, o):
                continue
            member_of[op.process] = op.member
            prev = last.get((op.process, t, p))
            if prev is not None:
                po = prev.get("offset")
                # Going back (a seek, a re-fetch) is allowed; skipping over existing records is not.
                if o > po + 1 and drain.any_between((t, p), po, o):
                    tally.add("poll_skips", f"{op.process} {_tp(t, p)}: polled {po} "
                              f"(op#{prev.op_id}) then {o} (op#{op.op_id})")
            last[(op.process, t, p)] = op
        else:
            # An assign or revoke starts a new ownership for the process it names, whether the
            # consumer recorded it or the coordinator recorded an eviction of that member.
            m = op.member
            for key in list(last):
                process, t, p = key
                if (process == op.process or member_of.get(process, process) == m) \
                        and _matches(op, t, p):
                    del last[key]


def _check_committed_regression(commits: list[Op], resets: list[Op], tally: _Tally) -> None:
    # Sweep in key order: a commit compares against the highest commit that had completed
    # when it was invoked; commits concurrent with it may have been applied in either order.
    stream = []
    for op in commits:
        stream.append((op.start, 0, op))
        stream.append((op.end, 1, op))
    for op in resets:
        stream.append((op.end, 1, op))
    stream.sort(key=lambda x: (x[0], x[1]))
    high: dict[tuple, Op] = {}  # (group, topic, partition) -> highest completed commit
    at_invoke: dict[int, tuple[tuple, Op | None]] = {}  # in-flight commit -> (gtp, high then)
    for _key, phase, op in stream:
        if op.f == "reset":
            g = op.get("group")
            for gtp in list(high):
                if gtp[0] == g and _matches(op, gtp[1], gtp[2]):
                    del high[gtp]
            for op_id, (gtp, _h) in list(at_invoke.items()):
                if gtp[0] == g and _matches(op, gtp[1], gtp[2]):
                    at_invoke[op_id] = (gtp, None)
            continue
        gtp = (op.get("group"), op.get("topic"), op.get("partition"))
        if phase == 0:
            at_invoke[op.op_id] = (gtp, high.get(gtp))
            continue
        _gtp, before = at_invoke.pop(op.op_id)
        if before is not None and op.get("offset") < before.get("offset"):
            tally.add("committed_regression", f"{op} after op#{before.op_id} committed "
                      f"{before.get('offset')}")
        if gtp not in high or op.get("offset") > high[gtp].get("offset"):
            high[gtp] = op


@dataclass(slots=True)
class Ownership:
    member: Any  # the owning member (its process if the events named none)
    epoch: int | None  # the epoch the assign carried
    start: Key  # completion key of the assign
    end: Key  # when it stopped acting as owner: completion key of the revoke or re-assign, or
    # for a lost revoke the start key of its last act as owner; END_KEY if still owned
    assign_op: int  # op id of the assign, for examples
    believed_end: Key = END_KEY  # completion key of the revoke or re-assign (the member's own
    # view, even when it learned of a loss late); END_KEY if still owned
    superseded: Key = END_KEY  # start of the next interval of the partition held by another member


def _acts(ops: list[Op]) -> dict[tuple, list[Key]]:
    """(group, topic, partition, member) -> sorted start keys of what the member did as owner:
    ok polls of a record and ok commits (not observed offsets)."""
    out: dict[tuple, list[Key]] = defaultdict(list)
    for op in ops:
        if op.type != "ok" or op.f not in ("poll", "commit") or op.get("observed"):
            continue
        t, p, o = op.get("topic"), op.get("partition"), op.get("offset")
        if None not in (t, p, o):
            out[(op.get("group"), t, p, op.member)].append(op.start)
    for keys in out.values():
        keys.sort()
    return out


def _ownership_intervals(ops: list[Op]) -> dict[tuple, list[Ownership]]:
    """(group, topic, partition) -> ownership intervals, ordered by start."""
    stream = [op for op in ops if op.type == "ok" and op.f in ("assign", "revoke")]
    stream.sort(key=lambda op: op.end)
    acts = _acts(ops)
    open_: dict[tuple, Ownership] = {}  # (group, topic, partition, member) -> open interval
    out: dict[tuple, list[Ownership]] = defaultdict(list)
    for op in stream:
        g, m = op.get("group"), op.member
        if op.f == "assign":
            t, p = op.get("topic"), op.get("partition")
            if t is None or p is None:
                raise ValueError(f"assign needs a topic and a partition: {op}")
            key = (g, t, p, m)
            if key in open_:  # re-assigned under a newer epoch: a new interval starts here
                iv = open_.pop(key)
                iv.end = iv.believed_end = op.end
            iv = Ownership(m, op.get("epoch"), op.end, END_KEY, op.op_id)
            open_[key] = iv
            out[(g, t, p)].append(iv)
        else:
            lost = bool(op.get("lost"))
            for key in list(open_):
                if key[0] == g and key[3] == m and _matches(op, key[1], key[2]):
                    iv = open_.pop(key)
                    iv.end = iv.believed_end = op.end
                    if lost:
                        # It learned of the loss late; it last acted as owner at its last act.
                        keys = acts.get(key, [])
                        i = bisect.bisect_right(keys, op.end)
                        iv.end = max(iv.start, keys[i - 1]) if i else iv.start
    for ivs in out.values():
        ivs.sort(key=lambda iv: iv.start)
        for i, iv in enumerate(ivs):
            iv.superseded = next((b.start for b in ivs[i + 1:] if b.member != iv.member), END_KEY)
    return out


def _check_stale_epoch_commits(commits: list[Op], ownership: dict[tuple, list[Ownership]],
                               tally: _Tally) -> None:
    for op in commits:
        if op.get("observed"):
            continue  # a committed offset read back: nobody sent it, there is no epoch to fence
        gtp = (op.get("group"), op.get("topic"), op.get("partition"))
        intervals = ownership.get(gtp)
        if intervals is None:
            continue  # never assigned by a group: manual assignment, nothing to fence
        epoch, m = op.get("epoch"), op.member
        # The commit took effect somewhere in [start, end]; any overlap with a matching
        # ownership is enough to believe it was accepted legitimately. The member's own view
        # of its ownership counts, up to the moment another member was given the partition.
        legit = any(
            iv.member == m and iv.start <= op.end and op.start <= min(iv.believed_end, iv.superseded)
            and (epoch is None or iv.epoch is None or iv.epoch <= epoch)
            for iv in intervals
        )
        if not legit:
            owners = [f"{iv.member}@epoch{iv.epoch}" for iv in intervals
                      if iv.start <= op.end and op.start <= iv.believed_end]
            tally.add("stale_epoch_commit_accepted",
                      f"{op}; owners during the commit: {owners or 'none'}")


def _check_double_ownership(ownership: dict[tuple, list[Ownership]], tally: _Tally) -> None:
    for (g, t, p), ivs in ownership.items():
        for i, a in enumerate(ivs):
            for b in ivs[i + 1:]:
                if b.start >= a.end:
                    break  # sorted by start: no later interval overlaps a either
                if a.member != b.member:
                    tally.add("double_ownership", f"group {g} {_tp(t, p)}: {a.member} "
                              f"(assign op#{a.assign_op}) and {b.member} (assign op#{b.assign_op})")


def _check_undelivered_below_commit(commits: list[Op], resets: list[Op], polls: list[Op],
                                    drain: _Drain, starts: dict, tally: _Tally) -> None:
    final: dict[tuple, Op] = {}  # (group, topic, partition) -> last ok commit to complete
    for op in sorted(commits, key=lambda op: op.end):
        final[(op.get("group"), op.get("topic"), op.get("partition"))] = op
    polled: dict[tuple, set] = defaultdict(set)  # (group, topic, partition) -> offsets polled
    for op in polls:
        polled[(op.get("group"), op.get("topic"), op.get("partition"))].add(op.get("offset"))
    for (g, t, p), c in final.items():
        floor = starts.get((t, p), 0)
        latest_reset = None
        for r in resets:
            if r.get("group") == g and _matches(r, t, p) and r.end < c.end \
                    and (latest_reset is None or r.end > latest_reset.end):
                latest_reset = r
        if latest_reset is not None and latest_reset.get("offset") is not None:
            floor = max(floor, latest_reset.get("offset"))
        for o in drain.in_range((t, p), floor, c.get("offset")):
            # A poll recorded without a group counts for every group.
            if o not in polled[(g, t, p)] and o not in polled[(None, t, p)]:
                tally.add("undelivered_below_commit", f"group {g} {_tp(t, p)}@{o}: below "
                          f"final commit {c.get('offset')} (op#{c.op_id}), never polled")


def _check_failed_but_present(sends: list[Op], polls: list[Op], drain: _Drain | None,
                              tally: _Tally) -> None:
    explained = {op.get("value") for op in sends if op.type in ("ok", "unknown")}
    present = {op.get("value") for op in polls}
    if drain is not None:
        present.update(drain.positions)
    for op in sends:
        v = op.get("value")
        if op.type == "fail" and v in present and v not in explained:
            tally.add("failed_but_present", f"{op}: value was written")


def _check_phantom_reads(polls: list[Op], drain: _Drain | None, starts: dict, tally: _Tally) -> None:
    by_tpo: dict[tuple, list[Op]] = defaultdict(list)  # (t, p, o) -> ok polls there, by start
    for op in polls:  # already in start order
        by_tpo[(op.get("topic"), op.get("partition"), op.get("offset"))].append(op)
    for (t, p, o), reads in by_tpo.items():
        reported = set()
        for op in reads:
            v = op.get("value")
            if v in reported:
                continue
            if drain is not None and o >= starts.get((t, p), 0):
                if v in drain.at.get((t, p, o), ()):
                    continue
                there = sorted(drain.at.get((t, p, o), ()), key=repr)
                why = f"the final drain has {there or 'nothing'} there"
            else:
                later = next((b for b in reads if b.start > op.end and b.get("value") != v), None)
                if later is None:
                    continue
                why = f"op#{later.op_id} by {later.process} read {later.get('value')!r} there later"
            reported.add(v)
            tally.add("phantom_reads", f"{op.process} read {v!r} at {_tp(t, p)}@{o} (op#{op.op_id}); {why}")


def _check_hw_regressions(observations: list[Op], tally: _Tally) -> None:
    # Sweep in key order, as committed_regression does: an observation is compared with the
    # highest one completed before it was invoked; concurrent ones may have been answered in
    # either order.
    stream = []
    for op in observations:
        if not isinstance(op.get("offset"), int) or op.get("offset") < 0 or None in (op.get("topic"), op.get("partition")):
            continue
        stream.append((op.start, 0, op))
        stream.append((op.end, 1, op))
    stream.sort(key=lambda x: (x[0], x[1]))
    high: dict[tuple, Op] = {}  # (topic, partition) -> highest completed observation
    at_invoke: dict[int, Op | None] = {}
    reported = set()
    for _key, phase, op in stream:
        tp = (op.get("topic"), op.get("partition"))
        if phase == 0:
            at_invoke[op.op_id] = high.get(tp)
            continue
        before = at_invoke.pop(op.op_id)
        o = op.get("offset")
        if before is not None and o < before.get("offset") and (tp, before.get("offset"), o) not in reported:
            reported.add((tp, before.get("offset"), o))
            tally.add("hw_regressions", f"{_tp(*tp)}: {op.process} saw {o} (op#{op.op_id}{_whom(op)}) after "
                      f"{before.process} saw {before.get('offset')} (op#{before.op_id}{_whom(before)})")
        if tp not in high or o > high[tp].get("offset"):
            high[tp] = op


def _whom(op: Op) -> str:
    node = op.get("node")
    return "" if node is None else f" from node {node}"


def _check_replica_divergence(replicas: list[Op], tally: _Tally) -> None:
    by_tp: dict[tuple, list[Op]] = defaultdict(list)
    for op in replicas:
        by_tp[(op.get("topic"), op.get("partition"))].append(op)
    for (t, p), ops in by_tp.items():
        below = max(op.get("offset") or 0 for op in ops)
        short = [op for op in ops if op.get("end") is not None and op.get("end") < below]
        if len({op.get("digest") for op in ops}) > 1 or short:
            shown = ", ".join(
                f"node {op.get('node')} {str(op.get('digest'))[:12]} to {op.get('end')}"
                + (f" (differs from {op.get('diverges_at')})" if op.get("diverges_at") is not None else "")
                for op in sorted(ops, key=lambda op: repr(op.get("node"))))
            tally.add("replica_divergence", f"{_tp(t, p)} below {below}: {shown}")
