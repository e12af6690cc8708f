"""Sabotaged builds of the bus: deliberate bugs the fault harness must catch. Test code only.

The harness proves it has teeth by running the same workload against a sabotaged cluster and requiring
the checker to report the anomaly each sabotage causes (tests/test_faults.py, tests/test_faults_groups.py).
Nothing in the bus's own packages knows of this module: each sabotage is a subclass that overrides one
decision of a production class (``PartitionLog``, ``LogStore``, ``GroupService``), and the harness starts
the cluster's processes through this module's entry point instead of ``nodes.node`` / ``nodes.coordinator``:

    python -m tests.harness.sabotage node <the arguments of python -m nodes.node>
    python -m tests.harness.sabotage coordinator <the arguments of python -m nodes.coordinator>

with the switches to turn on in the environment variable ``BUS_SABOTAGE`` (comma-separated names from
``SWITCHES``). ``cluster_options(switches)`` gives LocalCluster those commands. An unknown name stops the
process at once (a typo must not silently test nothing), and a sabotaged process says so loudly in its log.

Switches, the guarantee each breaks, and what the checker should report:

- ``ack_before_sync``: the node acknowledges a produce before its batch is in LMDB. Offsets and producer
  state are decided in memory and answered at once; the batches are written ``DEFERRED_WRITE_MS`` later
  (NATS's flush interval, the default Jepsen found losing data). A kill -9 loses what was acknowledged but
  not yet written: ``lost`` (and ``unseen``, ``inconsistent_offsets``).
- ``skip_dedup``: the node no longer recognises a retried batch (same producer id, epoch and sequences as
  a stored one) and writes it again: ``duplicates``.
- ``skip_epoch_check``: the node accepts a batch from an older producer epoch than the one it stored (a
  zombie's late request lands on the newer incarnation's state): ``duplicates`` or ``lost``.
- ``skip_member_epoch_check``: the coordinator accepts a consumer-group commit from a stale member epoch
  (``stale_epoch_commit_accepted``).

Replication (each caught in tests/test_faults.py with the faults named):

- ``truncate_to_hw_on_rejoin``: a replica that becomes a follower cuts its log at its own high watermark
  at once, the pre-KIP-101 rule, instead of keeping it until the leader says where the logs part. A
  follower's high watermark lags the leader's by a fetch, so it drops committed records; if it is elected
  before it fetched them again (nemesis ``cascade``) they are gone: ``lost``.
- ``shrink_isr_without_controller``: the leader stops counting a follower that has not caught up for
  ``SHRINK_AFTER_MS`` toward its high watermark at once, without the controller's word (Kafka's leader
  waits for AlterPartition). Cut off (``isolate``), it commits and acknowledges alone what the new leader
  never had: ``lost``, and ``hw_regressions`` (its high watermark passed the new leader's).
- ``ack_all_on_leader_fsync``: acks="all" is answered once the leader synced the batch, not once the high
  watermark passed it (``Node._wait_for_commit``). A leader killed or isolated loses what it acknowledged
  and no follower had: ``lost``.
- ``read_past_hw``: consumers read up to the log end, not the high watermark (``Node._readable_end``). An
  isolated leader serves records it will cut when it rejoins: ``phantom_reads``.
"""

from __future__ import annotations

import logging
import os
import sys

from bus import batch as batch_format
from bus.clock import monotonic_ms, now_ms
from bus.errors import FencedMemberEpoch, UnknownMemberId
from nodes import groups as core
from nodes.coordinator import Coordinator
from nodes.group_service import GroupService
from nodes.node import Node
from nodes.replica import FOLLOWER, Replica
from store.log_store import LogStore
from store.meta_store import PUT
from store.partition_log import APPEND, DUPLICATE, PartitionLog

SWITCHES = ("ack_before_sync", "skip_dedup", "skip_epoch_check", "skip_member_epoch_check",
            "truncate_to_hw_on_rejoin", "shrink_isr_without_controller", "ack_all_on_leader_fsync", "read_past_hw")
ENV_VAR = "BUS_SABOTAGE"
DEFERRED_WRITE_MS = 500  # ack_before_sync: how long acknowledged batches wait in memory before LMDB
SHRINK_AFTER_MS = 1_000  # shrink_isr_without_controller: a follower not caught up this long stops counting

log = logging.getLogger("bus.sabotage")


def parse(raw: str | None) -> frozenset:
    """The switch names in ``raw`` (comma-separated); ValueError for a name not in SWITCHES."""
    names = frozenset(n.strip() for n in (raw or "").split(",") if n.strip())
    unknown = sorted(names - set(SWITCHES))
    if unknown:
        raise ValueError(f"{ENV_VAR} names unknown sabotage switches {unknown}; known: {list(SWITCHES)}")
    return names


