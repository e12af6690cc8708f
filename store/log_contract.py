"""The storage contract of a node's partition logs, written once: ``LogContract`` does every operation in
terms of a few storage primitives, which ``LogStore`` (LMDB) and ``MemoryLogStore`` (memory) implement.

The operations (DESIGN.md, "One storage contract"; nats-server's store has the same shape):

- ``append(items)``: the leader's append (a producer's batches: idempotence checked, offsets and append
  time stamped, with the log's latest leader epoch), one transaction for the whole loop turn.
- ``begin_epoch(log, epoch)``: a new leader records where its epoch starts, before it appends in it.
- ``append_replica(log, data)``: a follower appends the leader's stored batches byte for byte.
- ``truncate_to(log, offset)``: a follower cuts a divergent tail (found by ``PartitionLog.truncation_offset``).
- ``reset_to(log, offset)``: a follower empties its log and starts it at the leader's log start.
- ``apply_retention``: drops whole batches from the head, never above the high watermark.
- ``read(log, offset, bytes_max, upto)``, ``record_for_time(log, timestamp_ms, upto)``,
  ``record_with_max_time(log, upto)``: up to a bound (the high watermark for consumers, the log end for
  followers).
- ``set_high_watermark``: in memory; checkpointed by ``flush_due`` every
  HIGH_WATERMARK_CHECKPOINT_INTERVAL_MS and by every write transaction.

This module owns the order of each operation: decide on the bookkeeping (``PartitionLog`` and the pure
functions below), write the batches and the bookkeeping they change in ONE transaction, and change the
bookkeeping in memory only as that transaction commits (a failed one is rolled back), so memory never runs
ahead of what is stored. It must never hold a storage detail: those are the primitives (``_open_db`` to
``_meta_items``), and a primitive holds no decision.

The bookkeeping as stored, in the ``__meta__`` keys (docs/storage.md): ``p:<name>`` -> [start_offset,
size_bytes, high_watermark], ``e:<name>`` -> [[leader_epoch, start_offset], ...], ``s:<name>\\0<producer id,
8 bytes>`` -> [producer_epoch, [[first_sequence, last_sequence, base_offset], ...]].
"""

from __future__ import annotations

import struct

import msgpack

from bus import batch as batch_format
from bus.errors import BusError, CorruptRecord, NodeIdentityMismatch, OffsetOutOfRange, StorageFull

from .partition_log import APPEND, PartitionLog

HIGH_WATERMARK_CHECKPOINT_INTERVAL_MS = 1_000  # flush_due writes moved high watermarks this often (Kafka's
# replication-offset-checkpoint): a restart may find an older one, which is safe (it only grows back)
_PID = struct.Struct(">q")


def _unpack(raw):
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# -- the decisions over stored batches (pure) --------------------------------------------------------

def admit_batch(log: PartitionLog, buf, append_ts_ms: int, append_ts_at) -> tuple:
    """What becomes of one batch a producer sent for ``log``, appended at ``append_ts_ms``:
    ``(stored, header, result)``.

    ``stored`` is the batch to write at ``log.next_offset``, stamped with that offset, the append time and
    the log's latest leader epoch (then ``result`` is its append result), or None when nothing is to be
    written: a refused batch (``result`` is its BusError: corrupt, sequence gap, fenced producer) or a
    recognised retry (``result`` names the original's offset and append time, read with
    ``append_ts_at(base_offset)``; duplicate=True). The caller writes ``stored`` and then records the append
    on ``log``. A result is ``(base_offset, append_ts_ms, duplicate)``.
    """
    try:
        stored, header = batch_format.stamp(buf, log.next_offset, append_ts_ms, log.latest_epoch())
        action, base_offset = log.check_sequence(header.producer_id, header.producer_epoch, header.base_sequence,
                                                 header.record_count)
    except BusError as exc:
        return None, None, exc
    if action is not APPEND:
        return None, header, (base_offset, append_ts_at(base_offset), True)
    return stored, header, (header.base_offset, append_ts_ms, False)


