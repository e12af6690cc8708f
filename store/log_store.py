"""The partition logs of one node on LMDB: one environment per data directory, one named database per
partition. The contract (append, append_replica, truncate_to, read, ...) is ``LogContract``'s; this module
holds only LMDB's side of it.

On-disk layout (docs/storage.md has the full picture):
- named database ``t:<partition name>`` per partition: key = base offset of a batch as 8-byte big-endian
  (so LMDB's key order is log order and ``set_range`` finds the batch holding any offset), value = the
  batch exactly as ``bus.batch`` lays it out. Keys are written with ``append=True``.
- named database ``__meta__``: ``identity`` (who owns this directory), ``p:<name>`` -> [start_offset,
  size_bytes, high_watermark], ``e:<name>`` -> [[leader_epoch, start_offset], ...], ``s:<name>\\0<producer
  id>`` -> [epoch, [[first_seq, last_seq, base_offset], ...]], and anything the node caches (its placement)
  under ``n:`` keys. Offsets, epochs and producer state are written in the same transaction as the batches
  they describe, so they can never disagree after a crash.

Group commit: ``append`` takes every batch that arrived in one loop turn and writes them in ONE
transaction; with ``sync="always"`` its commit is the one fsync that makes them all durable.

A full LMDB map is grown (doubling, up to ``map_size_max_bytes``) and the transaction retried; a full disk
fails the whole transaction with StorageFull and rolls back the bookkeeping, so nothing already stored
is touched and memory never runs ahead of disk.
"""

from __future__ import annotations

import os
import struct

import lmdb

from bus import batch as batch_format
from bus.clock import now_ms
from bus.errors import StorageFull

from .dir_lock import lock_data_dir, unlock_data_dir
from .log_contract import LogContract

SYNC_MODES = ("always", "interval", "none")
_KEY = struct.Struct(">Q")
_META_DB = b"__meta__"
# Partitions one node can hold: one LMDB named database each, and LMDB fixes that number when the
# environment opens. The coordinator places no more than this on any node. (Each read transaction costs
# a little more the more databases are open: ~13 us at 3,000.)
PARTITIONS_MAX = 10_000
SYNC_INTERVAL_MS = 100  # with sync="interval": how often ``flush_due`` syncs


class LogStore(LogContract):
    """The partition logs of one data directory, on LMDB."""

    def __init__(self, path: str, *, sync: str = "always", map_size_bytes: int = 1 << 28,
                 map_size_max_bytes: int = 1 << 40, partitions_max: int = PARTITIONS_MAX, clock_ms=now_ms,
                 high_watermark_follows_append: bool = True):
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, not {sync!r}")
        super().__init__(clock_ms=clock_ms, high_watermark_follows_append=high_watermark_follows_append)
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
        self._next_sync_ms = 0  # sync="interval": when flush_due next syncs (monotonic)

    def sync(self) -> None:
        """Flush to disk (for ``sync="interval"``; a no-op cost with ``always``)."""
        self.env.sync(True)

    def flush_due(self, monotonic_now_ms: int) -> None:
        """The store's periodic work, called from its owner's loop: the high watermark checkpoint, and
        with ``sync="interval"`` an fsync every SYNC_INTERVAL_MS."""
        super().flush_due(monotonic_now_ms)
        if self.sync_mode == "interval" and monotonic_now_ms >= self._next_sync_ms:
            self.sync()
            self._next_sync_ms = monotonic_now_ms + SYNC_INTERVAL_MS

    def close(self) -> None:
        super().close()
        self.env.close()
        unlock_data_dir(self._lock_fd)
        self._lock_fd = -1

    def disk_path(self) -> str:
        return os.path.join(self.path, "data.mdb")

    # -- LMDB's primitives -----------------------------------------------------------------------

    def _open_db(self, name: str):
        return self.env.open_db(b"t:" + name.encode())

    def _reading(self):
        return self.env.begin(buffers=True)

    def _write_txn(self, body):
        while True:
            undo = []
            try:
                with self.env.begin(write=True, buffers=True) as txn:
                    return body(txn, undo)
            except lmdb.MapFullError:
                self._rollback(undo)
                if not self._grow_map():
                    raise StorageFull(f"LMDB map of {self.path} is at its maximum of {self.map_size_max_bytes} "
                                      "bytes; raise --map-size-max or free space") from None
            except lmdb.Error as exc:
                # ENOSPC and other I/O errors at commit: the transaction is aborted, nothing changed on disk.
                self._rollback(undo)
                raise StorageFull(f"could not write to {self.path}: {exc}") from None
            except BaseException:
                self._rollback(undo)  # aborted: what it accounted for was not written
                raise

    def _grow_map(self) -> bool:
        size = self.env.info()["map_size"]
        if size >= self.map_size_max_bytes:
            return False
        self.env.set_mapsize(min(size * 2, self.map_size_max_bytes))
        return True

    def _last_batch(self, txn, db):
        cursor = txn.cursor(db=db)
        return (_KEY.unpack(cursor.key())[0], cursor.value()) if cursor.last() else None

    def _first_key(self, txn, db) -> int:
        cursor = txn.cursor(db=db)
        found = cursor.first()
        assert found, "a log with a last batch has a first one"
        return _KEY.unpack(cursor.key())[0]

    def _batch_at(self, txn, log, base_offset: int):
        return txn.get(_KEY.pack(base_offset), db=log.db)

    def _batches_from(self, txn, log, offset: int):
        cursor = txn.cursor(db=log.db)
        key = _KEY.pack(offset)
        if not cursor.set_range(key):
            cursor.last()
        elif bytes(cursor.key()) != key:
            cursor.prev()
        for raw_key, value in cursor:
            yield _KEY.unpack(raw_key)[0], value

    def _headers_before(self, txn, log, offset: int):
        cursor = txn.cursor(db=log.db)
        positioned = cursor.prev() if cursor.set_range(_KEY.pack(offset)) else cursor.last()
        if positioned:
            for value in cursor.iterprev(keys=False, values=True):
                yield batch_format.read_header(value)  # the header alone: no copy of the batch

    def _put_batch(self, txn, log, base_offset: int, stored) -> None:
        appended = txn.put(_KEY.pack(base_offset), stored, db=log.db, append=True)
        assert appended, f"batch at {base_offset} is not past the end of {log.name}"

    def _delete_tail(self, txn, log, offset: int) -> int:
        cursor = txn.cursor(db=log.db)
        doomed = []
        if cursor.set_range(_KEY.pack(offset)):
            doomed = [(bytes(key), len(value)) for key, value in cursor]
        for key, _ in doomed:
            txn.delete(key, db=log.db)
        return sum(length for _, length in doomed)

    def _delete_head(self, txn, log, count: int) -> None:
        cursor = txn.cursor(db=log.db)
        for _ in range(count):
            cursor.first()
            cursor.delete()

    def _clear(self, txn, log) -> None:
        txn.drop(log.db, delete=False)

    def _drop_db(self, txn, log) -> None:
        txn.drop(log.db, delete=True)

    def _meta_get(self, txn, key: bytes):
        return txn.get(key, db=self.meta)

    def _meta_put(self, txn, key: bytes, raw: bytes) -> None:
        txn.put(key, raw, db=self.meta)

    def _meta_delete(self, txn, key: bytes) -> None:
        txn.delete(key, db=self.meta)

    def _meta_items(self, txn, prefix: bytes) -> list:
        cursor = txn.cursor(db=self.meta)
        items = []
        if cursor.set_range(prefix):
            for key, raw in cursor:
                key = bytes(key)
                if not key.startswith(prefix):
                    break
                items.append((key, bytes(raw)))
        return items
