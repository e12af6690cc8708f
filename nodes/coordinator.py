"""The coordinator: the cluster's metadata (nodes, topics, placement), producer ids, and consumer groups.

One process, one ROUTER socket, one thread. Everything it acknowledges is in its LMDB ``MetaStore``
first (persist before the reply), so a restart loses nothing: topics and placement, the producer-id
counter, groups and committed offsets. Node liveness is soft state rebuilt from heartbeats.

Persisted keys: ``topic:<name>`` -> {id, partitions: [owner node id, ...], retention_ms, retention_bytes},
``node:<id>`` -> {address}, ``cluster_id``, ``counter:topic_id``, ``counter:producer_id``, ``counter:placement_version``,
and the group records under ``group:`` keys (see nodes/groups.py).
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid

import zmq

from bus import wire
from bus.errors import (BusError, InvalidRequest, NoNodesAvailable, NodeIdentityMismatch, TopicExists,
                        UnknownTopic)
from store import MetaStore
from store.log_store import PARTITIONS_MAX as NODE_PARTITIONS_MAX
from store.meta_store import DELETE, PUT

from .placement import node_load, place
from .server import MALFORMED, RouterServer, as_invalid, install_stop_handlers

log = logging.getLogger("bus.coordinator")

NODE_SESSION_TIMEOUT_MS = 3_000
LOOP_WAIT_MS_MAX = 100
NODE_ID_MAX = (1 << 31) - 1
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
PARTITIONS_MAX = 10_000


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class NodeInfo:
    __slots__ = ("node_id", "address", "instance", "last_heartbeat_ms")

    def __init__(self, node_id, address, instance=None, last_heartbeat_ms=None):
        self.node_id, self.address, self.instance, self.last_heartbeat_ms = (
            node_id, address, instance, last_heartbeat_ms)


class Coordinator:
    def __init__(self, data_dir: str, bind: str, *, node_session_timeout_ms: int = NODE_SESSION_TIMEOUT_MS):
        self.store = MetaStore(data_dir)
        self.context = zmq.Context()
        self.context.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
        self.server = RouterServer(self.context, bind)
        self.node_session_timeout_ms = node_session_timeout_ms
        self.stopping = False
        self.topics: dict[str, dict] = {k[len(b"topic:"):].decode(): v for k, v in self.store.items(b"topic:")}
        self.nodes: dict[int, NodeInfo] = {
            int(k[len(b"node:"):]): NodeInfo(int(k[len(b"node:"):]), v["address"])
            for k, v in self.store.items(b"node:")}
        self.version = self.store.get(b"counter:placement_version", 0)
        # Who this cluster is, for good: a node that joined another cluster (e.g. this coordinator's data
        # directory was lost and started afresh) refuses to take placement from it rather than drop its logs.
        self.cluster_id = self.store.get(b"cluster_id")
        if self.cluster_id is None:
            self.cluster_id = uuid.uuid4().hex
            self.store.apply([(PUT, b"cluster_id", self.cluster_id)])
        self.handlers = {
            wire.METADATA: self._metadata,
            wire.CREATE_TOPIC: self._create_topic,
            wire.DELETE_TOPIC: self._delete_topic,
            wire.NODE_HEARTBEAT: self._node_heartbeat,
            wire.INIT_PRODUCER_ID: self._init_producer_id,
            wire.PING: lambda args, now: {"coordinator": True},
        }
        from .group_service import GroupService  # groups live beside, sharing the store and the metadata

        self.groups = GroupService(self.store, lambda: self.topics)
        self.handlers.update(self.groups.handlers())

    # -- the loop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping = True

    def serve_forever(self) -> None:
        log.info("coordinator serving on %s", self.server.bind)
        poller = zmq.Poller()
        poller.register(self.server.socket, zmq.POLLIN)
        try:
            while not self.stopping:
                timeout_ms = LOOP_WAIT_MS_MAX
                deadline_ms = self.groups.next_deadline_ms()
                if deadline_ms is not None:
                    timeout_ms = max(0, min(timeout_ms, deadline_ms - monotonic_ms()))
                if poller.poll(timeout_ms):
                    for frames in self.server.recv_batch():
                        self._handle(frames)
                self.groups.tick(monotonic_ms())
        finally:
            self.close()

    def _handle(self, frames) -> None:
        request = self.server.decode(frames)
        if request is None:
            return
        identity, op, request_id, args, bulk = request
        try:
            handler = self.handlers.get(op)
            if handler is None:
                raise InvalidRequest(f"unknown op {op!r} for the coordinator")
            if bulk:
                raise InvalidRequest(f"{op} takes no bulk frames, got {len(bulk)}")
            if not isinstance(args, dict):
                raise InvalidRequest("args must be a map")
            result = handler(args, monotonic_ms())
        except BusError as exc:
            self.server.reply(identity, request_id, error=exc)
        except MALFORMED as exc:
            self.server.reply(identity, request_id, error=as_invalid(exc))
        else:
            self.server.reply(identity, request_id, result)

    # -- metadata ----------------------------------------------------------------------------------

    def _alive(self, node: NodeInfo, now_ms: int) -> bool:
        return node.last_heartbeat_ms is not None and now_ms - node.last_heartbeat_ms <= self.node_session_timeout_ms

    def _metadata(self, args, now_ms):
        wanted = args.get("topics")
        topics = self.topics if wanted is None else {t: self.topics[t] for t in wanted if t in self.topics}
        if wanted is not None and args.get("strict"):
            missing = [t for t in wanted if t not in self.topics]
            if missing:
                raise UnknownTopic(f"unknown topic {missing[0]!r}; create it with `bus topic create {missing[0]}`")
        nodes = {n.node_id: {"address": n.address, "alive": self._alive(n, now_ms)} for n in self.nodes.values()}
        return {"version": self.version, "nodes": nodes, "topics": topics}

    def _bump_version(self) -> list:
        self.version += 1
        return [(PUT, b"counter:placement_version", self.version)]

    def _create_topic(self, args, now_ms):
        name = args["name"]
        partitions = args.get("partitions", 1)
        retention_ms = args.get("retention_ms")
        retention_bytes = args.get("retention_bytes")
        if not isinstance(name, str) or not TOPIC_NAME.fullmatch(name):
            raise InvalidRequest(f"topic name {name!r} must be 1-249 characters of A-Z a-z 0-9 . _ -")
        if not isinstance(partitions, int) or not 1 <= partitions <= PARTITIONS_MAX:
            raise InvalidRequest(f"partitions must be an integer from 1 to {PARTITIONS_MAX}, not {partitions!r}")
        for label, value in (("retention_ms", retention_ms), ("retention_bytes", retention_bytes)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise InvalidRequest(f"{label} must be a positive integer, not {value!r}")
        if name in self.topics:
            raise TopicExists(f"topic {name!r} already exists")
        live = sorted(n.node_id for n in self.nodes.values() if self._alive(n, now_ms))
        if not live:
            raise NoNodesAvailable("no live nodes to place partitions on; start nodes first (`bus up`)")
        topic_id = self.store.get(b"counter:topic_id", 0) + 1
        load = node_load(self.topics)
        owners = place(partitions, live, load)
        for node_id in set(owners):
            if load.get(node_id, 0) + owners.count(node_id) > NODE_PARTITIONS_MAX:
                raise InvalidRequest(f"{partitions} more partitions would put node {node_id} over its maximum of "
                                     f"{NODE_PARTITIONS_MAX}; add nodes or delete topics")
        topic = {"id": topic_id, "partitions": owners,
                 "retention_ms": retention_ms, "retention_bytes": retention_bytes}
        records = [(PUT, b"counter:topic_id", topic_id), (PUT, b"topic:" + name.encode(), topic)]
        self.store.apply(records + self._bump_version())
        self.topics[name] = topic
        self.groups.metadata_changed(now_ms)
        return {"name": name, **topic}

    def _delete_topic(self, args, now_ms):
        name = args["name"]
        if name not in self.topics:
            raise UnknownTopic(f"unknown topic {name!r}")
        self.store.apply([(DELETE, b"topic:" + name.encode())] + self._bump_version())
        del self.topics[name]
        self.groups.metadata_changed(now_ms)
        return {"name": name}

    def _node_heartbeat(self, args, now_ms):
        node_id, address, instance = args["node_id"], args["address"], args.get("instance")
        # Checked before anything is stored: a bogus id (say int(1e300)) persisted here would end up in
        # every metadata reply.
        if not isinstance(node_id, int) or isinstance(node_id, bool) or not 0 <= node_id <= NODE_ID_MAX:
            raise InvalidRequest(f"node_id must be an integer from 0 to {NODE_ID_MAX}, not {node_id!r}")
        if not isinstance(address, str) or not address:
            raise InvalidRequest(f"address must be a ZeroMQ address string, not {address!r}")
        node = self.nodes.get(node_id)
        if node is not None and node.address != address and node.instance != instance and self._alive(node, now_ms):
            raise NodeIdentityMismatch(
                f"node id {node_id} is already live at {node.address}; give each node its own --node-id")
        if node is None or node.address != address:
            self.store.apply([(PUT, b"node:%d" % node_id, {"address": address})])
            node = self.nodes[node_id] = NodeInfo(node_id, address)
        node.instance, node.last_heartbeat_ms = instance, now_ms
        if args.get("version") == self.version:
            return {"version": self.version, "topics": None, "cluster_id": self.cluster_id}
        return {"version": self.version, "topics": self.topics, "cluster_id": self.cluster_id}

    def _init_producer_id(self, args, now_ms):
        producer_id = self.store.get(b"counter:producer_id", 0) + 1
        self.store.apply([(PUT, b"counter:producer_id", producer_id)])
        return {"producer_id": producer_id, "epoch": 0}

    def close(self) -> None:
        self.server.close()
        self.context.term()
        self.store.close()


def run_coordinator(data_dir: str, bind: str) -> None:
    logging.basicConfig(level=os.environ.get("BUS_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        coordinator = Coordinator(data_dir, bind)
    except (BusError, zmq.ZMQError) as exc:
        log.error("coordinator cannot start: %s", exc)  # one clear line, e.g. its data directory is in use
        raise SystemExit(1) from None
    install_stop_handlers(coordinator.stop)
    coordinator.serve_forever()


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="the coordinator of the bus")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--bind", required=True)
    args = parser.parse_args(argv)
    run_coordinator(args.data_dir, args.bind)


if __name__ == "__main__":
    main()
