"""The partition log of one node: one LMDB environment per data directory, one named database per partition.

On-disk layout (docs/storage.md has the full picture):
- named database ``t:<partition name>`` per partition: key = base offset of a batch as 8-byte big-endian
  (so LMDB's key order is log order and ``set_range`` finds the batch holding any offset), value = the
  batch exactly as ``bus.batch`` lays it out. Keys are written with ``append=True``.
- named database ``__meta__``: ``identity`` (who owns this directory), ``p:<name>`` -> [start_offset,
  size_bytes], ``s:<name>\\0<producer id>`` -> [epoch, [[first_seq, last_seq, base_offset], ...]], and
  anything the node caches (its placement) under ``n:`` keys. Offsets and producer state are written in
  the same transaction as the batches they describe, so they can never disagree after a crash.

Group commit: ``append`` takes every batch that arrived in one loop turn and writes them in ONE
transaction; with ``sync="always"`` its commit is the one fsync that makes them all durable.

A full LMDB map is grown (doubling, up to ``map_size_max_bytes``) and the transaction retried; a full disk
fails the whole turn's appends with StorageFull and rolls back the bookkeeping, so nothing already stored
is touched and memory never runs ahead of disk.
"""

from __future__ import annotations

import os
import struct

import lmdb
import msgpack

from bus import batch as batch_format
from bus.clock import now_ms
from bus.errors import BusError, CorruptRecord, NodeIdentityMismatch, OffsetOutOfRange, StorageFull

from .dir_lock import lock_data_dir, unlock_data_dir
from .partition_log import APPEND, PartitionLog

SYNC_MODES = ("always", "interval", "none")
_KEY = struct.Struct(">Q")
_PID = struct.Struct(">q")
_META_DB = b"__meta__"
# Partitions one node can hold: one LMDB named database each, and LMDB fixes that number when the
# environment opens. The coordinator places no more than this on any node. (Each read transaction costs
# a little more the more databases are open: ~13 us at 3,000.)
PARTITIONS_MAX = 10_000
SYNC_INTERVAL_MS = 100  # with sync="interval": how often ``flush_due`` syncs


def _unpack(raw):
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def admit_batch(log: PartitionLog, buf, append_ts_ms: int, append_ts_at) -> tuple:
    """What becomes of one batch a producer sent for ``log``, appended at ``append_ts_ms``:
    ``(stored, header, result)``.

    ``stored`` is the batch to write at ``log.next_offset`` (then ``result`` is its append result), or None
    when nothing is to be written: a refused batch (``result`` is its BusError: corrupt, sequence gap, fenced
    producer) or a recognised retry (``result`` names the original's offset and append time, read with
    ``append_ts_at(base_offset)``; duplicate=True). The caller writes ``stored`` and then records the append
    on ``log``. A result is ``(base_offset, append_ts_ms, duplicate)``.
    """
    try:
        stored, header = batch_format.stamp(buf, log.next_offset, append_ts_ms)
        action, base_offset = log.check_sequence(header.producer_id, header.producer_epoch, header.base_sequence,
                                                 header.record_count)
    except BusError as exc:
        return None, None, exc
    if action is not APPEND:
        return None, header, (base_offset, append_ts_at(base_offset), True)
    return stored, header, (header.base_offset, append_ts_ms, False)


