"""The partition-owner node: one process serving produce, fetch and list-offsets for the partitions it
leads, and replicating those it follows (docs/replication.md).

It owns: a ROUTER socket for clients and for followers' fetches, a DEALER to the coordinator
(registration, heartbeats and ISR changes; the coordinator pushes placement changes down it), a DEALER to
each leader it follows (nodes/follower.py), and a ``LogStore`` (one LMDB environment). The decisions of
replication are the replica core's (nodes/replica.py), one ``Replica`` per partition it holds; this shell
stores, sends and replies. One thread, one loop:

1. wait for requests, replies, the next deadline (long polls, ISR lag, heartbeats);
2. apply placement pushed by the coordinator before anything else;
3. drain every request waiting; produces of that turn are appended in ONE transaction, synced once (group
   commit); acks=1 is answered then, acks=all once the high watermark passes the batches (the
   purgatory, nodes/purgatory.py), which for a partition with one replica is at once; what arrived
   during the commit is read before its produces are answered (fetches then get what it committed; the
   produces among them are deferred to the next turn);
4. store what the leaders sent this node's followers, synced, and ask them again at once (that fetch
   tells the leader the new log end);
5. answer long polls that can be answered, expire what is due, propose ISR changes.

It never unpacks a record: batches are stored and served as the producer packed them, and followers store
them byte for byte.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import zmq

from bus import batch as batch_format
from bus import wire
from bus.clock import LOOP_WAIT_MS_MAX, monotonic_ms, now_ms
from bus.errors import (BusError, CorruptRecord, InvalidRequest, NotCommitted, NotLeader, OffsetOutOfRange,
                        RecordTooLarge, Timeout, UnknownPartition, UnknownTopic)
from store import LogStore

from . import kafka
from .controller import COORDINATOR_BROKER_ID
from .follower import REPLICA_FETCH_PART_BYTES_MAX, FollowerLinks
from .metrics import NodeMetrics, serve
from .purgatory import Purgatory
from .replica import (ACKS_ALL, BECAME_FOLLOWER, BECAME_LEADER, FOLLOWER, ISR_CHANGED, LEADER, STOPPED,
                      Assignment, Replica, divergence)
from .server import LATER, Reply, Request, RouterServer, install_stop_handlers

log = logging.getLogger("bus.node")

HEARTBEAT_INTERVAL_MS = 300
PLACEMENT_ASK_INTERVAL_MS = 50  # at most this often, a request for an unknown topic brings the heartbeat forward
RETENTION_CHECK_INTERVAL_MS = 1_000
MESSAGE_BYTES_MAX = 64 << 20  # zmq refuses larger messages outright (a rogue client cannot OOM us)
FETCH_WAIT_MS_MAX = 60_000
PRODUCE_TIMEOUT_MS_DEFAULT = 30_000  # how long an acks=all produce waits for its batches to be committed
PRODUCE_TIMEOUT_MS_MAX = 300_000
ALTER_TIMEOUT_MS = 5_000  # an ISR change unanswered this long is forgotten (the replica asks again)
ISR_CHECK_INTERVAL_MS = 100  # how often every led partition's ISR is looked at (for lagging followers)
ENDS_FULL_EVERY = 10  # heartbeats: every this many, a node reports all its partitions' ends, not only moved ones
MAP_SIZE_INITIAL_BYTES = 1 << 28  # the LMDB map starts here (or at --map-size-max if lower) and doubles
# keep_freed_memory(): allocations up to this size come from the heap, not their own mapping ...
MALLOC_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc accepts no more
# ... and freed heap memory is given back to the kernel only beyond this much, or this much is padded on.
MALLOC_TRIM_THRESHOLD_BYTES = 512 << 20
MALLOC_TOP_PAD_BYTES = 64 << 20

ACKS = {0: 0, 1: 1, -1: ACKS_ALL, "all": ACKS_ALL}


def _error_part(exc: BusError) -> list:
    return [exc.code, exc.message, -1, False, -1]


BULK_OPS = frozenset((wire.PRODUCE,))  # the requests whose bulk frames (record batches) the server keeps

class Node:
    # A subclass may run on subclasses of the store and of the replica core (the fault harness's builds do).
    store_class = LogStore
    replica_class = Replica

    def __init__(self, node_id: int, data_dir: str, bind: str, coordinator: str, *, advertise: str | None = None,
                 sync: str = "always", map_size_max_bytes: int = 1 << 40,
                 heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS,
                 retention_check_interval_ms: int = RETENTION_CHECK_INTERVAL_MS, metrics_port: int | None = None,
                 metrics_addr: str = "127.0.0.1", kafka_listen: str | None = None, kafka_advertise: str | None = None):
        self.node_id = node_id
        self.metrics = NodeMetrics(self)
        # The high watermark is the replica core's to move (nodes/replica.py), not the store's on append.
        self.store = self.store_class(data_dir, sync=sync,
                                      map_size_bytes=min(MAP_SIZE_INITIAL_BYTES, map_size_max_bytes),
                                      map_size_max_bytes=map_size_max_bytes, high_watermark_follows_append=False)
        self.store.claim_identity(f"node-{node_id}")
        # Who this data directory is: a node back under its id with another one (it lost its disk) must not
        # be taken for a replica holding its old data (KIP-903).
        self.dir_id = self.store.get_meta(b"n:dir_id")
        if self.dir_id is None:
            self.dir_id = uuid.uuid4().hex
            self.store.put_meta(b"n:dir_id", self.dir_id)
        self.context = zmq.Context()
        self.context.setsockopt(zmq.MAXMSGSIZE, MESSAGE_BYTES_MAX)
        self.server = RouterServer(self.context, bind, role="node", observe=self.metrics.answered)
        self.advertise = advertise or self.server.bind
        self.coordinator = self.context.socket(zmq.DEALER)
        self.coordinator.setsockopt(zmq.LINGER, 0)
        self.coordinator.setsockopt(zmq.IMMEDIATE, 1)  # don't queue heartbeats for a coordinator that is down
        self.coordinator.setsockopt(zmq.SNDHWM, 64)
        self.coordinator.connect(coordinator)
        self.instance = uuid.uuid4().hex  # this incarnation: the coordinator tells a restart by it
        self.links = FollowerLinks(self.context, node_id, self.instance)
        self.heartbeat_interval_s = heartbeat_interval_ms / 1000
        self.retention_interval_s = retention_check_interval_ms / 1000
        self.next_heartbeat_s = 0.0
        self.placement_ask_s = 0.0  # no early heartbeat for an unknown topic before this
        self.next_retention_s = time.monotonic() + self.retention_interval_s
        self.stopping = False
        self.refused = None  # why the coordinator refused this node, which then stops (exit status 1)
        self.request_seq = 0
        # request id -> (on_reply(error, result), on_timeout() or None, deadline_s): what this node asked the
        # coordinator beside its heartbeats (ISR changes; Kafka clients' producer ids and topic changes)
        self.asks: dict[int, tuple] = {}
        self.next_isr_check_ms = 0
        self.hw_waiters = Purgatory()  # consumer fetches and acks=all produces: woken when the high watermark moves
        self.append_waiters = Purgatory()  # followers' fetches: woken by an append
        self.handlers = {wire.PRODUCE: self._produce, wire.FETCH: self._fetch, wire.LIST_OFFSETS: self._list_offsets,
                         wire.EPOCH_END_OFFSETS: self._epoch_end_offsets, wire.REPLICA_FETCH: self._replica_fetch,
                         wire.PING: lambda request: {"node_id": self.node_id}}
        # Kafka's protocol on a listener of its own, in this loop, over the same handlers (docs/kafka.md).
        self.kafka_nodes: dict[int, str] = {}  # node id -> its Kafka listener's address, as the coordinator says
        self.kafka = None if not kafka_listen else kafka.listen(
            kafka_listen, cluster_id=lambda: self.cluster_id, brokers=self._kafka_brokers, topics=lambda: self.topics,
            handlers=self.handlers, coordinator=self._ask_coordinator,
            apis=kafka.GroupApis(lambda: self.kafka_nodes.get(COORDINATOR_BROKER_ID)).apis(),
            frame_bytes_max=MESSAGE_BYTES_MAX, node_id=self.node_id)
        self.kafka_advertise = None if self.kafka is None else kafka_advertise or self.kafka.address
        self.produces: list = []  # this turn's produce requests, committed together at its end
        # The placement as last heard from the coordinator, cached on disk so a restarted node serves its
        # partitions even while the coordinator is down.
        self.placement_version = -1
        self.topics: dict[str, dict] = {}
        self.addresses: dict[int, str] = {}  # node id -> address, for following leaders
        self.logs: dict[tuple, object] = {}  # (topic, partition) -> PartitionLog, for the partitions held here
        self.replicas: dict[tuple, Replica] = {}
        self.cluster_id = self.store.get_meta(b"n:cluster_id")  # the cluster whose coordinator this node follows
        self.heartbeats_sent = 0
        self.reported_ends: dict[tuple, int] = {}  # what heartbeats last told the coordinator of each partition
        cached = self.store.get_meta(b"n:placement")
        if cached is not None:
            self._apply_placement(cached["version"], cached["topics"], cached.get("nodes", {}), persist=False)
        serve(self.metrics.registry, metrics_port, metrics_addr)

    # -- placement ---------------------------------------------------------------------------------

    def _apply_placement(self, version: int, topics: dict, addresses: dict, persist: bool = True) -> None:
        if persist:
            # Before acting on it: a leader's new epoch goes into its log as it is applied (begin_epoch), and
            # a node killed after that must restart on this placement, not on the one before, whose older
            # epoch it cannot lead by (tests/test_replication.py).
            self.store.put_meta(b"n:placement", {"version": version, "topics": topics, "nodes": addresses})
        wanted = {}  # (topic, partition) -> (log name, min ISR, Assignment), for the partitions held here
        for name, topic in topics.items():
            for index, state in enumerate(topic["partitions"]):
                if self.node_id in state["replicas"]:
                    wanted[(name, index)] = (f"{topic['id']}/{index}", topic["min_insync_replicas"],
                                             Assignment.from_wire(state))
        live_names = {log_name for log_name, _, _ in wanted.values()}
        for tp in [tp for tp in self.logs if tp not in wanted]:
            self._release(tp)
        # Drop before opening: LMDB holds a fixed number of partition databases (store.log_store.PARTITIONS_MAX).
        for stale in [name for name in self.store.logs if name not in live_names]:
            # Its topic was deleted (ids are never reused, so a re-created topic gets fresh logs).
            self.store.drop_partition(stale)
        self.topics, self.placement_version = topics, version
        self.addresses = {int(k): v for k, v in addresses.items()}
        now = monotonic_ms()
        for tp, (log_name, min_insync, assignment) in wanted.items():
            plog = self.logs.get(tp)
            if plog is None or plog.name != log_name:
                plog = self.logs[tp] = self.store.open_partition(log_name)
                self.replicas[tp] = self.replica_class(self.node_id, min_insync, high_watermark=plog.high_watermark)
            self._apply_assignment(tp, assignment, now)
        self._follow()

    def _apply_assignment(self, tp: tuple, assignment: Assignment, now: int) -> None:
        replica, plog = self.replicas[tp], self.logs[tp]
        change = replica.apply(assignment, plog.next_offset, now)
        if change == BECAME_LEADER:
            self.store.begin_epoch(plog, assignment.leader_epoch)
            log.info("node %d leads %s/%s at epoch %d, ISR %s", self.node_id, *tp, assignment.leader_epoch,
                     list(assignment.isr))
        elif change == BECAME_FOLLOWER:
            log.info("node %d follows node %d for %s/%s at epoch %d", self.node_id, assignment.leader, *tp,
                     assignment.leader_epoch)
        elif change == ISR_CHANGED:
            log.info("node %d: the ISR of %s/%s is now %s", self.node_id, *tp, list(assignment.isr))
        if change in (BECAME_LEADER, ISR_CHANGED):
            self._advance(tp)
        if change in (BECAME_LEADER, BECAME_FOLLOWER, STOPPED):
            # What waits on this partition answers now, with the new role's word (NOT_LEADER for a follower).
            self.hw_waiters.check(tp)
            self.append_waiters.check(tp)

    def _release(self, tp: tuple) -> None:
        """This node no longer holds ``tp``: answer what waits on it and forget it."""
        self.replicas.pop(tp, None)
        self.logs.pop(tp, None)
        self.hw_waiters.expire_all(tp)
        self.append_waiters.expire_all(tp)

    def _follow(self) -> None:
        self.links.follow({tp: r.leader for tp, r in self.replicas.items() if r.role == FOLLOWER}, self.addresses)

    def _replica_for(self, topic, partition) -> Replica:
        """The replica of ``topic``/``partition`` held here, or the typed error a client acts on."""
        replica = self.replicas.get((topic, partition))
        if replica is not None:
            return replica
        meta = self.topics.get(topic)
        if meta is None:
            self._ask_placement_soon()
            raise UnknownTopic(f"topic {topic!r} is not known to node {self.node_id}")
        if not isinstance(partition, int) or not 0 <= partition < len(meta["partitions"]):
            raise UnknownPartition(f"topic {topic!r} has no partition {partition!r}")
        leader = meta["partitions"][partition]["leader"]
        raise NotLeader(f"node {self.node_id} holds no replica of {topic}/{partition} (the leader is node {leader})")

    def _kafka_brokers(self) -> dict:
        """What a Kafka Metadata answer lists as brokers: the live nodes' Kafka listeners, this one's too."""
        return {**self.kafka_nodes, self.node_id: self.kafka_advertise}

    def _ask(self, op: str, args: dict, on_reply, on_timeout=None) -> bool:
        """Send the coordinator a request over this node's DEALER; ``on_reply(error, result)`` once its reply
        is in (``_drain_coordinator``), else ``on_timeout()`` after ALTER_TIMEOUT_MS. False: not sent (the
        coordinator is unreachable)."""
        self.request_seq += 1
        try:
            self.coordinator.send_multipart(wire.encode_request(op, self.request_seq, args), zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.asks[self.request_seq] = (on_reply, on_timeout, time.monotonic() + ALTER_TIMEOUT_MS / 1000)
        return True

    def _ask_coordinator(self, op: str, args: dict, answer) -> None:
        """A Kafka client's request that the coordinator answers (a producer id, a topic to create or delete):
        ``answer(result, (bus error code, message) or None)`` once its reply is in, or with an error."""
        sent = self._ask(op, args, lambda error, result: answer(result if error is None else None,
                                                                None if error is None else tuple(error[:2])),
                         lambda: answer(None, ("TIMEOUT", "the coordinator did not answer")))
        if not sent:
            answer(None, ("NODE_UNAVAILABLE", "the coordinator is unreachable"))  # the client retries

    def _ask_placement_soon(self) -> None:
        """A client named a topic this node has not heard of: it may have just been created, so heartbeat now
        (at most every PLACEMENT_ASK_INTERVAL_MS) rather than at the next interval; the reply brings it."""
        now_s = time.monotonic()
        if now_s >= self.placement_ask_s:
            self.placement_ask_s = now_s + PLACEMENT_ASK_INTERVAL_MS / 1000
            self.next_heartbeat_s = min(self.next_heartbeat_s, now_s)

    def _advance(self, tp: tuple) -> None:
        """The leader's high watermark may move (an append, a follower's fetch, an ISR change)."""
        replica = self.replicas[tp]
        if replica.advance(self.logs[tp].next_offset):
            self._high_watermark_moved(tp)

    def _high_watermark_moved(self, tp: tuple) -> None:
        self.store.set_high_watermark(self.logs[tp], self.replicas[tp].high_watermark)
        self.hw_waiters.check(tp)

    # -- the loop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping = True

    def serve_forever(self) -> None:
        log.info("node %d serving on %s (advertised %s)", self.node_id, self.server.bind, self.advertise)
        try:
            while not self.stopping:
                poller = zmq.Poller()
                poller.register(self.coordinator, zmq.POLLIN)
                poller.register(self.server.socket, zmq.POLLIN)
                for socket in self.links.sockets():
                    poller.register(socket, zmq.POLLIN)
                if self.kafka is not None:
                    self.kafka.register(poller)
                ready = dict(poller.poll(self._poll_timeout_ms()))
                if self.coordinator in ready:
                    self._drain_coordinator()
                if self.server.socket in ready or self.server.deferred:
                    self.server.serve_turn(self.handlers, bulk_ops=BULK_OPS)
                if self.kafka is not None:
                    self.kafka.serve(ready)
                # The turn's produces, from the bus's clients and Kafka's alike: one transaction, one sync.
                self._commit_turn()
                for link, error, result, bulk in self.links.replies(ready):
                    self._replica_fetched(link, error, result, bulk)
                self._timers()
                self.links.send_due(time.monotonic(), self._fetch_parts)
        finally:
            self.close()

    def _poll_timeout_ms(self) -> int:
        if self.server.deferred:
            return 0  # produces read during the last commit (``_commit``): the next turn takes them at once
        now_s = time.monotonic()
        wake_s = min(self.next_heartbeat_s, now_s + LOOP_WAIT_MS_MAX / 1000)
        for deadline_s in (self.hw_waiters.next_deadline_s(), self.append_waiters.next_deadline_s(),
                           self.links.next_deadline_s(now_s)):
            if deadline_s is not None:
                wake_s = min(wake_s, deadline_s)
        return max(0, int((wake_s - now_s) * 1000) + 1)

    def _timers(self) -> None:
        now_s = time.monotonic()
        self.hw_waiters.expire(now_s)
        self.append_waiters.expire(now_s)
        if now_s >= self.next_heartbeat_s:
            self._send_heartbeat()
            self.next_heartbeat_s = now_s + self.heartbeat_interval_s
        if now_s >= self.next_retention_s:
            self._retention()
            self.next_retention_s = now_s + self.retention_interval_s
        for request_id in [r for r, (_, _, deadline_s) in self.asks.items() if deadline_s <= now_s]:
            on_timeout = self.asks.pop(request_id)[1]
            if on_timeout is not None:
                on_timeout()
        self._propose(monotonic_ms())
        self.store.flush_due(monotonic_ms())

    def _commit_turn(self) -> None:
        if self.produces:
            produces, self.produces = self.produces, []
            self._commit(produces)

    # -- produce -----------------------------------------------------------------------------------

    def _produce(self, request: Request):
        """Check a produce and hold it for this turn's group commit (``_commit`` replies)."""
        args, bulk = request.args, request.bulk
        parts, raw_acks = args["parts"], args.get("acks", 1)
        acks = ACKS.get(raw_acks) if isinstance(raw_acks, (int, str)) else None
        if acks is None:
            raise InvalidRequest(f"acks must be 0, 1 or \"all\", not {args.get('acks')!r}")
        timeout_ms = min(int(args.get("timeout_ms", PRODUCE_TIMEOUT_MS_DEFAULT)), PRODUCE_TIMEOUT_MS_MAX)
        if not isinstance(parts, list) or len(parts) != len(bulk):
            raise InvalidRequest(f"produce names {len(parts) if isinstance(parts, list) else '?'} "
                                 f"partitions but carries {len(bulk)} batches")
        results, items = [None] * len(parts), []
        for index, (part, buf) in enumerate(zip(parts, bulk)):
            topic, partition, *epoch = part
            try:
                replica = self._replica_for(topic, partition)
                replica.check_produce(epoch[0] if epoch else None, acks)
                if len(buf) > batch_format.BATCH_BYTES_MAX:
                    raise RecordTooLarge(f"batch of {len(buf)} bytes exceeds the node's "
                                         f"{batch_format.BATCH_BYTES_MAX}")
                items.append((index, (topic, partition), buf))
            except BusError as exc:
                results[index] = _error_part(exc)
        self.produces.append((request, acks, timeout_ms, results, items))
        return LATER

    def _commit(self, produces: list) -> None:
        flat = [(self.logs[tp], buf) for *_, items in produces for _, tp, buf in items]
        started_s = time.monotonic()
        outcomes = iter(self.store.append(flat) if flat else ())
        if flat:
            self.metrics.commit.labels("produce").observe(time.monotonic() - started_s)
        appended = set()
        waiting = []
        for request, acks, timeout_ms, results, items in produces:
            required = {}  # index -> (tp, leader epoch, end offset): what acks=all waits for
            for index, tp, buf in items:
                outcome = next(outcomes)
                if isinstance(outcome, BusError):
                    results[index] = _error_part(outcome)
                    continue
                base_offset, append_ts_ms, duplicate = outcome
                results[index] = [None, None, base_offset, duplicate, append_ts_ms]
                appended.add(tp)
                record_count = batch_format.read_header(buf).record_count
                if not duplicate:
                    self.metrics.produced_records.labels(tp[0]).inc(record_count)
                    self.metrics.produced_bytes.labels(tp[0]).inc(len(buf))
                if acks == ACKS_ALL:
                    required[index] = (tp, self.replicas[tp].leader_epoch, base_offset + record_count)
            waiting.append((request, acks, timeout_ms, results, required))
        for tp in appended:
            self.append_waiters.check(tp)  # followers waiting for data
            self._advance(tp)  # one replica: committed at once
        # What arrived during the commit, before its produces are answered: a consumer's next fetch, there by
        # now, gets what was just committed at once instead of after the acknowledgements and a loop round
        # (docs/benchmarks.md, M). The produces among them are deferred to the next turn, which comes at once:
        # a produce is checked (leader, epoch) in the turn that commits it, after any placement before it.
        self.server.serve_turn(self.handlers, bulk_ops=BULK_OPS, defer=BULK_OPS)
        for request, acks, timeout_ms, results, required in waiting:
            if acks == 0:
                continue
            if not required:
                self._answer(request, {"parts": results})
            else:
                self._wait_for_commit(request, timeout_ms, results, required)

    def _answer(self, request: Request, result, bulk=(), error: str | None = None) -> None:
        """Reply to a request held past its turn, and count it as the turn counts the others."""
        if request.respond is not None:
            request.respond(result, bulk, error)  # a Kafka client's (nodes/kafka/service.py)
        else:
            self.server.reply(request.identity, request.request_id, result, bulk)
        self.metrics.answered(request.op, time.monotonic() - request.received_s, error)

    def _wait_for_commit(self, request: Request, timeout_ms: int, results: list, required: dict) -> None:
        """Answer an acks=all produce once the high watermark passed each of its batches (in the leader's
        epoch that appended it), or with the error its partition gives meanwhile."""

        def try_complete() -> bool:
            for index, (tp, epoch, end_offset) in list(required.items()):
                replica = self.replicas.get(tp)
                if replica is None or replica.role != LEADER or replica.leader_epoch != epoch:
                    results[index] = _error_part(NotCommitted(
                        f"leadership of {tp[0]}/{tp[1]} moved before the batch was committed (it may or may not be kept)"))
                elif replica.high_watermark >= end_offset:
                    pass  # committed: the result already holds its offset
                else:
                    continue
                del required[index]
            if required:
                return False
            self._answer(request, {"parts": results})
            return True

        def expire() -> None:
            for index in required:
                results[index] = _error_part(Timeout("the batch was not committed within the produce timeout "
                                                     "(it may or may not be kept)"))
            self._answer(request, {"parts": results}, error=Timeout.code)

        if not try_complete():
            self.hw_waiters.add({tp for tp, _, _ in required.values()}, time.monotonic() + timeout_ms / 1000,
                                try_complete, expire)

    # -- fetch -------------------------------------------------------------------------------------

    def _fetch(self, request: Request):
        args = request.args
        parts = []
        for part in args["parts"]:
            topic, partition, offset, part_bytes_max, *epoch = part
            parts.append((topic, partition, int(offset), int(part_bytes_max), epoch[0] if epoch else None))
        max_wait_ms = min(int(args.get("max_wait_ms", 0)), FETCH_WAIT_MS_MAX)
        min_bytes = int(args.get("min_bytes", 1))
        max_bytes = int(args.get("max_bytes", 50 << 20))
        result, bulk, total = self._read_parts(parts, max_bytes)
        if total >= min_bytes or max_wait_ms <= 0 or any(r[2] for r in result):
            self._count_fetched(parts, result, bulk)
            return Reply({"parts": result}, bulk)

        def answer(final: bool) -> bool:
            result, bulk, total = self._read_parts(parts, max_bytes)
            if not final and total < min_bytes and not any(r[2] for r in result):
                return False
            self._count_fetched(parts, result, bulk)
            self._answer(request, {"parts": result}, bulk)
            return True

        self.hw_waiters.add({(t, p) for t, p, *_ in parts}, time.monotonic() + max_wait_ms / 1000,
                            lambda: answer(False), lambda: answer(True))
        return LATER

    def _count_fetched(self, parts, result, bulk) -> None:
        for (topic, _, offset, _, _), row, data in zip(parts, result, bulk):
            if data:
                self.metrics.fetched_records.labels(topic).inc(max(0, row[6] - offset))  # next offset - asked
                self.metrics.fetched_bytes.labels(topic).inc(len(data))

    def _read_parts(self, parts, max_bytes):
        """A consumer's read: from the leader, up to the high watermark. The end offset reported is the
        high watermark, or -1 while a new leader's is not known yet (clients keep the one they had)."""
        result, bulk, total = [], [], 0
        for topic, partition, offset, part_bytes_max, epoch in parts:
            plog = self.logs.get((topic, partition))
            try:
                replica = self._replica_for(topic, partition)
                replica.check_epoch(epoch)
                data, next_offset = self.store.read(plog, offset, max(1, min(part_bytes_max, max_bytes - total)),
                                                    self._readable_end(replica, plog))
                end = replica.high_watermark if replica.high_watermark_known else -1
                result.append([topic, partition, None, None, plog.start_offset, end, next_offset])
                bulk.append(data)
                total += len(data)
            except BusError as exc:
                start, end = (plog.start_offset, plog.next_offset) if plog is not None else (-1, -1)
                if isinstance(exc, CorruptRecord):
                    log.error("serving %s/%s failed: %s", topic, partition, exc)  # corrupt: loud, never served
                result.append([topic, partition, exc.code, exc.message, start, end, offset])
                bulk.append(b"")
        return result, bulk, total

    def _readable_end(self, replica: Replica, plog) -> int:
        """Where a consumer's read stops: the high watermark, so a record read is never lost afterwards."""
        return replica.high_watermark

    # -- list offsets --------------------------------------------------------------------------------

    def _list_offsets(self, request: Request) -> dict:
        """Each part's offset for its spec; with ``detail`` (Kafka's ListOffsets asks it) each row also
        carries the found record's timestamp (-1 for the log's ends and for none) and the leader epoch that
        appended at the offset (the current one for "latest", as Kafka answers)."""
        detail = bool(request.args.get("detail"))
        out = []
        for part in request.args["parts"]:
            topic, partition, spec, *epoch = part
            try:
                replica = self._replica_for(topic, partition)
                plog = self.logs[(topic, partition)]
                timestamp_ms = -1
                if spec == "earliest":
                    replica.check_epoch(epoch[0] if epoch else None)
                    offset = plog.start_offset
                    leader_epoch = plog.epoch_for_offset(offset)
                elif spec == "latest":
                    replica.check_list_offsets(epoch[0] if epoch else None)
                    offset, leader_epoch = replica.high_watermark, replica.leader_epoch
                elif spec == "max_timestamp":
                    replica.check_list_offsets(epoch[0] if epoch else None)
                    offset, timestamp_ms = self.store.record_with_max_time(plog, replica.high_watermark)
                    leader_epoch = plog.epoch_for_offset(offset) if offset >= 0 else -1
                elif isinstance(spec, int) and not isinstance(spec, bool):
                    replica.check_list_offsets(epoch[0] if epoch else None)
                    offset, timestamp_ms = self.store.record_for_time(plog, spec, replica.high_watermark)
                    offset = max(offset, plog.start_offset)
                    leader_epoch = plog.epoch_for_offset(offset) if timestamp_ms >= 0 else -1
                else:
                    raise InvalidRequest(f"offset spec must be 'earliest', 'latest', 'max_timestamp' or a "
                                         f"timestamp, not {spec!r}")
                row = [None, None, offset, plog.start_offset, replica.high_watermark]
                out.append(row + [timestamp_ms, leader_epoch] if detail else row)
            except BusError as exc:
                row = [exc.code, exc.message, -1, -1, -1]
                out.append(row + [-1, -1] if detail else row)
        return {"parts": out}

    def _epoch_end_offsets(self, request: Request) -> dict:
        """Where each asked leader epoch ends in this leader's log (Kafka's OffsetForLeaderEpoch, which a
        consumer sends after a leader change to learn whether the log it read from was truncated): per part
        ``[topic, partition, current_leader_epoch or None, leader_epoch]``, a row ``[code, message, epoch,
        end_offset]`` from ``PartitionLog.end_offset_for_epoch`` (the latest epoch ends at the log end;
        ``(-1, -1)`` when the epoch is newer than any here or none are kept)."""
        out = []
        for topic, partition, current_epoch, leader_epoch in request.args["parts"]:
            leader_epoch = int(leader_epoch)  # before any part is answered: a bad one refuses the request
            try:
                replica = self._replica_for(topic, partition)
                replica.check_epoch(current_epoch)
                epoch, end_offset = self.logs[(topic, partition)].end_offset_for_epoch(leader_epoch)
                out.append([None, None, epoch, end_offset])
            except BusError as exc:
                out.append([exc.code, exc.message, -1, -1])
        return {"parts": out}

    # -- replication: the leader's side --------------------------------------------------------------

    def _replica_fetch(self, request: Request):
        """A follower's fetch: its log end per partition tells this leader how far it holds the log (and so
        moves the high watermark); the answer carries what follows, up to the log end, or where the
        follower's log diverged from this one (KIP-279)."""
        args = request.args
        follower, incarnation = args["replica_id"], args.get("incarnation")
        max_wait_ms = min(int(args.get("max_wait_ms", 0)), FETCH_WAIT_MS_MAX)
        max_bytes = int(args.get("max_bytes", 16 << 20))
        now = monotonic_ms()
        parts = []
        for topic, partition, leader_epoch, fetch_offset, last_epoch, part_bytes_max in args["parts"]:
            tp, fetch_offset = (topic, partition), int(fetch_offset)
            parts.append((tp, leader_epoch, fetch_offset, int(last_epoch), int(part_bytes_max)))
            try:
                replica = self._replica_for(topic, partition)
                replica.check_epoch(leader_epoch)
                if follower not in replica.assignment.replicas or follower == self.node_id:
                    continue  # answered as an error by _read_for_follower
                plog = self.logs[tp]
                if (divergence(plog, int(last_epoch), fetch_offset) is None
                        and plog.start_offset <= fetch_offset <= plog.next_offset):
                    if replica.follower_fetched(follower, incarnation, fetch_offset, plog.next_offset, now):
                        self._high_watermark_moved(tp)
                    if follower not in replica.assignment.isr:
                        self._propose_for(tp, replica, now)  # it may have just caught up
            except BusError:
                continue  # answered as an error by _read_for_follower
        result, bulk, total, settled = self._read_for_follower(follower, parts, max_bytes)
        if total > 0 or settled or max_wait_ms <= 0:
            return Reply({"parts": result}, bulk)

        def answer(final: bool) -> bool:
            result, bulk, total, settled = self._read_for_follower(follower, parts, max_bytes)
            if not final and total == 0 and not settled:
                return False
            self._answer(request, {"parts": result}, bulk)
            return True

        self.append_waiters.add({tp for tp, *_ in parts}, time.monotonic() + max_wait_ms / 1000,
                                lambda: answer(False), lambda: answer(True))
        return LATER

    def _read_for_follower(self, follower: int, parts, max_bytes: int):
        """Per part ``[topic, partition, code, message, high watermark, log start, diverging epoch, diverging
        end offset]`` and its batches. ``settled``: some part is an error or a divergence (answer now)."""
        result, bulk, total, settled = [], [], 0, False
        for tp, leader_epoch, fetch_offset, last_epoch, part_bytes_max in parts:
            plog = self.logs.get(tp)
            data, row = b"", None
            try:
                replica = self._replica_for(*tp)
                replica.check_epoch(leader_epoch)
                if follower not in replica.assignment.replicas or follower == self.node_id:
                    raise NotLeader(f"node {follower} is not a follower of {tp[0]}/{tp[1]}")
                diverged = divergence(plog, last_epoch, fetch_offset)
                if diverged is not None:
                    row = [*tp, None, None, replica.high_watermark, plog.start_offset, *diverged]
                    settled = True
                else:
                    data, _ = self.store.read(plog, fetch_offset, max(1, min(part_bytes_max, max_bytes - total)))
                    row = [*tp, None, None, replica.high_watermark, plog.start_offset, None, None]
            except BusError as exc:
                start = plog.start_offset if plog is not None else -1
                row = [*tp, exc.code, exc.message, -1, start, None, None]
                settled = True
            result.append(row)
            bulk.append(data)
            total += len(data)
        return result, bulk, total, settled

    def _propose(self, now: int) -> None:
        """Send the ISR changes the leaders here want (one in flight per partition): every
        ISR_CHECK_INTERVAL_MS over all of them (lag is measured in seconds), and at once for a partition
        whose follower outside the ISR just fetched (``_replica_fetch``), so a caught-up replica rejoins
        without waiting."""
        if now < self.next_isr_check_ms:
            return
        self.next_isr_check_ms = now + ISR_CHECK_INTERVAL_MS
        for tp, replica in self.replicas.items():
            if replica.role == LEADER:
                self._propose_for(tp, replica, now)

    def _propose_for(self, tp: tuple, replica: Replica, now: int) -> None:
        proposal = replica.proposal(self.logs[tp].next_offset, now)
        if proposal is not None:
            args = {"node_id": self.node_id, "instance": self.instance, "topic": tp[0], "partition": tp[1],
                    "leader_epoch": proposal.leader_epoch, "partition_epoch": proposal.partition_epoch,
                    "isr": list(proposal.isr), "incarnations": proposal.incarnations}
            if not self._ask(wire.ALTER_PARTITION, args, lambda error, result: self._altered(tp, error, result)):
                return  # the coordinator is unreachable: the replica asks again later
            log.info("node %d proposes ISR %s for %s/%s (was %s)", self.node_id, list(proposal.isr), *tp,
                     list(replica.assignment.isr))

    def _altered(self, tp: tuple, error, result) -> None:
        replica = self.replicas.get(tp)
        if replica is None:
            return
        if error is not None:
            log.info("node %d: ISR change of %s/%s refused: %s: %s", self.node_id, *tp, *error)
            replica.proposal_refused(monotonic_ms())
            self._advance(tp)  # an expansion no longer pending no longer holds the high watermark
            return
        self._apply_assignment(tp, Assignment.from_wire(result), monotonic_ms())

    # -- replication: the follower's side ------------------------------------------------------------

    def _fetch_parts(self, tps) -> list:
        parts = []
        for tp in tps:
            replica, plog = self.replicas.get(tp), self.logs.get(tp)
            if replica is None or replica.role != FOLLOWER:
                continue
            parts.append([*tp, replica.leader_epoch, plog.next_offset, plog.latest_epoch(),
                          REPLICA_FETCH_PART_BYTES_MAX])
        return parts

    def _replica_fetched(self, link, error, result, bulk) -> None:
        """Store what a leader sent: cut a diverged tail, append batches byte for byte (one synced
        transaction each), take the leader's high watermark. The link then asks again at once."""
        if error is not None:
            log.warning("node %d: replica fetch from node %d failed: %s: %s", self.node_id, link.leader, *error)
            self.links.back_off(link)
            return
        backing_off = False
        for (topic, partition, code, message, leader_hw, leader_start, div_epoch, div_end), data in zip(
                result["parts"], bulk):
            tp = (topic, partition)
            replica, plog = self.replicas.get(tp), self.logs.get(tp)
            if replica is None or replica.role != FOLLOWER or replica.leader != link.leader:
                continue  # the placement moved on since this fetch left
            try:
                if code == OffsetOutOfRange.code and leader_start > plog.next_offset:
                    # The leader's retention passed this log's end: start again at the leader's log start.
                    self.store.reset_to(plog, leader_start)
                    replica.log_rewritten(plog.high_watermark)
                    continue
                if code is not None:
                    backing_off = True  # NOT_LEADER, an epoch not yet known here...: the placement settles it
                    continue
                if div_epoch is not None:
                    offset, _ = plog.truncation_offset(div_epoch, div_end)
                    if offset < replica.high_watermark:
                        log.error("node %d: %s/%s diverged below its high watermark %d (truncating to %d)",
                                  self.node_id, *tp, replica.high_watermark, offset)
                    log.info("node %d: %s/%s diverged from node %d's log; truncating %d -> %d", self.node_id, *tp,
                             link.leader, plog.next_offset, offset)
                    self.store.truncate_to(plog, offset)
                    replica.log_rewritten(plog.high_watermark)
                    continue
                if len(data):
                    started_s = time.monotonic()
                    self.store.append_replica(plog, data)
                    self.metrics.commit.labels("replica").observe(time.monotonic() - started_s)
                    self.metrics.replicated_bytes.labels(topic).inc(len(data))
                if replica.follow(leader_hw, plog.next_offset):
                    self.store.set_high_watermark(plog, replica.high_watermark)
            except (BusError, ValueError) as exc:
                # A store refusal (full, a batch that does not continue the log, a cut inside a batch): never
                # a crash, since only a broken leader or a corrupt log could cause it; said loudly, retried.
                log.error("node %d: storing %s/%s from node %d failed: %s", self.node_id, *tp, link.leader, exc)
                backing_off = True
        if backing_off:
            self.links.back_off(link)

    # -- coordinator link ----------------------------------------------------------------------------

    def _send_heartbeat(self) -> None:
        self.request_seq += 1
        args = {"node_id": self.node_id, "address": self.advertise, "instance": self.instance,
                "dir_id": self.dir_id, "version": self.placement_version, "ends": self._ends_to_report(),
                "kafka_address": self.kafka_advertise}
        try:
            self.coordinator.send_multipart(wire.encode_request(wire.NODE_HEARTBEAT, self.request_seq, args),
                                            zmq.NOBLOCK)
        except zmq.Again:
            pass  # the coordinator is unreachable; the next heartbeat tries again

    def _ends_to_report(self) -> list:
        """[[topic, partition, high watermark], ...] of the partitions this node leads whose high watermark
        moved since the last heartbeat (all of them every ENDS_FULL_EVERY heartbeats, so a lost one is made
        good): the coordinator computes consumer lag from them without asking the nodes."""
        self.heartbeats_sent += 1
        everything = self.heartbeats_sent % ENDS_FULL_EVERY == 1
        ends = []
        for tp, replica in self.replicas.items():
            if replica.role == LEADER and (everything or self.reported_ends.get(tp) != replica.high_watermark):
                ends.append([*tp, replica.high_watermark])
                self.reported_ends[tp] = replica.high_watermark
        return ends

    def _drain_coordinator(self) -> None:
        """Heartbeat replies, placement the coordinator pushed (request id None), answers to ISR changes."""
        while True:
            try:
                frames = self.coordinator.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                request_id, error, result, _ = wire.decode_reply(frames)
            except Exception:
                log.warning("undecodable reply from the coordinator dropped")
                continue
            asked = self.asks.pop(request_id, None) if request_id is not None else None
            if asked is not None:
                asked[0](error, result)
                continue
            if error is not None:
                log.error("coordinator refused node %d: %s: %s", self.node_id, *error)
                if error[0] == "NODE_IDENTITY_MISMATCH":
                    self.refused = error[1]
                    self.stopping = True
                continue
            if not self._same_cluster(result.get("cluster_id")):
                return
            if result.get("kafka_nodes") is not None:
                self.kafka_nodes = {int(k): v for k, v in result["kafka_nodes"].items()}
            log.debug("node %d: from the coordinator: version %s (have %s), topics %s", self.node_id,
                      result.get("version"), self.placement_version, result.get("topics") is not None)
            # Only a newer placement: a heartbeat reply sent before a push may arrive after it.
            if result.get("topics") is not None and result["version"] > self.placement_version:
                self._apply_placement(result["version"], result["topics"], result.get("nodes", {}))

    def _same_cluster(self, cluster_id) -> bool:
        if cluster_id is None or cluster_id == self.cluster_id:
            return True
        if self.cluster_id is not None:
            # Its placement would drop or, worse, reuse this node's logs (topic ids start again).
            self.refused = (f"data directory {self.store.path} belongs to cluster {self.cluster_id}, but the "
                            f"coordinator is cluster {cluster_id} (did it lose its data directory?); "
                            "nothing was changed")
            log.error("node %d: %s", self.node_id, self.refused)
            self.stopping = True
            return False
        self.cluster_id = cluster_id
        self.store.put_meta(b"n:cluster_id", cluster_id)
        return True

    # -- retention -----------------------------------------------------------------------------------

    def _retention(self) -> None:
        now = now_ms()
        for (topic, _), plog in self.logs.items():
            meta = self.topics.get(topic, {})
            if meta.get("retention_ms") is not None or meta.get("retention_bytes") is not None:
                self.store.apply_retention(plog, now, meta.get("retention_ms"), meta.get("retention_bytes"))

    def close(self) -> None:
        self.hw_waiters.expire_all()  # every held request gets its answer before the sockets close
        self.append_waiters.expire_all()
        self.links.close()
        if self.kafka is not None:
            self.kafka.close()
        self.server.close()
        self.coordinator.close()
        self.context.term()
        self.store.close()


