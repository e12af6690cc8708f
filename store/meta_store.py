"""The coordinator's durable key-value store on LMDB: topics, placement, producer ids, groups, offsets.

Values are msgpack. ``apply`` writes a list of records in one synced transaction, so the coordinator can
persist every effect of a request before it replies (STYLE.md: persist before the reply).
"""

from __future__ import annotations

import lmdb
import msgpack

from .dir_lock import lock_data_dir, unlock_data_dir

PUT = "put"
DELETE = "delete"


class MetaStore:
    def __init__(self, path: str, *, map_size_bytes: int = 1 << 30):
        self._lock_fd = lock_data_dir(path)
        self.env = lmdb.open(path, map_size=map_size_bytes, max_dbs=2, sync=True, metasync=True)
        self.env.reader_check()  # a killed predecessor leaves stale reader slots behind
        self.db = self.env.open_db(b"meta")

    def get(self, key: bytes, default=None):
        with self.env.begin(db=self.db) as txn:
            raw = txn.get(key)
        return default if raw is None else msgpack.unpackb(raw, raw=False, strict_map_key=False)

    def items(self, prefix: bytes) -> list[tuple[bytes, object]]:
        out = []
        with self.env.begin(db=self.db) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key, raw in cursor:
                    if not key.startswith(prefix):
                        break
                    out.append((key, msgpack.unpackb(raw, raw=False, strict_map_key=False)))
        return out

    def apply(self, records) -> None:
        """Write ``(PUT, key, value)`` / ``(DELETE, key)`` records in one transaction, synced on return."""
        if not records:
            return
        while True:
            try:
                with self.env.begin(write=True, db=self.db) as txn:
                    for record in records:
                        if record[0] == PUT:
                            txn.put(record[1], msgpack.packb(record[2], use_bin_type=True))
                        else:
                            assert record[0] == DELETE, record
                            txn.delete(record[1])
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def close(self) -> None:
        self.env.close()
        unlock_data_dir(self._lock_fd)