def replica_batches(log: PartitionLog, data) -> list:
    """The stored batches concatenated in ``data`` (as a leader's ``read`` returns them), checked to
    continue ``log``: ``[(header, batch bytes), ...]``. Each must be sound (CRC, magic, length), the first
    must start at the log end and each next one where the one before ended, and leader epochs must not go
    back (below the epoch in force at the log end: the follower must truncate first). Raises
    CorruptRecord, naming the first batch that does not fit, before anything is written."""
    out, view, at = [], memoryview(data), 0
    expected, epoch = log.next_offset, log.epoch_at_end()
    while at < len(view):
        header = batch_format.verify(view, at)
        if header.base_offset != expected:
            raise CorruptRecord(f"replica batch at base offset {header.base_offset} does not continue {log.name} "
                                f"at {expected}")
        if header.leader_epoch < epoch:
            raise CorruptRecord(f"replica batch at {header.base_offset} of leader epoch {header.leader_epoch} "
                                f"follows epoch {epoch} in {log.name}: truncate the divergent tail first")
        end = at + batch_format.HEADER_BYTES + header.payload_len
        out.append((header, view[at:end]))
        at, expected, epoch = end, header.next_offset, header.leader_epoch
    return out


def select_batches(batches, offset: int, end_offset: int, bytes_max: int, name: str) -> tuple[list, int]:
    """What a read serves from ``batches`` ((base offset key, stored batch), from the one holding
    ``offset`` on): at least one batch and then up to ``bytes_max``, only whole batches below
    ``end_offset``, each verified (a corrupt one is never served). Returns (batches, next fetch offset)."""
    chunks, total, next_offset = [], 0, offset
    for key, value in batches:
        if chunks and total + len(value) > bytes_max:
            break  # before verifying: a batch not served is not checked (nor reported)
        try:
            header = batch_format.verify(value)
            if header.base_offset != key:
                raise CorruptRecord(f"batch stored at {key} says base offset {header.base_offset} in {name}")
        except CorruptRecord:
            if chunks:
                break  # serve the good batches before it; the next read, starting at it, raises
            raise
        if header.next_offset <= offset:
            continue  # only when the offset sits in a retention gap; never served twice
        if header.next_offset > end_offset:
            break  # not (wholly) committed: a consumer sees no record above the high watermark
        chunks.append(value)
        total += len(value)
        next_offset = header.next_offset
    return chunks, next_offset


def _record_stamps(value, header) -> list[int] | None:
    """The timestamp of each record of a stored batch (a record without one of its own has the append
    time); None when every record has the append time (then it is ``max_ts_ms``). Verified first: a
    compressed payload is decompressed to read them, only for the one batch a lookup lands in."""
    batch_format.verify(value)
    stamps = batch_format.read_columns(value[batch_format.HEADER_BYTES:], header.record_count, header.attributes)[0]
    return None if stamps is None else [header.append_ts_ms if ts is None else ts for ts in stamps]


def record_at_time(batches, timestamp_ms: int, end_offset: int) -> tuple[int, int]:
    """``(offset, timestamp_ms)`` of the earliest record below ``end_offset`` whose timestamp is >=
    ``timestamp_ms`` among ``batches`` (stored batches in log order), else ``(end_offset, -1)``."""
    for value in batches:
        header = batch_format.read_header(value)
        if header.next_offset > end_offset:
            break
        if header.max_ts_ms < timestamp_ms:
            continue
        stamps = _record_stamps(value, header)
        if stamps is None:  # every record has the append time, which is then max_ts_ms: new enough
            return header.base_offset, header.max_ts_ms
        for index, own_ts_ms in enumerate(stamps):
            if own_ts_ms >= timestamp_ms:
                return header.base_offset + index, own_ts_ms
    return end_offset, -1