def cluster_options(switches: str) -> dict:
    """LocalCluster's keyword arguments that start its processes sabotaged by ``switches`` (none: {}), with
    their logs at INFO so that what the sabotage did is in them."""
    if not parse(switches):
        return {}
    return {"node_command": ("-m", __name__, "node"), "coordinator_command": ("-m", __name__, "coordinator"),
            "env": {ENV_VAR: switches, "BUS_LOG_LEVEL": "INFO"}}


# -- the partition log's decisions -------------------------------------------------------------------

class SkipDedupLog(PartitionLog):
    """skip_dedup: a recognised retry is appended again."""

    def check_sequence(self, producer_id, epoch, base_sequence, record_count):
        action, base_offset = super().check_sequence(producer_id, epoch, base_sequence, record_count)
        return (APPEND, None) if action == DUPLICATE else (action, base_offset)


class SkipEpochCheckLog(PartitionLog):
    """skip_epoch_check: a batch of an older producer epoch is judged as if it had the stored one."""

    def check_sequence(self, producer_id, epoch, base_sequence, record_count):
        entry = self.producers.get(producer_id)
        if entry is not None and epoch < entry[0]:
            epoch = entry[0]
        return super().check_sequence(producer_id, epoch, base_sequence, record_count)


# -- the store's writes ------------------------------------------------------------------------------

class AckBeforeSyncStore(LogStore):
    """ack_before_sync: ``append`` decides and answers now, through the store's own admission, and the
    batches reach LMDB, through its own writes, DEFERRED_WRITE_MS later (``flush_due``); a clean stop
    writes them first, so only kill -9 loses them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._held: list = []  # (PartitionLog, base offset, stored batch bytes), in acknowledgement order
        self._held_logs: dict = {}  # log name -> PartitionLog whose bookkeeping the flush writes
        self._due_ms = None

    def append(self, items: list) -> list:
        def append_ts_at(plog, base_offset):  # a retry's original: still held, or written
            for held_log, at, stored in self._held:
                if held_log is plog and at == base_offset:
                    return batch_format.read_header(stored).append_ts_ms
            with self.env.begin() as txn:
                return self._append_ts_at(txn, plog, base_offset)

        results, touched = self._admit_all(
            items, now_ms(), lambda plog, base_offset, stored: self._held.append((plog, base_offset, bytes(stored))),
            append_ts_at, [])
        self._held_logs.update((plog.name, plog) for plog in touched)
        if self._held and self._due_ms is None:
            self._due_ms = monotonic_ms() + DEFERRED_WRITE_MS
        return results

    def flush_due(self, monotonic_now_ms: int, force: bool = False) -> None:
        if self._held and (force or monotonic_now_ms >= self._due_ms):
            with self.env.begin(write=True) as txn:
                for plog, base_offset, stored in self._held:
                    if plog.name in self.logs:  # not dropped with its topic meanwhile
                        self._put_batch(txn, plog, base_offset, stored)
                for plog in self._held_logs.values():
                    if plog.name in self.logs:
                        self._put_bookkeeping(txn, plog)
            log.info("ack_before_sync: wrote %d batches acknowledged up to %.0f ms ago", len(self._held),
                     DEFERRED_WRITE_MS + monotonic_now_ms - self._due_ms)
            self._held, self._held_logs, self._due_ms = [], {}, None
        super().flush_due(monotonic_now_ms)

    def close(self) -> None:
        self.flush_due(monotonic_ms(), force=True)
        super().close()


# -- the node's replication decisions ----------------------------------------------------------------

class TruncateToHighWatermarkNode(Node):
    """truncate_to_hw_on_rejoin: on becoming a follower (a new leader epoch, or a restart), the log is cut at
    the replica's own high watermark before anything is fetched."""

    def _apply_assignment(self, tp, assignment, now):
        replica = self.replicas[tp]
        was = (replica.role, replica.leader_epoch)
        super()._apply_assignment(tp, assignment, now)
        if replica.role == FOLLOWER and was != (FOLLOWER, replica.leader_epoch):
            plog = self.logs[tp]
            cut = _boundary_at_or_below(self.store, plog, max(replica.high_watermark, plog.start_offset))
            if cut < plog.next_offset:
                log.warning("SABOTAGE: %s/%s cut at its high watermark %d on following node %d (log end %d)",
                            *tp, cut, assignment.leader, plog.next_offset)
                self.store.truncate_to(plog, cut)
                replica.log_rewritten(plog.high_watermark)


def _boundary_at_or_below(store, plog, offset: int) -> int:
    """The largest batch boundary of ``plog`` at or below ``offset`` (a high watermark always is one)."""
    if offset >= plog.next_offset:
        return plog.next_offset
    boundary, at = plog.start_offset, plog.start_offset
    while at <= offset:
        data, _ = store.read(plog, at, 1 << 20)
        if not data:
            break
        for header, _ in batch_format.iter_batches(data):
            if header.base_offset > offset:
                return boundary
            boundary, at = header.base_offset, header.next_offset
    return boundary


