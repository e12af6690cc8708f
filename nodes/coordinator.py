"""The coordinator: the shell around the cluster's controller (nodes/controller.py) and the consumer
groups (nodes/group_service.py over nodes/groups.py; Kafka's classic groups, nodes/kafka/group_apis.py
over nodes/kafka/classic_group.py, beside them).

One process, one ROUTER socket, one thread. It decides nothing itself: each request goes to the pure
core that owns it, whose records are written to the LMDB ``MetaStore`` BEFORE the reply leaves (persist
before the reply), so a restart loses nothing: topics and placement, the producer-id counter, groups and
committed offsets. Node liveness is soft state rebuilt from heartbeats. If writing fails, the exception
escapes and stops the coordinator: memory would then be ahead of the disk, and a restart (which restores
from the disk) is the only honest way on. The persisted keys are listed in each core's docstring.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import zmq

from bus import wire
from bus.clock import LOOP_WAIT_MS_MAX, monotonic_ms
from bus.errors import BusError, InvalidRequest
from store import MetaStore

from . import kafka
from .controller import COORDINATOR_BROKER_ID, KEY_PREFIXES, NO_LEADER, NODE_SESSION_TIMEOUT_MS, Controller, Outcome
from .group_service import GroupService
from .metrics import CoordinatorMetrics, serve
from .server import MALFORMED, Request, RouterServer, as_invalid, install_stop_handlers

log = logging.getLogger("bus.coordinator")


class Coordinator:
    group_service_class = GroupService  # a subclass may run another (the fault harness's builds do)

    def __init__(self, data_dir: str, bind: str, *, node_session_timeout_ms: int = NODE_SESSION_TIMEOUT_MS,
                 metrics_port: int | None = None, metrics_addr: str = "127.0.0.1", kafka_listen: str | None = None,
                 kafka_advertise: str | None = None):
        self.metrics = CoordinatorMetrics(self)
        self.store = MetaStore(data_dir)
        self.context = zmq.Context()
        self.context.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
        self.server = RouterServer(self.context, bind, role="coordinator", observe=self.metrics.answered)
        self.stopping = False
        stored = [item for prefix in KEY_PREFIXES for item in self.store.items(prefix)]
        # A new cluster gets its id here, for good: a node that joined another cluster (e.g. this
        # coordinator's data directory was lost and started afresh) refuses to take placement from it
        # rather than drop its logs.
        self.controller, records = Controller.restore(stored, uuid.uuid4().hex, monotonic_ms(),
                                                      node_session_timeout_ms=node_session_timeout_ms)
        self.store.apply(list(records))
        self.node_identities: dict[int, bytes] = {}  # node id -> its DEALER's identity, to push placement to
        # (topic, partition) -> its high watermark as its leader last reported it in a heartbeat: soft state,
        # for consumer lag in the metrics
        self.end_offsets: dict[tuple, int] = {}
        # node id -> its Kafka listener's address, from its heartbeats: soft state, told to every node in
        # heartbeat replies (their Kafka Metadata answers list each other) and listed by this one's.
        self.kafka_addresses: dict[int, str] = {}
        self.groups = self.group_service_class(self.store, lambda: self.controller.topics, metrics=self.metrics)
        self.handlers = {
            wire.METADATA: lambda r: self.controller.metadata(r.args.get("topics"), r.args.get("strict"),
                                                              r.received_ms),
            wire.CREATE_TOPIC: self._create_topic,
            wire.DELETE_TOPIC: self._delete_topic,
            wire.NODE_HEARTBEAT: self._node_heartbeat,
            wire.ALTER_PARTITION: lambda r: self._persisted(self.controller.alter_partition(
                r.args["node_id"], r.args.get("instance"), r.args["topic"], r.args["partition"],
                r.args["leader_epoch"], r.args["partition_epoch"], r.args["isr"], r.args.get("incarnations"),
                r.received_ms)),
            wire.ELECT_LEADERS: self._elect_leaders,
            wire.INIT_PRODUCER_ID: lambda r: self._persisted(self.controller.init_producer_id(r.received_ms)),
            wire.PING: lambda r: {"coordinator": True},
        }
        for op, handler in self.groups.handlers().items():
            self.handlers[op] = lambda r, handler=handler: handler(r.args, r.received_ms)
        # Kafka's protocol (docs/kafka.md): bootstrap, ApiVersions and Metadata listing every live node and
        # this coordinator (the group coordinator of every Kafka group, as broker COORDINATOR_BROKER_ID).
        self.kafka_groups = None
        self.kafka = self.kafka_advertise = None
        if kafka_listen:
            self.groups.classic = kafka.ClassicGroups(uuid.uuid4().hex[:12])
            self.kafka_groups = kafka.GroupApis(lambda: self.kafka_advertise, classic=self.groups.classic,
                                                offsets=self.groups, topics=lambda: self.controller.topics,
                                                cluster_id=lambda: self.controller.cluster_id)
            self.kafka = kafka.listen(
                kafka_listen, cluster_id=lambda: self.controller.cluster_id, brokers=self._kafka_brokers,
                topics=lambda: self.controller.topics, handlers=None, coordinator=self._ask_self,
                apis=self.kafka_groups.apis(), frame_bytes_max=16 << 20, node_id=COORDINATOR_BROKER_ID)
            self.kafka_advertise = kafka_advertise or self.kafka.address
        serve(self.metrics.registry, metrics_port, metrics_addr)

    def _ask_self(self, op: str, args: dict, answer) -> None:
        """A Kafka client's request for the coordinator's own handlers (what a node forwards to it over
        ZeroMQ): ``answer(result, (bus error code, message) or None)`` at once."""
        now_s = time.monotonic()
        try:
            result = self.handlers[op](Request(b"", op, None, args, [], int(now_s * 1000), now_s))
        except BusError as exc:
            answer(None, (exc.code, exc.message))
            return
        except MALFORMED as exc:
            error = as_invalid(exc)
            answer(None, (error.code, error.message))
            return
        answer(result, None)

    def _kafka_brokers(self) -> dict:
        """The live nodes' Kafka listeners and this coordinator's: broker id -> HOST:PORT."""
        out = {} if self.kafka_advertise is None else {COORDINATOR_BROKER_ID: self.kafka_advertise}
        for node_id, address in self.kafka_addresses.items():
            node = self.controller.nodes.get(node_id)
            if node is not None and self.controller.alive(node):
                out[node_id] = address
        return out

    # -- the loop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping = True

    def serve_forever(self) -> None:
        log.info("coordinator serving on %s", self.server.bind)
        try:
            while not self.stopping:
                poller = zmq.Poller()
                poller.register(self.server.socket, zmq.POLLIN)
                if self.kafka is not None:
                    self.kafka.register(poller)  # its connections come and go: registered each turn
                timeout_ms = LOOP_WAIT_MS_MAX
                deadlines_ms = [self.groups.next_deadline_ms(), self.controller.next_deadline_ms()]
                if self.kafka_groups is not None:
                    deadlines_ms.append(self.kafka_groups.next_deadline_ms())
                for deadline_ms in deadlines_ms:
                    if deadline_ms is not None:
                        timeout_ms = max(0, min(timeout_ms, deadline_ms - monotonic_ms()))
                ready = dict(poller.poll(timeout_ms))
                if self.server.socket in ready:
                    self.server.serve_turn(self.handlers)
                if self.kafka is not None:
                    self.kafka.serve(ready)
                self._persisted(self.controller.tick(monotonic_ms()))
                self.groups.tick(monotonic_ms())
                if self.kafka_groups is not None:
                    self.kafka_groups.tick(monotonic_ms())
                self.groups.refresh_snapshot(monotonic_ms())
        finally:
            self.close()

    # -- handlers ------------------------------------------------------------------------------------

    def _persisted(self, outcome: Outcome):
        """Write what the controller decided, then tell the nodes if the placement changed, then hand back
        its reply: no node and no client hears of a change before it is on disk."""
        self.store.apply(list(outcome.records))
        if outcome.notify:
            self._push_placement()
        return outcome.reply

    def _push_placement(self) -> None:
        """Send the placement down every live node's DEALER (as a reply with no request id), so a new leader
        learns of its election at once rather than at its next heartbeat."""
        frames = wire.encode_reply(None, {**self.controller.placement(), "kafka_nodes": self._kafka_brokers()})
        for node_id, identity in self.node_identities.items():
            node = self.controller.nodes.get(node_id)
            if node is not None and self.controller.alive(node):
                try:
                    self.server.socket.send_multipart([identity, *frames], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # gone or not reading: its next heartbeat brings the placement

    def _node_heartbeat(self, request: Request):
        args = request.args
        reply = self._persisted(self.controller.node_heartbeat(
            args["node_id"], args["address"], args.get("instance"), args.get("dir_id"), args.get("version"),
            request.received_ms))
        self.node_identities[args["node_id"]] = request.identity
        for topic, partition, high_watermark in args.get("ends") or ():
            self.end_offsets[(topic, partition)] = high_watermark
        kafka_address = args.get("kafka_address")
        if isinstance(kafka_address, str) and kafka_address:
            self.kafka_addresses[args["node_id"]] = kafka_address
        else:
            self.kafka_addresses.pop(args["node_id"], None)
        return {**reply, "kafka_nodes": self._kafka_brokers()}

    def _create_topic(self, request: Request):
        args = request.args
        reply = self._persisted(self.controller.create_topic(
            args["name"], args.get("partitions", 1), args.get("retention_ms"), args.get("retention_bytes"),
            request.received_ms, replication_factor=args.get("replication_factor"),
            min_insync_replicas=args.get("min_insync_replicas")))
        self.groups.metadata_changed(request.received_ms)
        return reply

    def _elect_leaders(self, request: Request):
        """The operator's unclean election (``bus topic elect --unclean``) for leaderless partitions."""
        args = request.args
        if args.get("unclean") is not True:
            raise InvalidRequest("only unclean elections are asked for: a clean one happens by itself")
        topic = args["topic"]
        partitions = args.get("partitions")
        if partitions is None:
            partitions = [i for i, p in enumerate(self.controller.topics.get(topic, {"partitions": []})["partitions"])
                          if p["leader"] == NO_LEADER]
        elected = []
        for partition in partitions:
            state = self._persisted(self.controller.elect_unclean(topic, partition, request.received_ms))
            elected.append([partition, state["leader"]])
        return {"elected": elected}

    def _delete_topic(self, request: Request):
        reply = self._persisted(self.controller.delete_topic(request.args["name"], request.received_ms))
        for tp in [tp for tp in self.end_offsets if tp[0] == request.args["name"]]:
            del self.end_offsets[tp]
        self.groups.metadata_changed(request.received_ms)
        return reply

    def close(self) -> None:
        if self.kafka is not None:
            self.kafka.close()
        self.server.close()
        self.context.term()
        self.store.close()


