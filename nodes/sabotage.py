"""Test-only sabotage switches: deliberate bugs the fault harness must catch. All off by default.

The harness proves it has teeth by running the same workload with a switch on and requiring the checker to
report the anomaly that switch causes (tests/test_faults.py). A switch is turned on for a process by the
environment variable ``BUS_SABOTAGE``, a comma-separated list of names from ``SWITCHES``, read ONCE at
import; ``LocalCluster(env={"BUS_SABOTAGE": "skip_dedup"})`` passes it to the node processes. An unknown
name stops the process at import (a typo must not silently test nothing), and a node with any switch on
says so loudly in its log.

Switches, the guarantee each breaks, and what the harness should report:

- ``ack_before_sync``: the node acknowledges a produce before its batch is in LMDB. Offsets and producer
  state are decided in memory and answered at once; the batches are written ``DEFERRED_WRITE_MS`` later
  (NATS's flush interval, the default Jepsen found losing data). A kill -9 loses what was acknowledged
  but not yet written: ``lost`` (and ``unseen``, ``inconsistent_offsets``).
- ``skip_dedup``: the node no longer recognises a retried batch (same producer id, epoch and sequences as
  a stored one) and writes it again: ``duplicates``.
- ``skip_epoch_check``: the node accepts a batch from an older producer epoch than the one it stored (a
  zombie's late request lands on the newer incarnation's state): ``duplicates`` or ``lost``.
- ``skip_member_epoch_check``: the coordinator accepts a consumer-group commit from a stale member epoch
  (wired by the group code; ``stale_epoch_commit_accepted``).

This module owns the switches and the ``ack_before_sync`` write-behind buffer. It must never be on in
production: nothing but the environment variable turns a switch on, and it imports nothing from the bus
at import time (store/ and nodes/ read its flags on hot paths).
"""

from __future__ import annotations

import logging
import os
import time

SWITCHES = ("ack_before_sync", "skip_dedup", "skip_epoch_check", "skip_member_epoch_check")
ENV_VAR = "BUS_SABOTAGE"
DEFERRED_WRITE_MS = 500  # ack_before_sync: how long acknowledged batches wait in memory before LMDB


def parse(raw: str | None) -> frozenset:
    """The switch names in ``raw`` (comma-separated); ValueError for a name not in SWITCHES."""
    names = frozenset(n.strip() for n in (raw or "").split(",") if n.strip())
    unknown = sorted(names - set(SWITCHES))
    if unknown:
        raise ValueError(f"{ENV_VAR} names unknown sabotage switches {unknown}; known: {list(SWITCHES)}")
    return names


ACTIVE = parse(os.environ.get(ENV_VAR))
# Plain module constants, so a hot path pays one global lookup when everything is off.
ACK_BEFORE_SYNC = "ack_before_sync" in ACTIVE
SKIP_DEDUP = "skip_dedup" in ACTIVE
SKIP_EPOCH_CHECK = "skip_epoch_check" in ACTIVE
SKIP_MEMBER_EPOCH_CHECK = "skip_member_epoch_check" in ACTIVE


def enabled(name: str) -> bool:
    """Whether switch ``name`` is on in this process (``name`` must be one of SWITCHES)."""
    assert name in SWITCHES, name
    return name in ACTIVE


def announce(process: str) -> None:
    """Log, as an error, every switch that is on: a sabotaged process must never pass unnoticed."""
    if ACTIVE:
        logging.getLogger("bus.sabotage").error("%s running with SABOTAGE %s: it WILL break its guarantees",
                                                process, ",".join(sorted(ACTIVE)))


# -- ack_before_sync: a write-behind buffer ----------------------------------------------------------------

class _Deferred:
    """Batches acknowledged but not yet written, in acknowledgement order, and when they must be written."""

    __slots__ = ("items", "touched", "due_s")

    def __init__(self):
        self.items = []  # (PartitionLog, base offset, stored batch bytes)
        self.touched = {}  # log name -> PartitionLog, whose bookkeeping the flush writes
        self.due_s = None


_deferred: dict[int, _Deferred] = {}  # id(LogStore) -> its buffer


def deferred_append(store, items: list) -> list:
    """``LogStore.append`` under ack_before_sync: the same decisions and results, but nothing written yet."""
    from bus.batch import read_header
    from store.log_store import admit_batch

    buffer = _deferred.setdefault(id(store), _Deferred())
    results = []
    append_ts_ms = time.time_ns() // 1_000_000

    def append_ts_at(log, base_offset: int) -> int:  # a retry's original: still buffered, or written
        for held_log, at, stored in buffer.items:
            if held_log is log and at == base_offset:
                return read_header(stored).append_ts_ms
        with store.env.begin() as txn:
            return store._append_ts_at(txn, log, base_offset)

    for log, buf in items:
        stored, header, result = admit_batch(log, buf, append_ts_ms,
                                             lambda base_offset, log=log: append_ts_at(log, base_offset))
        results.append(result)
        if stored is None:
            continue
        buffer.items.append((log, log.next_offset, bytes(stored)))
        log.record_append(header.producer_id, header.producer_epoch, header.base_sequence,
                          header.record_count, len(stored))
        buffer.touched[log.name] = log
    if buffer.items and buffer.due_s is None:
        buffer.due_s = time.monotonic() + DEFERRED_WRITE_MS / 1000
    return results


def flush_deferred(store, force: bool = False) -> None:
    """Write what ack_before_sync has acknowledged, once it is due (or now, with ``force``)."""
    buffer = _deferred.get(id(store))
    if buffer is None or not buffer.items or (not force and time.monotonic() < buffer.due_s):
        return
    import struct

    key = struct.Struct(">Q")
    with store.env.begin(write=True) as txn:
        for log, base_offset, stored in buffer.items:
            if log.name in store.logs:  # not dropped with its topic meanwhile
                txn.put(key.pack(base_offset), stored, db=log.db, append=True)
        for log in buffer.touched.values():
            if log.name in store.logs:
                store._put_bookkeeping(txn, log)
    waited_ms = DEFERRED_WRITE_MS + (time.monotonic() - buffer.due_s) * 1000
    logging.getLogger("bus.sabotage").info("ack_before_sync: wrote %d batches acknowledged up to %.0f ms ago",
                                           len(buffer.items), waited_ms)
    _deferred[id(store)] = _Deferred()
