"""The bookkeeping of one partition's log: its offsets, its size, its idempotent producers, its leader
epochs and its high watermark. Pure.

No LMDB here: ``LogStore`` owns the bytes and calls into this to decide where a batch goes and whether it
is a retry of one already stored. Keeping the decisions pure lets the node roll them back exactly when a
transaction fails (map full, disk full), so memory never runs ahead of what is on disk.

Idempotent producing (Kafka's rules): each producer id carries an epoch and a per-partition sequence.
For a batch of producer ``pid`` with ``epoch`` and ``base_sequence``:
- a producer id not seen before must start at sequence 0;
- an older epoch than the one stored is fenced (ProducerFenced);
- a newer epoch must start at sequence 0;
- a batch equal to one of the last ``PRODUCER_BATCHES_KEPT`` stored batches is a retry: it is not written
  again, and the reply carries the offset it was stored at;
- the next sequence after the last stored one is appended; anything else is a gap (OutOfOrderSequence),
  which the producer answers by resending its earlier batches first. Sequences wrap from 2**31 - 1 to 0
  (bus/kafka_batch.py ``sequence_after``), as Kafka's do.

Leader epochs (Kafka's LeaderEpochFileCache, KIP-101/KIP-279): ``epochs`` says which leader appended
which part of the log, so that a replica coming back finds where its log and the leader's part ways by
epoch rather than by high watermark (the high watermark can lag on a follower, and truncating to it loses
acknowledged records or keeps divergent ones). ``high_watermark`` is the highest offset known committed;
the node moves it, the store persists it.
"""

from __future__ import annotations

import copy

from bus.errors import OutOfOrderSequence, ProducerFenced
from bus.kafka_batch import SEQUENCE_MAX, sequence_after
from bus.wire import IDEMPOTENCE_WINDOW_BATCHES

PRODUCER_BATCHES_KEPT = IDEMPOTENCE_WINDOW_BATCHES  # a producer's whole in-flight window (bus/wire.py)

APPEND = "append"
DUPLICATE = "duplicate"