class ShrinkWithoutControllerReplica(Replica):
    """shrink_isr_without_controller: the high watermark counts only the followers caught up within
    SHRINK_AFTER_MS, whatever the controller's ISR says. (The core has no clock: it keeps the latest
    ``now_ms`` the node gave it, which it does at every follower fetch and every ISR check.)"""

    _now_ms = 0

    def follower_fetched(self, follower, incarnation, fetch_offset, leo, now_ms):
        self._now_ms = max(self._now_ms, now_ms)
        return super().follower_fetched(follower, incarnation, fetch_offset, leo, now_ms)

    def proposal(self, leo, now_ms):
        self._now_ms = max(self._now_ms, now_ms)
        return super().proposal(leo, now_ms)

    def maximal_isr(self):
        counted = []
        for member in super().maximal_isr():
            progress = self.followers.get(member)
            if member == self.node_id or progress is None or self._now_ms - progress.caught_up_ms <= SHRINK_AFTER_MS:
                counted.append(member)
        return tuple(counted)


class AckOnLeaderFsyncNode(Node):
    """ack_all_on_leader_fsync: an acks="all" produce is answered as soon as the leader's turn synced it."""

    def _wait_for_commit(self, *args):
        # ``required`` (the batches the answer waits for, last) is emptied: the shell then answers at once,
        # through its own reply, as for a batch already committed.
        *head, required = args
        required.clear()
        return super()._wait_for_commit(*head, required)


class ReadPastHighWatermarkNode(Node):
    """read_past_hw: a consumer's fetch reads up to the log end."""

    def _readable_end(self, replica, plog):
        return plog.next_offset


# -- the coordinator's group commits -----------------------------------------------------------------

class StaleCommitGroupService(GroupService):
    """skip_member_epoch_check: a commit the state machine refuses for a stale epoch (FENCED_MEMBER_EPOCH,
    or UNKNOWN_MEMBER_ID: a fenced incarnation) is written behind its back, as a coordinator without epoch
    fencing would do. It reaches into the state machine's private state on purpose."""

    def _commit(self, args, now_ms):
        try:
            return super()._commit(args, now_ms)
        except (FencedMemberEpoch, UnknownMemberId) as exc:
            group = self.groups._groups.get(args["group_id"])
            if group is None:
                raise
            offsets = {(topic, partition): (offset, metadata) for topic, partition, offset, metadata in args["offsets"]}
            records = []
            for tp, (offset, metadata) in sorted(offsets.items()):
                group.offsets[tp] = (offset, metadata)
                records.append((PUT, core._offset_key(args["group_id"], tp), {"offset": offset, "metadata": metadata}))
            self.store.apply(records)
            log.warning("SABOTAGE: accepted a commit refused with %s: %s", exc.code, exc.message)
            return core.CommitReply({tp: o for tp, (o, _) in offsets.items()}, frozenset()).to_wire()


# -- the builds ----------------------------------------------------------------------------------------

def node_class(switches: frozenset) -> type:
    """Node, with its store, partition logs, replica core and own decisions sabotaged by ``switches``."""
    log_bases = tuple(cls for name, cls in (("skip_dedup", SkipDedupLog), ("skip_epoch_check", SkipEpochCheckLog))
                      if name in switches)
    store_base = AckBeforeSyncStore if "ack_before_sync" in switches else LogStore
    store = type("SabotagedLogStore", (store_base,),
                 {"log_class": type("SabotagedPartitionLog", log_bases or (PartitionLog,), {})})
    node_bases = tuple(cls for name, cls in (("truncate_to_hw_on_rejoin", TruncateToHighWatermarkNode),
                                             ("ack_all_on_leader_fsync", AckOnLeaderFsyncNode),
                                             ("read_past_hw", ReadPastHighWatermarkNode))
                       if name in switches)
    replica = ShrinkWithoutControllerReplica if "shrink_isr_without_controller" in switches else Replica
    return type("SabotagedNode", node_bases or (Node,), {"store_class": store, "replica_class": replica})


def coordinator_class(switches: frozenset) -> type:
    service = StaleCommitGroupService if "skip_member_epoch_check" in switches else GroupService
    return type("SabotagedCoordinator", (Coordinator,), {"group_service_class": service})


def main(argv: list[str]) -> None:
    role, rest = argv[0], argv[1:]
    switches = parse(os.environ.get(ENV_VAR))
    logging.basicConfig(level=os.environ.get("BUS_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # A sabotaged process must never pass unnoticed.
    log.error("%s running with SABOTAGE %s: it WILL break its guarantees", role, ",".join(sorted(switches)) or "-")
    if role == "node":
        from nodes.node import main as node_main

        node_main(rest, node_class(switches))
    elif role == "coordinator":
        from nodes.coordinator import main as coordinator_main

        coordinator_main(rest, coordinator_class(switches))
    else:
        raise SystemExit(f"usage: python -m {__name__} node|coordinator ARGS...")


if __name__ == "__main__":
    main(sys.argv[1:])
