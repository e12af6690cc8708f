"""The partition-owner node: one process serving produce, fetch and list-offsets for the partitions it owns.

It owns: a ROUTER socket for clients, a DEALER to the coordinator (registration and heartbeats, which
bring back the placement), and a ``LogStore`` (one LMDB environment). One thread, one loop:

1. wait for requests, the next long-poll deadline, or the next heartbeat;
2. drain every request waiting; produces of that turn are appended in ONE transaction, synced once
   (group commit), and only then acknowledged;
3. answer parked long-poll fetches whose partitions grew, or whose ``max_wait_ms`` ran out.

It never unpacks a record: batches are stored and served as the producer packed them.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import zmq

from bus import wire
from bus.clock import LOOP_WAIT_MS_MAX, monotonic_ms, now_ms
from bus.errors import (BusError, NotOwner, OffsetOutOfRange, RecordTooLarge, UnknownPartition,
                        UnknownTopic, InvalidRequest)
from store import LogStore

from .server import LATER, Reply, Request, RouterServer, install_stop_handlers

log = logging.getLogger("bus.node")

HEARTBEAT_INTERVAL_MS = 300
PLACEMENT_ASK_INTERVAL_MS = 50  # at most this often, a request for an unknown topic brings the heartbeat forward
RETENTION_CHECK_INTERVAL_MS = 1_000
BATCH_BYTES_MAX = 16 << 20  # the largest batch a node stores; producers default to 1 MiB
MESSAGE_BYTES_MAX = 64 << 20  # zmq refuses larger messages outright (a rogue client cannot OOM us)
FETCH_WAIT_MS_MAX = 60_000
MAP_SIZE_INITIAL_BYTES = 1 << 28  # the LMDB map starts here (or at --map-size-max if lower) and doubles
# keep_freed_memory(): allocations up to this size come from the heap, not their own mapping ...
MALLOC_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc accepts no more
# ... and freed heap memory is given back to the kernel only beyond this much, or this much is padded on.
MALLOC_TRIM_THRESHOLD_BYTES = 512 << 20
MALLOC_TOP_PAD_BYTES = 64 << 20


class ParkedFetch:
    """A long-poll fetch waiting for ``min_bytes`` to arrive or its deadline to pass."""

    __slots__ = ("identity", "request_id", "parts", "min_bytes", "max_bytes", "deadline_s", "logs")

    def __init__(self, identity, request_id, parts, min_bytes, max_bytes, deadline_s, logs):
        self.identity, self.request_id, self.parts = identity, request_id, parts
        self.min_bytes, self.max_bytes, self.deadline_s, self.logs = min_bytes, max_bytes, deadline_s, logs


class Node:
    store_class = LogStore  # a subclass may run on a subclass of the store (the fault harness's builds do)

    def __init__(self, node_id: int, data_dir: str, bind: str, coordinator: str, *, advertise: str | None = None,
                 sync: str = "always", map_size_max_bytes: int = 1 << 40,
                 heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS,
                 retention_check_interval_ms: int = RETENTION_CHECK_INTERVAL_MS):
        self.node_id = node_id
        self.store = self.store_class(data_dir, sync=sync, map_size_bytes=min(MAP_SIZE_INITIAL_BYTES, map_size_max_bytes),
                              map_size_max_bytes=map_size_max_bytes)
        self.store.claim_identity(f"node-{node_id}")
        self.context = zmq.Context()
        self.context.setsockopt(zmq.MAXMSGSIZE, MESSAGE_BYTES_MAX)
        self.server = RouterServer(self.context, bind, role="node")
        self.advertise = advertise or self.server.bind
        self.coordinator = self.context.socket(zmq.DEALER)
        self.coordinator.setsockopt(zmq.LINGER, 0)
        self.coordinator.setsockopt(zmq.IMMEDIATE, 1)  # don't queue heartbeats for a coordinator that is down
        self.coordinator.setsockopt(zmq.SNDHWM, 4)
        self.coordinator.connect(coordinator)
        self.instance = uuid.uuid4().hex  # tells the coordinator this is a new incarnation
        self.heartbeat_interval_s = heartbeat_interval_ms / 1000
        self.retention_interval_s = retention_check_interval_ms / 1000
        self.next_heartbeat_s = 0.0
        self.placement_ask_s = 0.0  # no early heartbeat for an unknown topic before this
        self.next_retention_s = time.monotonic() + self.retention_interval_s
        self.stopping = False
        self.refused = None  # why the coordinator refused this node, which then stops (exit status 1)
        self.request_seq = 0
        # The placement as last heard from the coordinator, cached on disk so a restarted node serves its
        # partitions even while the coordinator is down.
        self.placement_version = -1
        self.topics: dict[str, dict] = {}
        self.owned: dict[tuple[str, int], object] = {}  # (topic, partition) -> PartitionLog
        self.cluster_id = self.store.get_meta(b"n:cluster_id")  # the cluster whose coordinator this node follows
        cached = self.store.get_meta(b"n:placement")
        if cached is not None:
            self._apply_placement(cached["version"], cached["topics"], persist=False)
        self.parked: dict[int, ParkedFetch] = {}
        self.parked_by_log: dict[str, set[int]] = {}
        self.parked_seq = 0
        self.handlers = {wire.PRODUCE: self._produce, wire.FETCH: self._fetch, wire.LIST_OFFSETS: self._list_offsets,
                         wire.PING: lambda request: {"node_id": self.node_id}}
        self.produces: list = []  # this turn's produce requests, committed together at its end

    # -- placement ---------------------------------------------------------------------------------

    def _apply_placement(self, version: int, topics: dict, persist: bool = True) -> None:
        mine = {}  # (topic, partition) -> log name, for the partitions this node owns
        for name, topic in topics.items():
            for partition, owner in enumerate(topic["partitions"]):
                if owner == self.node_id:
                    mine[(name, partition)] = f"{topic['id']}/{partition}"
        live_names = set(mine.values())
        # Drop before opening: LMDB holds a fixed number of partition databases (store.log_store.PARTITIONS_MAX).
        for stale in [name for name in self.store.logs if name not in live_names]:
            # Its topic was deleted (ids are never reused, so a re-created topic gets fresh logs).
            self._unpark_log(stale)
            self.store.drop_partition(stale)
        owned = {key: self.store.open_partition(log_name) for key, log_name in mine.items()}
        self.topics, self.owned, self.placement_version = topics, owned, version
        if persist:
            self.store.put_meta(b"n:placement", {"version": version, "topics": topics})

    def _log_for(self, topic, partition):
        plog = self.owned.get((topic, partition))
        if plog is not None:
            return plog
        meta = self.topics.get(topic)
        if meta is None:
            self._ask_placement_soon()
            raise UnknownTopic(f"topic {topic!r} is not known to node {self.node_id}")
        if not isinstance(partition, int) or not 0 <= partition < len(meta["partitions"]):
            raise UnknownPartition(f"topic {topic!r} has no partition {partition!r}")
        raise NotOwner(f"node {self.node_id} does not own {topic}/{partition}")

    def _ask_placement_soon(self) -> None:
        """A client named a topic this node has not heard of: it may have just been created, so heartbeat now
        (at most every PLACEMENT_ASK_INTERVAL_MS) rather than at the next interval; the reply brings it."""
        now_s = time.monotonic()
        if now_s >= self.placement_ask_s:
            self.placement_ask_s = now_s + PLACEMENT_ASK_INTERVAL_MS / 1000
            self.next_heartbeat_s = min(self.next_heartbeat_s, now_s)

    # -- the loop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping = True

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.server.socket, zmq.POLLIN)
        poller.register(self.coordinator, zmq.POLLIN)
        log.info("node %d serving on %s (advertised %s)", self.node_id, self.server.bind, self.advertise)
        try:
            while not self.stopping:
                ready = dict(poller.poll(self._poll_timeout_ms()))
                if self.coordinator in ready:
                    self._drain_coordinator()
                if self.server.socket in ready:
                    self._turn()
                self._timers()
        finally:
            self.close()

    def _poll_timeout_ms(self) -> int:
        now_s = time.monotonic()
        wake_s = min(self.next_heartbeat_s, now_s + LOOP_WAIT_MS_MAX / 1000)
        if self.parked:
            wake_s = min(wake_s, min(p.deadline_s for p in self.parked.values()))
        return max(0, int((wake_s - now_s) * 1000) + 1)

    def _timers(self) -> None:
        now_s = time.monotonic()
        if self.parked:
            for key in [k for k, p in self.parked.items() if p.deadline_s <= now_s]:
                self._answer_parked(key)
        if now_s >= self.next_heartbeat_s:
            self._send_heartbeat()
            self.next_heartbeat_s = now_s + self.heartbeat_interval_s
        if now_s >= self.next_retention_s:
            self._retention()
            self.next_retention_s = now_s + self.retention_interval_s
        self.store.flush_due(monotonic_ms())

    def _turn(self) -> None:
        """Handle one turn's requests; its produces share one transaction and one sync."""
        self.server.serve_turn(self.handlers, bulk_ops=frozenset((wire.PRODUCE,)))
        if self.produces:
            produces, self.produces = self.produces, []
            self._commit(produces)

    # -- produce -----------------------------------------------------------------------------------

    def _produce(self, request: Request):
        """Check a produce and hold it for this turn's group commit (``_commit`` replies)."""
        parts, bulk = request.args["parts"], request.bulk
        acks = request.args.get("acks", 1)
        if not isinstance(parts, list) or len(parts) != len(bulk):
            raise InvalidRequest(f"produce names {len(parts) if isinstance(parts, list) else '?'} "
                                 f"partitions but carries {len(bulk)} batches")
        results, items = [None] * len(parts), []
        for index, ((topic, partition), buf) in enumerate(zip(parts, bulk)):
            try:
                plog = self._log_for(topic, partition)
                if len(buf) > BATCH_BYTES_MAX:
                    raise RecordTooLarge(f"batch of {len(buf)} bytes exceeds the node's {BATCH_BYTES_MAX}")
                items.append((index, plog, buf))
            except BusError as exc:
                results[index] = [exc.code, exc.message, -1, False, -1]
        self.produces.append((request.identity, request.request_id, acks, results, items))
        return LATER

    def _commit(self, produces: list) -> None:
        flat = [(plog, buf) for *_, items in produces for _, plog, buf in items]
        outcomes = iter(self.store.append(flat) if flat else ())
        grown = set()
        for identity, request_id, acks, results, items in produces:
            for index, plog, _ in items:
                outcome = next(outcomes)
                if isinstance(outcome, BusError):
                    results[index] = [outcome.code, outcome.message, -1, False, -1]
                else:
                    base_offset, append_ts_ms, duplicate = outcome
                    results[index] = [None, None, base_offset, duplicate, append_ts_ms]
                    grown.add(plog.name)
            if acks != 0:
                self.server.reply(identity, request_id, {"parts": results})
        for name in grown:
            for key in list(self.parked_by_log.get(name, ())):
                self._answer_parked(key, only_if_ready=True)

    # -- fetch -------------------------------------------------------------------------------------

    def _fetch(self, request: Request):
        args = request.args
        parts = [(topic, partition, int(offset), int(part_bytes_max))
                 for topic, partition, offset, part_bytes_max in args["parts"]]
        max_wait_ms = min(int(args.get("max_wait_ms", 0)), FETCH_WAIT_MS_MAX)
        min_bytes = int(args.get("min_bytes", 1))
        max_bytes = int(args.get("max_bytes", 50 << 20))
        result, bulk, total = self._read_parts(parts, max_bytes)
        if total >= min_bytes or max_wait_ms <= 0 or any(r[2] for r in result):
            return Reply({"parts": result}, bulk)
        logs = [self.owned[(t, p)].name for t, p, _, _ in parts]
        self.parked_seq += 1
        key = self.parked_seq
        self.parked[key] = ParkedFetch(request.identity, request.request_id, parts, min_bytes, max_bytes,
                                       time.monotonic() + max_wait_ms / 1000, logs)
        for name in logs:
            self.parked_by_log.setdefault(name, set()).add(key)
        return LATER

    def _read_parts(self, parts, max_bytes):
        result, bulk, total = [], [], 0
        for topic, partition, offset, part_bytes_max in parts:
            try:
                plog = self._log_for(topic, partition)
                data, next_offset = self.store.read(plog, offset, max(1, min(part_bytes_max, max_bytes - total)))
                result.append([topic, partition, None, None, plog.start_offset, plog.next_offset, next_offset])
                bulk.append(data)
                total += len(data)
            except BusError as exc:
                plog = self.owned.get((topic, partition))
                start, end = (plog.start_offset, plog.next_offset) if plog is not None else (-1, -1)
                if plog is not None and not isinstance(exc, OffsetOutOfRange):
                    log.error("serving %s/%s failed: %s", topic, partition, exc)  # corrupt: loud, never served
                result.append([topic, partition, exc.code, exc.message, start, end, offset])
                bulk.append(b"")
        return result, bulk, total

    def _answer_parked(self, key: int, only_if_ready: bool = False) -> None:
        parked = self.parked[key]
        result, bulk, total = self._read_parts(parked.parts, parked.max_bytes)
        if only_if_ready and total < parked.min_bytes and not any(r[2] for r in result):
            return
        del self.parked[key]
        for name in parked.logs:
            waiting = self.parked_by_log.get(name)
            if waiting is not None:
                waiting.discard(key)
                if not waiting:
                    del self.parked_by_log[name]
        self.server.reply(parked.identity, parked.request_id, {"parts": result}, bulk)

    def _unpark_log(self, name: str) -> None:
        for key in list(self.parked_by_log.get(name, ())):
            self._answer_parked(key)

    # -- list offsets --------------------------------------------------------------------------------

    def _list_offsets(self, request: Request) -> dict:
        out = []
        for topic, partition, spec in request.args["parts"]:
            try:
                plog = self._log_for(topic, partition)
                if spec == "earliest":
                    offset = plog.start_offset
                elif spec == "latest":
                    offset = plog.next_offset
                elif isinstance(spec, int):
                    offset = max(self.store.offset_for_time(plog, spec), plog.start_offset)
                else:
                    raise InvalidRequest(f"offset spec must be 'earliest', 'latest' or a timestamp, not {spec!r}")
                out.append([None, None, offset, plog.start_offset, plog.next_offset])
            except BusError as exc:
                out.append([exc.code, exc.message, -1, -1, -1])
        return {"parts": out}

    # -- coordinator link ----------------------------------------------------------------------------

    def _send_heartbeat(self) -> None:
        self.request_seq += 1
        args = {"node_id": self.node_id, "address": self.advertise, "instance": self.instance,
                "version": self.placement_version}
        try:
            self.coordinator.send_multipart(wire.encode_request(wire.NODE_HEARTBEAT, self.request_seq, args),
                                            zmq.NOBLOCK)
        except zmq.Again:
            pass  # the coordinator is unreachable; the next heartbeat tries again

    def _drain_coordinator(self) -> None:
        while True:
            try:
                frames = self.coordinator.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                _, error, result, _ = wire.decode_reply(frames)
            except Exception:
                log.warning("undecodable reply from the coordinator dropped")
                continue
            if error is not None:
                log.error("coordinator refused node %d: %s: %s", self.node_id, *error)
                if error[0] == "NODE_IDENTITY_MISMATCH":
                    self.refused = error[1]
                    self.stopping = True
                continue
            cluster_id = result.get("cluster_id")
            if cluster_id is not None and cluster_id != self.cluster_id:
                if self.cluster_id is not None:
                    # Its placement would drop or, worse, reuse this node's logs (topic ids start again).
                    self.refused = (f"data directory {self.store.path} belongs to cluster {self.cluster_id}, but the "
                                    f"coordinator is cluster {cluster_id} (did it lose its data directory?); "
                                    "nothing was changed")
                    log.error("node %d: %s", self.node_id, self.refused)
                    self.stopping = True
                    return
                self.cluster_id = cluster_id
                self.store.put_meta(b"n:cluster_id", cluster_id)
            if result.get("topics") is not None and result["version"] != self.placement_version:
                self._apply_placement(result["version"], result["topics"])

    # -- retention -----------------------------------------------------------------------------------

    def _retention(self) -> None:
        now = now_ms()
        for (topic, _), plog in self.owned.items():
            meta = self.topics.get(topic, {})
            if meta.get("retention_ms") is not None or meta.get("retention_bytes") is not None:
                self.store.apply_retention(plog, now, meta.get("retention_ms"), meta.get("retention_bytes"))

    def close(self) -> None:
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
                          retention_check_interval_ms=args.retention_check_interval_ms)
    except (BusError, zmq.ZMQError) as exc:
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