def run_coordinator(data_dir: str, bind: str, coordinator_class: type = Coordinator, *,
                    metrics_port: int | None = None, metrics_addr: str = "127.0.0.1",
                    kafka_listen: str | None = None, kafka_advertise: str | None = None) -> None:
    logging.basicConfig(level=os.environ.get("BUS_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        coordinator = coordinator_class(data_dir, bind, metrics_port=metrics_port, metrics_addr=metrics_addr,
                                        kafka_listen=kafka_listen, kafka_advertise=kafka_advertise)
    except (BusError, zmq.ZMQError, OSError) as exc:
        log.error("coordinator cannot start: %s", exc)  # one clear line, e.g. its data directory is in use
        raise SystemExit(1) from None
    install_stop_handlers(coordinator.stop)
    coordinator.serve_forever()


def main(argv=None, coordinator_class: type = Coordinator) -> None:
    """``python -m nodes.coordinator``. ``coordinator_class``: a subclass to run instead (the fault harness's)."""
    import argparse

    parser = argparse.ArgumentParser(description="the coordinator of the bus")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--metrics-addr", default="127.0.0.1")
    parser.add_argument("--kafka-listen", default=None, help="HOST:PORT: answer Kafka's protocol there (bootstrap)")
    parser.add_argument("--kafka-advertise", default=None, help="HOST:PORT Kafka clients reach it at, as the "
                        "group coordinator (default: --kafka-listen)")
    args = parser.parse_args(argv)
    run_coordinator(args.data_dir, args.bind, coordinator_class, metrics_port=args.metrics_port,
                    metrics_addr=args.metrics_addr, kafka_listen=args.kafka_listen,
                    kafka_advertise=args.kafka_advertise)


if __name__ == "__main__":
    main()