def main(argv=None, node_class: type = Node) -> None:
    """``python -m nodes.node``. ``node_class``: a subclass of Node to run instead (the fault harness's)."""
    import argparse

    parser = argparse.ArgumentParser(description="a partition-owner node of the bus")
    parser.add_argument("--node-id", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--advertise")
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--sync", default="always", choices=["always", "interval", "none"])
    parser.add_argument("--map-size-max", type=int, default=1 << 40)
    parser.add_argument("--heartbeat-interval-ms", type=int, default=HEARTBEAT_INTERVAL_MS)
    parser.add_argument("--retention-check-interval-ms", type=int, default=RETENTION_CHECK_INTERVAL_MS)
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--metrics-addr", default="127.0.0.1")
    parser.add_argument("--kafka-listen", default=None, help="HOST:PORT: answer Kafka's protocol there")
    parser.add_argument("--kafka-advertise", default=None, help="HOST:PORT Kafka clients reach (default: --kafka-listen)")
    args = parser.parse_args(argv)
    run_node(args, node_class)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the kernel at once.

    Every write transaction makes LMDB allocate (and at commit free) a copy of each page it writes: a
    batch's worth of megabytes per turn. By default glibc returns that to the kernel when it is freed, so
    the next turn faults every page in again. Measured over 4 M records of 100 bytes: 130-150 k page faults
    in the node without this, 12 k with it, and 12 % less system time; peak RSS +5 MB. The memory kept is
    bounded by the largest turn, so resident memory stays flat. Returns whether it took effect (False
    where the C library is not glibc: nothing to do).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return all((mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES),
                mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES),
                mallopt(M_TOP_PAD, MALLOC_TOP_PAD_BYTES)))


def run_node(args, node_class: type = Node) -> None:
    logging.basicConfig(level=os.environ.get("BUS_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    keep_freed_memory()
    try:
        node = node_class(args.node_id, args.data_dir, args.bind, args.coordinator, advertise=args.advertise,
                          sync=args.sync, map_size_max_bytes=args.map_size_max,
                          heartbeat_interval_ms=args.heartbeat_interval_ms,
                          retention_check_interval_ms=args.retention_check_interval_ms,
                          metrics_port=getattr(args, "metrics_port", None),
                          metrics_addr=getattr(args, "metrics_addr", "127.0.0.1"),
                          kafka_listen=getattr(args, "kafka_listen", None),
                          kafka_advertise=getattr(args, "kafka_advertise", None))
    except (BusError, zmq.ZMQError, OSError) as exc:
        # One clear line (e.g. another node's data directory), not a traceback.
        log.error("node %d cannot start: %s", args.node_id, exc)
        raise SystemExit(1) from None
    install_stop_handlers(node.stop)
    node.serve_forever()
    if node.refused is not None:
        log.error("node %d stopped: the coordinator refused it: %s", args.node_id, node.refused)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