class PartitionLog:
    """Offsets and producer state of one partition. ``next_offset`` is the offset the next record gets."""

    __slots__ = ("name", "db", "start_offset", "next_offset", "size_bytes", "producers", "epochs",
                 "high_watermark")

    def __init__(self, name: str, db=None, start_offset: int = 0, next_offset: int = 0, size_bytes: int = 0,
                 producers: dict | None = None, epochs: list | None = None, high_watermark: int | None = None):
        assert 0 <= start_offset <= next_offset, (start_offset, next_offset)
        self.name = name
        self.db = db  # the store's handle on the batches (an LMDB database), carried for it; never used here
        self.start_offset = start_offset  # lowest offset still stored (retention moves it up)
        self.next_offset = next_offset  # one past the last stored record: the log end offset
        self.size_bytes = size_bytes  # bytes of stored batches, for retention by size
        # producer id -> (epoch, ((base_sequence, last_sequence, base_offset), ...) newest last)
        self.producers: dict[int, tuple[int, tuple]] = producers or {}
        # [(leader_epoch, start_offset), ...] ascending: from start_offset on, the leader of leader_epoch
        # appended. Replaced, never changed in place, so an undo token can hold the previous list.
        self.epochs: list[tuple[int, int]] = list(epochs or ())
        # The highest offset known committed. None: no record of it (a log written before replication),
        # whose every batch was acknowledged when written: the log end.
        self.high_watermark = next_offset if high_watermark is None else high_watermark

    def check_sequence(self, producer_id: int, epoch: int, base_sequence: int, record_count: int):
        """Decide what to do with a batch: (APPEND, None) or (DUPLICATE, base_offset); raises on fence/gap."""
        if producer_id < 0:
            return APPEND, None
        entry = self.producers.get(producer_id)
        if entry is None:
            # A new producer starts at sequence 0. Accepting any other first sequence would let a later
            # batch land before an earlier one that is still being retried (e.g. after NOT_OWNER).
            if base_sequence != 0:
                raise OutOfOrderSequence(
                    f"producer {producer_id} is new to partition {self.name} and must start at sequence 0, "
                    f"not {base_sequence}")
            return APPEND, None
        stored_epoch, batches = entry
        if epoch < stored_epoch:
            raise ProducerFenced(f"producer {producer_id} epoch {epoch} is older than {stored_epoch}")
        if epoch > stored_epoch:
            if base_sequence != 0:
                raise OutOfOrderSequence(f"producer {producer_id} new epoch {epoch} must start at sequence 0")
            return APPEND, None
        last_sequence = sequence_after(base_sequence, record_count - 1)
        for first, last, base_offset in batches:
            if first == base_sequence and last == last_sequence:
                return DUPLICATE, base_offset
        expected = sequence_after(batches[-1][1], 1)
        if base_sequence != expected:
            raise OutOfOrderSequence(
                f"producer {producer_id} sent sequence {base_sequence}, partition {self.name} expects {expected}")
        return APPEND, None

    def record_append(self, producer_id: int, epoch: int, base_sequence: int, record_count: int,
                      batch_bytes: int, leader_epoch: int | None = None) -> tuple:
        """Account for a batch appended at ``next_offset``. A follower's append names the epoch of the
        leader that wrote it (``leader_epoch``, from the batch), recorded in ``epochs`` when it is new
        here; a leader's own epoch was recorded when it began (``record_epoch``). Returns an undo token
        for ``undo``."""
        token = (self.next_offset, self.size_bytes, self.epochs, self.high_watermark, producer_id,
                 self.producers.get(producer_id))
        base_offset = self.next_offset
        if leader_epoch is not None and leader_epoch != self.latest_epoch():
            self.record_epoch(leader_epoch, base_offset)
        self.next_offset += record_count
        self.size_bytes += batch_bytes
        if producer_id >= 0:
            entry = self.producers.get(producer_id)
            kept = entry[1] if entry is not None and entry[0] == epoch else ()
            # A leader's own append continues the window (check_sequence saw to it). A follower's
            # (``leader_epoch`` given) copies what its leader accepted, which may not: a leader that forgot
            # the producer (its batches gone to retention, and the leader's replica rebuilt from what was
            # left) took a sequence 0 again. The window then starts afresh, as the leader's did.
            if leader_epoch is not None and kept and sequence_after(kept[-1][1], 1) != base_sequence:
                kept = ()
            batch = (base_sequence, sequence_after(base_sequence, record_count - 1), base_offset)
            self.producers[producer_id] = (epoch, (kept + (batch,))[-PRODUCER_BATCHES_KEPT:])
        return token

    def undo(self, token: tuple) -> None:
        """Take back one ``record_append`` (tokens are undone newest first)."""
        self.next_offset, self.size_bytes, self.epochs, self.high_watermark, producer_id, entry = token
        if producer_id >= 0:
            if entry is None:
                self.producers.pop(producer_id, None)
            else:
                self.producers[producer_id] = entry

    def record_truncate_head(self, new_start_offset: int, dropped_bytes: int) -> None:
        """Retention dropped whole batches below ``new_start_offset`` (never above the high watermark).

        The epoch entry in force at the new start is kept, moved up to start there (Kafka's
        ``truncateFromStart``): the batches from there on were still appended in that epoch."""
        assert self.start_offset <= new_start_offset <= self.high_watermark, (
            self.start_offset, new_start_offset, self.high_watermark)
        self.start_offset = new_start_offset
        self.size_bytes -= dropped_bytes
        assert self.size_bytes >= 0
        below = [e for e in self.epochs if e[1] <= new_start_offset]
        if below:
            self.epochs = [(below[-1][0], new_start_offset)] + self.epochs[len(below):]

    # -- leader epochs -----------------------------------------------------------------------------

    def latest_epoch(self) -> int:
        """The epoch of the latest leader that appended (or began appending) here; -1 for none."""
        return self.epochs[-1][0] if self.epochs else -1

    def epoch_at_end(self) -> int:
        """The epoch of the leader that appended the last stored batch, as recorded; -1 for none. Below
        ``latest_epoch`` only when that one began and appended nothing yet."""
        return next((epoch for epoch, start in reversed(self.epochs) if start < self.next_offset), -1)

    def record_epoch(self, epoch: int, start_offset: int) -> None:
        """From ``start_offset`` (the log end) on, the leader of ``epoch`` appends. Entries that start
        there appended nothing and give way (as Kafka's ``assign`` drops them), so start offsets stay
        strictly increasing; an epoch equal to the one in force at the end adds no entry. ``epoch`` -1 (a
        batch from before epochs were kept) only drops those empty entries."""
        assert start_offset == self.next_offset, (start_offset, self.next_offset)
        kept = [e for e in self.epochs if e[1] < start_offset]
        in_force = kept[-1][0] if kept else -1
        # An older epoch than one that appended batches here would make the log diverge: the follower
        # must truncate first (``truncation_offset``); the store refuses such data before this point.
        assert epoch >= in_force, (epoch, self.epochs)
        self.epochs = kept + [(epoch, start_offset)] if epoch > in_force else kept

    def end_offset_for_epoch(self, epoch: int) -> tuple[int, int]:
        """``(epoch_found, end_offset)``: the end of ``epoch`` in this log, exactly Kafka's
        ``LeaderEpochFileCache.endOffsetFor``. The latest epoch ends at the log end. An older one ends
        where the next higher epoch starts, reported under the largest epoch not above it (a leader asked
        for an epoch it never had answers with the one before it, so the follower cuts where they agree);
        below every entry, under the epoch asked. ``(-1, -1)``: undefined (no epochs, epoch -1, or an epoch
        newer than any here)."""
        if epoch == -1 or not self.epochs:
            return -1, -1
        if epoch == self.epochs[-1][0]:
            return epoch, self.next_offset
        higher = next((e for e in self.epochs if e[0] > epoch), None)
        if higher is None:
            return -1, -1
        floor = [e for e in self.epochs if e[0] <= epoch]
        return (floor[-1][0] if floor else epoch), higher[1]

    def epoch_for_offset(self, offset: int) -> int:
        """The epoch of the leader that appended at ``offset``: the entry starting at it, else the last
        one starting below it (Kafka's ``LeaderEpochFileCache.epochForOffset``); -1 for none."""
        return next((epoch for epoch, start in reversed(self.epochs) if start <= offset), -1)

    def truncation_offset(self, leader_epoch: int, leader_end_offset: int) -> tuple[int, bool]:
        """Where this (follower's) log must be cut, given the leader's answer ``(leader_epoch,
        leader_end_offset)`` to ``end_offset_for_epoch`` of this log's latest epoch: ``(offset, complete)``,
        Kafka's ``AbstractFetcherThread.getOffsetTruncationState``. Why each branch is safe (KIP-279: a
        follower may have appended, in an epoch the leader never saw, records the leader lacks, and the
        leader may hold, at the same offsets, other records of a later epoch):

        - This log has ``leader_epoch`` too: both logs hold the same batches up to the end of that epoch on
          both sides (a leader's batches of one epoch are one sequence, copied verbatim), so everything
          below the smaller end agrees and everything above it may not. Complete.
        - This log never had ``leader_epoch`` (its answer names an older one): it agrees with the leader at
          most up to the end of that older epoch here, so cutting there removes only what may diverge; the
          leader may still disagree below it, so the next fetch asks again with the latest epoch left.
          Not complete.
        - Undefined (the leader's answer is (-1, -1), or this log has no epochs: data from before epochs
          were kept): no epoch proves where the logs part, so it keeps at most the leader's end, and never
          cuts below its own high watermark, which is committed and so on the leader too (Kafka truncates
          to the high watermark when the leader's answer is undefined). Complete.
        """
        own_epoch, own_end = self.end_offset_for_epoch(leader_epoch)
        if own_epoch == -1:
            return max(min(leader_end_offset, self.next_offset), self.high_watermark), True
        assert own_epoch <= leader_epoch, (own_epoch, leader_epoch)
        if own_epoch == leader_epoch:
            return min(own_end, leader_end_offset, self.next_offset), True
        return min(own_end, self.next_offset), False

    # -- the high watermark and the tail -------------------------------------------------------------

    def set_high_watermark(self, offset: int) -> None:
        """The node learnt that everything below ``offset`` is committed. It never goes down (but by
        truncation, below)."""
        assert self.high_watermark <= offset <= self.next_offset, (self.high_watermark, offset, self.next_offset)
        self.high_watermark = offset

    def record_truncate_tail(self, offset: int, removed_bytes: int, headers_before) -> None:
        """The batches at and above ``offset`` (a batch boundary) were removed: the bookkeeping becomes
        exactly what it would be had they never been appended.

        ``headers_before`` yields the headers of the batches still stored below ``offset``, newest first;
        it is read only as far as needed, to rebuild the window of a producer that lost remembered batches
        (a window that lost its newest batches may have pushed out older ones that now belong in it).
        A producer with no batch left in the log is forgotten."""
        assert self.start_offset <= offset <= self.next_offset, (self.start_offset, offset, self.next_offset)
        self.next_offset = offset
        self.size_bytes -= removed_bytes
        assert self.size_bytes >= 0 and (self.size_bytes == 0) == (offset == self.start_offset), (
            self.size_bytes, offset, self.start_offset)
        self.epochs = [e for e in self.epochs if e[1] < offset]
        self.high_watermark = min(self.high_watermark, offset)
        # Producers whose window is unchanged, those whose remaining window is the whole of their epoch
        # (the window was never full, so nothing was pushed out), and those to rebuild from the log.
        rebuild = {}
        for producer_id, (epoch, batches) in list(self.producers.items()):
            kept = tuple(b for b in batches if b[2] < offset)
            if len(kept) == len(batches):
                continue
            if kept and len(batches) < PRODUCER_BATCHES_KEPT:
                self.producers[producer_id] = (epoch, kept)
            else:
                rebuild[producer_id] = (epoch, kept)
                del self.producers[producer_id]
        if rebuild:
            self.producers.update(_windows_from_log(rebuild, headers_before))

    def reset(self, offset: int) -> None:
        """The log was emptied and starts again at ``offset`` (Kafka's truncateFullyAndStartAt)."""
        assert offset >= 0, offset
        self.start_offset = self.next_offset = self.high_watermark = offset
        self.size_bytes = 0
        self.epochs = []
        self.producers = {}

    def copy(self) -> "PartitionLog":
        """A draft to decide a whole-log change on (truncation, retention, a new epoch) before it is
        written; ``adopt`` takes it once written."""
        draft = copy.copy(self)
        draft.producers = dict(self.producers)
        return draft

    def adopt(self, draft: "PartitionLog") -> None:
        assert draft.name == self.name and draft.db is self.db, (draft.name, self.name)
        for slot in self.__slots__:
            setattr(self, slot, getattr(draft, slot))

    def check_invariants(self) -> None:
        """What must always hold of this bookkeeping; raises AssertionError (also under ``python -O``)."""
        _check(0 <= self.start_offset <= self.high_watermark <= self.next_offset,
               f"{self.name}: need 0 <= start {self.start_offset} <= high watermark {self.high_watermark} "
               f"<= end {self.next_offset}")
        _check(self.size_bytes >= 0 and (self.size_bytes == 0) == (self.start_offset == self.next_offset),
               f"{self.name}: {self.size_bytes} bytes for offsets [{self.start_offset}, {self.next_offset})")
        for (epoch, start), (next_epoch, next_start) in zip(self.epochs, self.epochs[1:]):
            _check(epoch < next_epoch and start < next_start, f"{self.name}: epochs not increasing: {self.epochs}")
        _check(all(e >= 0 and self.start_offset <= s <= self.next_offset for e, s in self.epochs),
               f"{self.name}: epochs {self.epochs} outside [{self.start_offset}, {self.next_offset}]")
        for producer_id, (epoch, batches) in self.producers.items():
            _check(producer_id >= 0 and 0 < len(batches) <= PRODUCER_BATCHES_KEPT,
                   f"{self.name}: producer {producer_id} remembers {len(batches)} batches")
            for (first, last, base_offset), (next_first, _, next_base) in zip(batches, batches[1:]):
                _check(next_first == sequence_after(last, 1) and next_base > base_offset,
                       f"{self.name}: producer {producer_id} window not a sequence: {batches}")
            _check(all(0 <= f <= SEQUENCE_MAX and 0 <= l <= SEQUENCE_MAX and b < self.next_offset
                       for f, l, b in batches),
                   f"{self.name}: producer {producer_id} window {batches}: a sequence outside [0, {SEQUENCE_MAX}] "
                   f"or an offset past the log end {self.next_offset}")


