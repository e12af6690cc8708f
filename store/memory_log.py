"""The partition logs of one node in memory: ``LogContract``'s other implementation, for the seeded
simulator of the replication protocol and for tests. Deterministic: no threads, no I/O, no clock but the
one it is given, and every iteration in a fixed order.

What ``LogStore`` keeps in LMDB, this keeps in a ``MemoryDisk``: the stored batches (the same stamped
bytes) and the ``__meta__`` keys, packed the same way. Only a write transaction changes it: one call
that nothing observes halfway, and every operation checks its input before it writes, so only a failed
assertion (a bug, which must stop the process) can leave one half done. The ``PartitionLog`` bookkeeping
and the high watermarks not yet checkpointed are the store's memory: a new store on the same disk is a
restart (a crash, unless the old one was closed), which finds what was written and loses the rest.
"""

from __future__ import annotations

import contextlib
from bisect import bisect_left, bisect_right

from bus import batch as batch_format
from bus.clock import now_ms

from .log_contract import LogContract


class _Batches:
    """One partition's stored batches: base offsets ascending, and the batch stored at each."""

    __slots__ = ("offsets", "values")

    def __init__(self):
        self.offsets: list[int] = []
        self.values: list[bytes] = []


class MemoryDisk:
    """What survives a restart of a MemoryLogStore (pass it to the next one)."""

    def __init__(self):
        self.partitions: dict[str, _Batches] = {}  # partition name -> its batches
        self.meta: dict[bytes, bytes] = {}  # the __meta__ keys -> packed values


class MemoryLogStore(LogContract):
    """The partition logs of one simulated node, on ``disk`` (a new, empty one by default)."""

    def __init__(self, disk: MemoryDisk | None = None, *, clock_ms=now_ms,
                 high_watermark_follows_append: bool = True):
        super().__init__(clock_ms=clock_ms, high_watermark_follows_append=high_watermark_follows_append)
        self.path = "memory"
        self.disk = MemoryDisk() if disk is None else disk

    def close(self) -> None:
        super().close()
        self.logs = {}

    # -- the primitives, on the MemoryDisk ---------------------------------------------------------

    def _open_db(self, name: str):
        return self.disk.partitions.setdefault(name, _Batches())

    def _reading(self):
        return contextlib.nullcontext(self.disk)

    def _write_txn(self, body):
        undo = []
        try:
            return body(self.disk, undo)
        except BaseException:
            self._rollback(undo)
            raise

    def _last_batch(self, txn, db):
        return (db.offsets[-1], db.values[-1]) if db.offsets else None

    def _first_key(self, txn, db) -> int:
        return db.offsets[0]

    def _batch_at(self, txn, log, base_offset: int):
        at = bisect_left(log.db.offsets, base_offset)
        found = at < len(log.db.offsets) and log.db.offsets[at] == base_offset
        return log.db.values[at] if found else None

    def _batches_from(self, txn, log, offset: int):
        db = log.db
        for at in range(max(bisect_right(db.offsets, offset) - 1, 0), len(db.offsets)):
            yield db.offsets[at], db.values[at]

    def _headers_before(self, txn, log, offset: int):
        db = log.db
        for at in range(bisect_left(db.offsets, offset) - 1, -1, -1):
            yield batch_format.read_header(db.values[at])

    def _put_batch(self, txn, log, base_offset: int, stored) -> None:
        db = log.db
        assert not db.offsets or base_offset > db.offsets[-1], f"batch at {base_offset} is not past {log.name}'s end"
        db.offsets.append(base_offset)
        db.values.append(bytes(stored))  # a copy: the caller's buffer may be reused

    def _delete_tail(self, txn, log, offset: int) -> int:
        db = log.db
        at = bisect_left(db.offsets, offset)
        removed_bytes = sum(len(value) for value in db.values[at:])
        del db.offsets[at:], db.values[at:]
        return removed_bytes

    def _delete_head(self, txn, log, count: int) -> None:
        del log.db.offsets[:count], log.db.values[:count]

    def _clear(self, txn, log) -> None:
        self._delete_head(txn, log, len(log.db.offsets))

    def _drop_db(self, txn, log) -> None:
        self._clear(txn, log)
        del self.disk.partitions[log.name]

    def _meta_get(self, txn, key: bytes):
        return self.disk.meta.get(key)

    def _meta_put(self, txn, key: bytes, raw: bytes) -> None:
        self.disk.meta[key] = raw

    def _meta_delete(self, txn, key: bytes) -> None:
        self.disk.meta.pop(key, None)

    def _meta_items(self, txn, prefix: bytes) -> list:
        return sorted((key, raw) for key, raw in self.disk.meta.items() if key.startswith(prefix))