class LogStore:
    """The partition logs of one data directory. ``log_class`` makes each partition's bookkeeping: a
    subclass may change a decision of ``PartitionLog`` (the fault harness's sabotaged builds do), never this
    class's writes."""

    log_class = PartitionLog

    def __init__(self, path: str, *, sync: str = "always", map_size_bytes: int = 1 << 28,
                 map_size_max_bytes: int = 1 << 40, partitions_max: int = PARTITIONS_MAX):
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, not {sync!r}")
        # The initial map never exceeds the cap (a node started with --map-size-max below the 256 MiB
        # default must start, not fail an assertion).
        map_size_bytes = min(map_size_bytes, map_size_max_bytes)
        self.path = path
        self.sync_mode = sync
        self.map_size_max_bytes = map_size_max_bytes
        self._lock_fd = lock_data_dir(path)
        # No writemap: with sync it would flush the whole map. Opened here, in the process that uses it,
        # never inherited across fork.
        self.env = lmdb.open(path, map_size=map_size_bytes, max_dbs=partitions_max + 1,
                             sync=(sync == "always"), metasync=(sync != "none"), writemap=False)
        self.env.reader_check()
        self.meta = self.env.open_db(_META_DB)
        self.logs: dict[str, PartitionLog] = {}
        self._next_sync_ms = 0  # sync="interval": when flush_due next syncs (monotonic)

    # -- identity and small node state -------------------------------------------------------------

    def claim_identity(self, identity: str) -> None:
        """Bind this directory to ``identity`` (e.g. "node-2") forever; refuse one bound to another."""
        current = self.get_meta(b"identity")
        if current is None:
            self.put_meta(b"identity", identity)
        elif current != identity:
            raise NodeIdentityMismatch(
                f"data directory {self.path} belongs to {current}, not {identity}; "
                f"start {identity} with its own --data-dir")

    def get_meta(self, key: bytes, default=None):
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(key)
        return default if raw is None else _unpack(raw)

    def put_meta(self, key: bytes, value) -> None:
        self._write(lambda txn: txn.put(key, _pack(value), db=self.meta))

    # -- partitions ------------------------------------------------------------------------------

    def open_partition(self, name: str) -> PartitionLog:
        """Open (creating if new) the log of partition ``name`` and rebuild its bookkeeping from disk."""
        log = self.logs.get(name)
        if log is not None:
            return log
        db = self.env.open_db(b"t:" + name.encode())
        with self.env.begin() as txn:
            state = txn.get(b"p:" + name.encode(), db=self.meta)
            start_offset, size_bytes = _unpack(state) if state is not None else (0, 0)
            cursor = txn.cursor(db=db)
            next_offset = start_offset
            if cursor.last():
                # The log end comes from the last batch's header, so that header must be sound: a flipped
                # bit in its offset or count would silently hide the log or open a gap in it.
                header = batch_format.verify(cursor.value())
                if header.base_offset != _KEY.unpack(cursor.key())[0]:
                    raise CorruptRecord(f"last batch of {name} is stored at {_KEY.unpack(cursor.key())[0]} "
                                        f"but says base offset {header.base_offset}")
                next_offset = max(next_offset, header.next_offset)
                if state is None:
                    cursor.first()
                    start_offset = _KEY.unpack(cursor.key())[0]
            producers = {}
            prefix = b"s:" + name.encode() + b"\0"
            meta_cursor = txn.cursor(db=self.meta)
            if meta_cursor.set_range(prefix):
                for key, raw in meta_cursor:
                    if not key.startswith(prefix):
                        break
                    epoch, batches = _unpack(raw)
                    producers[_PID.unpack(key[len(prefix):])[0]] = (epoch, tuple(tuple(b) for b in batches))
        log = self.log_class(name, db, start_offset, next_offset, size_bytes, producers)
        self.logs[name] = log
        return log

    def drop_partition(self, name: str) -> None:
        """Delete a partition's log and its bookkeeping (its topic was deleted)."""
        log = self.open_partition(name)
        prefix = b"s:" + name.encode() + b"\0"

        def drop(txn):
            txn.drop(log.db, delete=True)
            txn.delete(b"p:" + name.encode(), db=self.meta)
            cursor = txn.cursor(db=self.meta)
            while cursor.set_range(prefix) and cursor.key().startswith(prefix):
                cursor.delete()

        self._write(drop)
        del self.logs[name]

    # -- the write path --------------------------------------------------------------------------

    def append(self, items: list) -> list:
        """Append ``[(PartitionLog, batch bytes as the producer sent it), ...]`` in one transaction.

        Returns one result per item, in order: ``(base_offset, append_ts_ms, duplicate)`` or a BusError for
        that item alone (corrupt batch, sequence gap, fenced producer). A storage failure fails them all.
        Every batch of the transaction gets the same append time.
        """
        append_ts_ms = now_ms()
        while True:
            undo = []
            try:
                with self.env.begin(write=True) as txn:
                    results, touched = self._admit_all(
                        items, append_ts_ms, lambda log, base_offset, stored: self._put_batch(txn, log, base_offset, stored),
                        lambda log, base_offset: self._append_ts_at(txn, log, base_offset), undo)
                    for log in touched:
                        self._put_bookkeeping(txn, log)
                return results
            except lmdb.MapFullError:
                self._rollback(undo)
                if not self._grow_map():
                    full = StorageFull(f"LMDB map of {self.path} is at its maximum of "
                                       f"{self.map_size_max_bytes} bytes; raise --map-size-max or free space")
                    return [full] * len(items)
            except lmdb.Error as exc:
                # ENOSPC and other I/O errors at commit: the transaction is aborted, nothing changed on disk.
                self._rollback(undo)
                failure = StorageFull(f"could not write to {self.path}: {exc}")
                return [failure] * len(items)

    @staticmethod
    def _admit_all(items: list, append_ts_ms: int, put, append_ts_at, undo: list) -> tuple[list, list]:
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
            touched[log.name] = log
        return results, list(touched.values())

    @staticmethod
    def _put_batch(txn, log: PartitionLog, base_offset: int, stored) -> None:
        txn.put(_KEY.pack(base_offset), stored, db=log.db, append=True)

    @staticmethod
    def _append_ts_at(txn, log: PartitionLog, base_offset: int) -> int:
        """The append time of the stored batch at ``base_offset`` (-1 if retention dropped it)."""
        value = txn.get(_KEY.pack(base_offset), db=log.db)
        return -1 if value is None else batch_format.read_header(value).append_ts_ms

    def _put_bookkeeping(self, txn, log: PartitionLog) -> None:
        name = log.name.encode()
        txn.put(b"p:" + name, _pack([log.start_offset, log.size_bytes]), db=self.meta)
        prefix = b"s:" + name + b"\0"
        for producer_id, (epoch, batches) in log.producers.items():
            txn.put(prefix + _PID.pack(producer_id), _pack([epoch, batches]), db=self.meta)

    @staticmethod
    def _rollback(undo) -> None:
        for log, token in reversed(undo):
            log.undo(token)

    def _grow_map(self) -> bool:
        size = self.env.info()["map_size"]
        if size >= self.map_size_max_bytes:
            return False
        self.env.set_mapsize(min(size * 2, self.map_size_max_bytes))
        return True

    def _write(self, fn) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                if not self._grow_map():
                    raise StorageFull(f"LMDB map of {self.path} is at its maximum") from None

    def sync(self) -> None:
        """Flush to disk (for ``sync="interval"``; a no-op cost with ``always``)."""
        self.env.sync(True)

    def flush_due(self, monotonic_now_ms: int) -> None:
        """The store's periodic work, called from its owner's loop: with ``sync="interval"``, an fsync
        every SYNC_INTERVAL_MS."""
        if self.sync_mode == "interval" and monotonic_now_ms >= self._next_sync_ms:
            self.sync()
            self._next_sync_ms = monotonic_now_ms + SYNC_INTERVAL_MS

    # -- the read path ---------------------------------------------------------------------------

    def read(self, log: PartitionLog, offset: int, bytes_max: int) -> tuple[bytes, int]:
        """Stored batches from the one holding ``offset`` on, concatenated, at least one batch and then up
        to ``bytes_max``. Returns (bytes, next fetch offset). Every batch is CRC-checked before it is served.
        """
        if offset < log.start_offset or offset > log.next_offset:
            raise OffsetOutOfRange(
                f"offset {offset} is outside [{log.start_offset}, {log.next_offset}] of {log.name}")
        if offset == log.next_offset:
            return b"", offset
        chunks, total, next_offset = [], 0, offset
        with self.env.begin(db=log.db, buffers=True) as txn:
            cursor = txn.cursor()
            key = _KEY.pack(offset)
            if not cursor.set_range(key):
                cursor.last()
            elif bytes(cursor.key()) != key:
                cursor.prev()
            for raw_key, value in cursor:
                if chunks and total + len(value) > bytes_max:
                    break  # before verifying: a batch not served is not checked (nor reported)
                try:
                    header = batch_format.verify(value)
                    if header.base_offset != _KEY.unpack(raw_key)[0]:
                        raise CorruptRecord(f"batch stored at {_KEY.unpack(raw_key)[0]} says base offset "
                                            f"{header.base_offset} in {log.name}")
                except CorruptRecord:
                    if chunks:
                        break  # serve the good batches before it; the next read, starting at it, raises
                    raise
                if header.next_offset <= offset:
                    continue  # only when the offset sits in a retention gap; never served twice
                chunks.append(value)
                total += len(value)
                next_offset = header.next_offset
            data = b"".join(chunks)
        return data, next_offset

    def offset_for_time(self, log: PartitionLog, timestamp_ms: int) -> int:
        """The earliest offset whose record timestamp is >= ``timestamp_ms`` (log end if none)."""
        with self.env.begin(db=log.db, buffers=True) as txn:
            for _, value in txn.cursor():
                header = batch_format.read_header(value)
                if header.max_ts_ms < timestamp_ms:
                    continue
                batch_format.verify(value)
                stamps = batch_format.read_columns(value[batch_format.HEADER_BYTES:], header.record_count)[0]
                if stamps is None:  # every record has the append time, which is then max_ts_ms: new enough
                    return header.base_offset
                for index, own_ts_ms in enumerate(stamps):
                    if (header.append_ts_ms if own_ts_ms is None else own_ts_ms) >= timestamp_ms:
                        return header.base_offset + index
        return log.next_offset

    # -- retention -------------------------------------------------------------------------------

    def apply_retention(self, log: PartitionLog, now_ms: int, retention_ms: int | None,
                        retention_bytes: int | None) -> int:
        """Drop whole batches from the head that are older than ``retention_ms`` or that keep the log above
        ``retention_bytes``. Returns the number of batches dropped; advances the log start offset."""
        if retention_ms is None and retention_bytes is None:
            return 0
        dropped, dropped_bytes, new_start = 0, 0, log.start_offset
        with self.env.begin(db=log.db, buffers=True) as txn:
            for _, value in txn.cursor():
                header = batch_format.read_header(value)
                too_old = retention_ms is not None and header.max_ts_ms < now_ms - retention_ms
                too_big = (retention_bytes is not None
                           and log.size_bytes - dropped_bytes - len(value) >= retention_bytes)
                if not (too_old or too_big):
                    break
                dropped += 1
                dropped_bytes += len(value)
                new_start = header.next_offset
        if not dropped:
            return 0

        def truncate(txn):
            cursor = txn.cursor(db=log.db)
            for _ in range(dropped):
                cursor.first()
                cursor.delete()
            txn.put(b"p:" + log.name.encode(), _pack([new_start, log.size_bytes - dropped_bytes]), db=self.meta)

        self._write(truncate)
        log.record_truncate_head(new_start, dropped_bytes)
        return dropped

    def close(self) -> None:
        self.env.close()
        unlock_data_dir(self._lock_fd)
        self._lock_fd = -1

    def disk_path(self) -> str:
        return os.path.join(self.path, "data.mdb")