def record_with_max_time(batches, end_offset: int) -> tuple[int, int]:
    """``(offset, timestamp_ms)`` of the first record below ``end_offset`` with the largest timestamp
    (Kafka's ListOffsets MAX_TIMESTAMP, KIP-734), else ``(-1, -1)`` for none. Only the headers are read but
    for the one batch holding it."""
    best = None  # (max_ts_ms, value, header) of the first batch reaching the largest max_ts_ms so far
    for value in batches:
        header = batch_format.read_header(value)
        if header.next_offset > end_offset:
            break
        if best is None or header.max_ts_ms > best[0]:
            best = (header.max_ts_ms, value, header)
    if best is None:
        return -1, -1
    max_ts_ms, value, header = best
    stamps = _record_stamps(value, header)
    index = 0 if stamps is None else stamps.index(max(stamps))
    return header.base_offset + index, max_ts_ms


def retention_cut(log: PartitionLog, batches, now_ms: int, retention_ms: int | None,
                  retention_bytes: int | None) -> tuple[int, int, int]:
    """How many whole batches retention drops from the head of ``log`` (``batches``: the stored ones in
    log order): those older than ``retention_ms`` or that keep the log above ``retention_bytes``, and never
    one that ends above the high watermark (Kafka deletes only below it: a follower may still need them).
    Returns (batches, bytes, new start offset)."""
    dropped, dropped_bytes, new_start = 0, 0, log.start_offset
    for value in batches:
        header = batch_format.read_header(value)
        too_old = retention_ms is not None and header.max_ts_ms < now_ms - retention_ms
        too_big = retention_bytes is not None and log.size_bytes - dropped_bytes - len(value) >= retention_bytes
        if not (too_old or too_big) or header.next_offset > log.high_watermark:
            break
        dropped += 1
        dropped_bytes += len(value)
        new_start = header.next_offset
    return dropped, dropped_bytes, new_start


# -- the contract ----------------------------------------------------------------------------------