def _windows_from_log(rebuild: dict, headers_before) -> dict:
    """The windows of the producers in ``rebuild`` (producer id -> (epoch, remembered batches still below
    the cut, oldest first), with epoch None when none is) rebuilt from ``headers_before`` (newest first):
    each producer's latest batches of the epoch of its latest one, up to PRODUCER_BATCHES_KEPT. A producer
    with no batch left is left out."""
    epochs = {pid: epoch for pid, (epoch, kept) in rebuild.items() if kept}
    found: dict[int, set] = {pid: set(kept) for pid, (_, kept) in rebuild.items()}
    open_ids = set(rebuild)  # producers whose window may still grow older
    for header in headers_before:
        if not open_ids:
            break
        pid = header.producer_id
        if pid not in open_ids:
            continue
        if epochs.setdefault(pid, header.producer_epoch) != header.producer_epoch:
            open_ids.discard(pid)  # an older epoch: a window holds its latest epoch's batches only
            continue
        found[pid].add((header.base_sequence, header.last_sequence, header.base_offset))
        if len(found[pid]) >= PRODUCER_BATCHES_KEPT:
            open_ids.discard(pid)
    # Remembered batches that retention already dropped from the log are kept with those found.
    return {pid: (epochs[pid], tuple(sorted(batches, key=lambda b: b[2])[-PRODUCER_BATCHES_KEPT:]))
            for pid, batches in found.items() if batches}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)