class LogContract:
    """The partition logs of one store. ``log_class`` makes each partition's bookkeeping: a subclass may
    change a decision of ``PartitionLog`` (the fault harness's builds of its own do), never the writes.

    ``clock_ms`` gives the append time (wall clock, ms; a simulator passes its own). With
    ``high_watermark_follows_append`` (the default: a node without followers, whose leader is its whole
    in-sync set) every leader append also moves the high watermark to the log end, in the same
    transaction; a replicating node passes False and moves it with ``set_high_watermark``."""

    log_class = PartitionLog

    def __init__(self, *, clock_ms, high_watermark_follows_append: bool = True):
        self.logs: dict[str, PartitionLog] = {}
        self._clock_ms = clock_ms
        self.high_watermark_follows_append = high_watermark_follows_append
        self._unsaved: dict[str, PartitionLog] = {}  # logs whose high watermark moved since it was written
        self._checkpoint_due_ms = 0  # when flush_due next writes them (monotonic)

    # -- identity and small node state -------------------------------------------------------------

    def claim_identity(self, identity: str) -> None:
        """Bind this store to ``identity`` (e.g. "node-2") forever; refuse one bound to another."""
        current = self.get_meta(b"identity")
        if current is None:
            self.put_meta(b"identity", identity)
        elif current != identity:
            raise NodeIdentityMismatch(
                f"data directory {self.path} belongs to {current}, not {identity}; "
                f"start {identity} with its own --data-dir")

    def get_meta(self, key: bytes, default=None):
        with self._reading() as txn:
            raw = self._meta_get(txn, key)
            return default if raw is None else _unpack(raw)

    def put_meta(self, key: bytes, value) -> None:
        self._transact(lambda txn, undo: self._meta_put(txn, key, _pack(value)))

    # -- partitions ------------------------------------------------------------------------------

    def open_partition(self, name: str) -> PartitionLog:
        """Open (creating if new) the log of partition ``name`` and rebuild its bookkeeping from storage."""
        log = self.logs.get(name)
        if log is not None:
            return log
        db = self._open_db(name)
        key = name.encode()
        with self._reading() as txn:
            state = self._meta_get(txn, b"p:" + key)
            # [start, size] before high watermarks were kept: every batch of such a log was acknowledged.
            start_offset, size_bytes, *high_watermark = _unpack(state) if state is not None else (0, 0)
            next_offset = start_offset
            last = self._last_batch(txn, db)
            if last is not None:
                # The log end comes from the last batch's header, so that header must be sound: a flipped
                # bit in its offset or count would silently hide the log or open a gap in it.
                last_key, value = last
                header = batch_format.verify(value)
                if header.base_offset != last_key:
                    raise CorruptRecord(f"last batch of {name} is stored at {last_key} "
                                        f"but says base offset {header.base_offset}")
                next_offset = max(next_offset, header.next_offset)
                if state is None:
                    start_offset = self._first_key(txn, db)
            producers = {}
            prefix = b"s:" + key + b"\0"
            for meta_key, raw in self._meta_items(txn, prefix):
                epoch, batches = _unpack(raw)
                producers[_PID.unpack(meta_key[len(prefix):])[0]] = (epoch, tuple(tuple(b) for b in batches))
            raw_epochs = self._meta_get(txn, b"e:" + key)
            epochs = [tuple(e) for e in _unpack(raw_epochs)] if raw_epochs is not None else []
        # A stored high watermark is a checkpoint that may predate the last truncation or retention.
        high_watermark = min(max(high_watermark[0], start_offset), next_offset) if high_watermark else None
        log = self.log_class(name, db, start_offset, next_offset, size_bytes, producers, epochs, high_watermark)
        self.logs[name] = log
        return log

    def drop_partition(self, name: str) -> None:
        """Delete a partition's log and its bookkeeping (its topic was deleted)."""
        log = self.open_partition(name)
        key = name.encode()
        self._unsaved.pop(name, None)

        def drop(txn, undo):
            self._drop_db(txn, log)
            self._meta_delete(txn, b"p:" + key)
            self._meta_delete(txn, b"e:" + key)
            for meta_key, _ in self._meta_items(txn, b"s:" + key + b"\0"):
                self._meta_delete(txn, meta_key)

        self._transact(drop)
        del self.logs[name]

    # -- the write path --------------------------------------------------------------------------

    def append(self, items: list) -> list:
        """The leader's append: ``[(PartitionLog, batch bytes as the producer sent it), ...]`` in one
        transaction.

        Returns one result per item, in order: ``(base_offset, append_ts_ms, duplicate)`` or a BusError for
        that item alone (corrupt batch, sequence gap, fenced producer). A storage failure fails them all.
        Every batch of the transaction gets the same append time.
        """
        append_ts_ms = self._clock_ms()

        def write(txn, undo):
            results, touched = self._admit_all(
                items, append_ts_ms, lambda log, base_offset, stored: self._put_batch(txn, log, base_offset, stored),
                lambda log, base_offset: self._append_ts_at(txn, log, base_offset), undo)
            for log in touched:
                self._put_bookkeeping(txn, log)
            return results

        try:
            return self._transact(write)
        except StorageFull as full:
            return [full] * len(items)

    def _admit_all(self, items: list, append_ts_ms: int, put, append_ts_at, undo: list) -> tuple[list, list]:
        """Decide every batch of ``items`` in order (``admit_batch``), hand each one to be stored to
        ``put(log, base_offset, stored)`` and account for it on its log, with an undo token in ``undo``.
        Returns (one result per item, the logs whose bookkeeping changed). ``append_ts_at(log, base_offset)``
        finds a recognised retry's original append time."""
        results, touched = [], {}
        for log, buf in items:
            stored, header, result = admit_batch(log, buf, append_ts_ms,
                                                 lambda base_offset, log=log: append_ts_at(log, base_offset))
            results.append(result)
            if stored is None:
                continue
            put(log, log.next_offset, stored)
            undo.append((log, log.record_append(header.producer_id, header.producer_epoch, header.base_sequence,
                                                header.record_count, len(stored))))
            if self.high_watermark_follows_append:
                log.set_high_watermark(log.next_offset)
            touched[log.name] = log
        return results, list(touched.values())

    def _append_ts_at(self, txn, log: PartitionLog, base_offset: int) -> int:
        """The append time of the stored batch at ``base_offset`` (-1 if retention dropped it)."""
        value = self._batch_at(txn, log, base_offset)
        return -1 if value is None else batch_format.read_header(value).append_ts_ms

    def begin_epoch(self, log: PartitionLog, epoch: int) -> None:
        """A new leader's epoch starts at the log end: recorded durably before the leader appends in it
        (so its batches are stamped with it). The same epoch again is a no-op; it never goes down."""
        assert epoch >= log.latest_epoch() and epoch >= 0, (epoch, log.epochs)
        if epoch != log.latest_epoch():
            self._rewrite(log, lambda txn, draft: draft.record_epoch(epoch, draft.next_offset))

    def append_replica(self, log: PartitionLog, data) -> int:
        """A follower's append: ``data`` is one or more stored batches of the leader, concatenated (as its
        ``read`` returns them), appended byte for byte at the log end in one transaction. Producer state
        and leader epochs follow each batch's header as on the leader, so a failover still deduplicates
        retries. Raises CorruptRecord (nothing written) for data that is unsound or does not continue this
        log, StorageFull (nothing written) for a full store. Returns the number of batches appended."""
        batches = replica_batches(log, data)
        if not batches:
            return 0

        def write(txn, undo):
            for header, stored in batches:
                self._put_batch(txn, log, header.base_offset, stored)
                undo.append((log, log.record_append(header.producer_id, header.producer_epoch, header.base_sequence,
                                                    header.record_count, len(stored), header.leader_epoch)))
            self._put_bookkeeping(txn, log)
            return len(batches)

        return self._transact(write)

    def truncate_to(self, log: PartitionLog, offset: int) -> None:
        """Remove every batch at or above ``offset``, a batch boundary in [start_offset, next_offset]
        (ValueError otherwise), with the epochs that start there or above; the high watermark drops to at
        most ``offset`` and the producer state becomes what it would be had those batches never been
        appended (rebuilt from the headers below ``offset`` where needed). One transaction."""
        if not log.start_offset <= offset <= log.next_offset:
            raise ValueError(f"truncation offset {offset} is outside [{log.start_offset}, {log.next_offset}] "
                             f"of {log.name}")
        if offset < log.next_offset:
            with self._reading() as txn:
                boundary = self._batch_at(txn, log, offset) is not None
            if not boundary:
                raise ValueError(f"truncation offset {offset} of {log.name} is inside a batch")

        def cut(txn, draft):
            removed_bytes = self._delete_tail(txn, log, offset)
            draft.record_truncate_tail(offset, removed_bytes, self._headers_before(txn, log, offset))

        self._rewrite(log, cut)

    def reset_to(self, log: PartitionLog, offset: int) -> None:
        """Empty the log and start it at ``offset`` (a follower whose leader's log starts past this log's
        end: Kafka's truncateFullyAndStartAt): no batches, no epochs, no producers. One transaction."""
        if offset < 0:
            raise ValueError(f"a log cannot start at {offset}")

        def empty(txn, draft):
            self._clear(txn, log)
            draft.reset(offset)

        self._rewrite(log, empty)

    def set_high_watermark(self, log: PartitionLog, offset: int) -> None:
        """Everything below ``offset`` is committed. In memory now (it never goes down, nor past the log
        end); written by the next write transaction or checkpoint (``flush_due``)."""
        if offset != log.high_watermark:
            log.set_high_watermark(offset)
            self._unsaved[log.name] = log

    def flush_due(self, monotonic_now_ms: int) -> None:
        """The store's periodic work, called from its owner's loop: the high watermark checkpoint."""
        if self._unsaved and monotonic_now_ms >= self._checkpoint_due_ms:
            self._checkpoint()
            self._checkpoint_due_ms = monotonic_now_ms + HIGH_WATERMARK_CHECKPOINT_INTERVAL_MS

    def close(self) -> None:
        """A clean stop writes the high watermarks not yet checkpointed (a crash loses them: safe)."""
        self._checkpoint()

    def _checkpoint(self) -> None:
        if self._unsaved:
            try:
                self._transact(lambda txn, undo: None)  # writes what is unsaved
            except StorageFull:
                pass  # kept unsaved, tried again next time; an older checkpoint only makes it grow back

    def _put_bookkeeping(self, txn, log: PartitionLog, rewrite: bool = False) -> None:
        """Write ``log``'s bookkeeping; with ``rewrite``, also forget producers it no longer has."""
        key = log.name.encode()
        self._put_offsets(txn, log)
        self._meta_put(txn, b"e:" + key, _pack(log.epochs))
        prefix = b"s:" + key + b"\0"
        if rewrite:
            for meta_key, _ in self._meta_items(txn, prefix):
                self._meta_delete(txn, meta_key)
        for producer_id, (epoch, batches) in log.producers.items():
            self._meta_put(txn, prefix + _PID.pack(producer_id), _pack([epoch, batches]))

    def _put_offsets(self, txn, log: PartitionLog) -> None:
        self._meta_put(txn, b"p:" + log.name.encode(), _pack([log.start_offset, log.size_bytes, log.high_watermark]))

    def _rewrite(self, log: PartitionLog, change) -> None:
        """A whole-log change: ``change(txn, draft)`` writes the batches and decides on a copy of the
        bookkeeping, which is written in the same transaction and taken by ``log`` once committed."""
        def write(txn, undo):
            draft = log.copy()
            change(txn, draft)
            self._put_bookkeeping(txn, draft, rewrite=True)
            return draft

        log.adopt(self._transact(write))

    def _transact(self, write):
        """Run ``write(txn, undo)`` in one write transaction, with the high watermarks not yet written.
        A storage failure rolls back the bookkeeping ``undo`` accounts for and raises StorageFull."""
        def body(txn, undo):
            for log in self._unsaved.values():  # first: a log the change rewrites is written as changed
                self._put_offsets(txn, log)
            return write(txn, undo)

        result = self._write_txn(body)
        self._unsaved.clear()
        return result

    @staticmethod
    def _rollback(undo) -> None:
        for log, token in reversed(undo):
            log.undo(token)

    # -- the read path ---------------------------------------------------------------------------

    def _end_offset(self, log: PartitionLog, upto: int | None) -> int:
        return log.next_offset if upto is None else min(upto, log.next_offset)

    def read(self, log: PartitionLog, offset: int, bytes_max: int, upto: int | None = None) -> tuple[bytes, int]:
        """Stored batches from the one holding ``offset`` on, concatenated, at least one batch and then up
        to ``bytes_max``, never one ending above ``upto`` (the high watermark for consumers; None: the log
        end, for followers). Returns (bytes, next fetch offset). Every batch is CRC-checked before it is
        served. Out of range is outside [start_offset, next_offset], whatever ``upto``: a consumer between
        a new leader's high watermark and its log end gets an empty answer and asks again."""
        if offset < log.start_offset or offset > log.next_offset:
            raise OffsetOutOfRange(
                f"offset {offset} is outside [{log.start_offset}, {log.next_offset}] of {log.name}")
        end_offset = self._end_offset(log, upto)
        if offset >= end_offset:
            return b"", offset
        with self._reading() as txn:
            chunks, next_offset = select_batches(self._batches_from(txn, log, offset), offset, end_offset,
                                                 bytes_max, log.name)
            return b"".join(chunks), next_offset

    def record_for_time(self, log: PartitionLog, timestamp_ms: int, upto: int | None = None) -> tuple[int, int]:
        """``(offset, timestamp_ms)`` of the earliest record below ``upto`` (None: the log end) whose
        timestamp is >= ``timestamp_ms``; ``(that bound, -1)`` if none."""
        with self._reading() as txn:
            values = (value for _, value in self._batches_from(txn, log, log.start_offset))
            return record_at_time(values, timestamp_ms, self._end_offset(log, upto))

    def record_with_max_time(self, log: PartitionLog, upto: int | None = None) -> tuple[int, int]:
        """``(offset, timestamp_ms)`` of the first record below ``upto`` (None: the log end) with the largest
        timestamp; ``(-1, -1)`` if there is none."""
        with self._reading() as txn:
            values = (value for _, value in self._batches_from(txn, log, log.start_offset))
            return record_with_max_time(values, self._end_offset(log, upto))

    # -- retention -------------------------------------------------------------------------------

    def apply_retention(self, log: PartitionLog, now_ms: int, retention_ms: int | None,
                        retention_bytes: int | None) -> int:
        """Drop whole batches from the head that are older than ``retention_ms`` or that keep the log above
        ``retention_bytes``, never past the high watermark. Returns the number of batches dropped; advances
        the log start offset."""
        if retention_ms is None and retention_bytes is None:
            return 0
        with self._reading() as txn:
            values = (value for _, value in self._batches_from(txn, log, log.start_offset))
            dropped, dropped_bytes, new_start = retention_cut(log, values, now_ms, retention_ms, retention_bytes)
        if dropped:
            def drop_head(txn, draft):
                self._delete_head(txn, log, dropped)
                draft.record_truncate_head(new_start, dropped_bytes)

            self._rewrite(log, drop_head)
        return dropped

    # -- the storage primitives (each store's own; no decisions) ----------------------------------------
    # ``txn`` is the store's transaction; batches are keyed by base offset, in log order.

    def _open_db(self, name: str):
        """The handle on partition ``name``'s batches (created if new), kept as ``PartitionLog.db``."""
        raise NotImplementedError

    def _reading(self):
        """A context manager giving a read transaction."""
        raise NotImplementedError

    def _write_txn(self, body):
        """``body(txn, undo)`` in one write transaction (retried after growing the store if it is full),
        returning its result. On a storage failure: ``_rollback(undo)``, then StorageFull."""
        raise NotImplementedError

    def _last_batch(self, txn, db):
        """(base offset, stored batch) of the last batch, or None."""
        raise NotImplementedError

    def _first_key(self, txn, db) -> int:
        """The base offset of the first batch (there is one)."""
        raise NotImplementedError

    def _batch_at(self, txn, log: PartitionLog, base_offset: int):
        """The stored batch whose base offset is ``base_offset``, or None."""
        raise NotImplementedError

    def _batches_from(self, txn, log: PartitionLog, offset: int):
        """Yield (base offset, stored batch) from the batch holding ``offset`` (the first one, if none
        does) to the end."""
        raise NotImplementedError

    def _headers_before(self, txn, log: PartitionLog, offset: int):
        """Yield the headers of the batches below ``offset``, newest first."""
        raise NotImplementedError

    def _put_batch(self, txn, log: PartitionLog, base_offset: int, stored) -> None:
        """Store ``stored`` at ``base_offset``, past every stored batch."""
        raise NotImplementedError

    def _delete_tail(self, txn, log: PartitionLog, offset: int) -> int:
        """Delete the batches at and above ``offset``; returns their bytes."""
        raise NotImplementedError

    def _delete_head(self, txn, log: PartitionLog, count: int) -> None:
        """Delete the first ``count`` batches."""
        raise NotImplementedError

    def _clear(self, txn, log: PartitionLog) -> None:
        """Delete every batch, keeping the partition."""
        raise NotImplementedError

    def _drop_db(self, txn, log: PartitionLog) -> None:
        """Delete the partition's batches and its handle."""
        raise NotImplementedError

    def _meta_get(self, txn, key: bytes):
        """The packed value under ``key``, or None."""
        raise NotImplementedError

    def _meta_put(self, txn, key: bytes, raw: bytes) -> None:
        raise NotImplementedError

    def _meta_delete(self, txn, key: bytes) -> None:
        raise NotImplementedError

    def _meta_items(self, txn, prefix: bytes) -> list:
        """[(key, packed value), ...] of the keys starting with ``prefix``, in key order."""
        raise NotImplementedError
