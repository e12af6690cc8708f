"""Kafka's APIs on a bus server: each Kafka request becomes the bus's own request to the same handlers
the ZeroMQ ROUTER serves (``Node._produce``, ``_fetch``, ``_list_offsets``), and their answer becomes
Kafka's response. So a Kafka produce takes part in the node's group commit, an acks=-1 produce waits in
the node's purgatory for the high watermark, and a fetch long-polls there like a bus consumer's.

``KafkaService(cluster_id, brokers, topics, handlers, coordinator, node_id)``: three callables saying what
Metadata tells (the cluster id; node id -> "host:port" of every live node's Kafka listener; the placement,
as the controller keeps it); the node's op handlers, or None on the coordinator, which leads nothing and
answers every partition of a produce, fetch or list-offsets with NOT_LEADER_OR_FOLLOWER; and
``coordinator(op, args, answer)``, which runs a coordinator op (a producer id, a topic created or deleted)
and calls ``answer(result, (bus error code, message) or None)``: at once on the coordinator, once its reply
is in on a node (which asks it over its DEALER). Metadata names the lowest live node as the controller, so
admin clients send CreateTopics and DeleteTopics there, and the node asks the coordinator.

The idempotent producer: InitProducerId hands out the bus's own producer ids (the controller's persisted
counter), and a Kafka batch's producer id, epoch and base sequence become the bus batch's, so the node's
sequence check (``PartitionLog.check_sequence``) recognises Kafka clients' retries as it does the bus's.

Storage (docs/kafka.md, docs/storage.md): a Kafka producer's batches are stored as sent, inside a bus batch
header (``bus.batch.wrap_kafka``), and served to Kafka consumers untouched; only the bus's own batches are
converted for a Kafka consumer (``records.as_kafka``), and only Kafka's for a bus consumer (client-side).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from bus import batch as bus_batch
from bus import wire
from bus.errors import BusError, CorruptRecord

from ..server import LATER, Reply, Request
from . import codec, configs, records
from .listener import parse_host_port

log = logging.getLogger("bus.kafka")

# ListOffsets' timestamps that name a place rather than a time (the bus's specs for them): -1 the high
# watermark, -2 the log start, -3 the record with the largest timestamp (v7, KIP-734), -4 the local log
# start (v8, KIP-405: with no tiered storage the whole log is local, so the log start). Kafka's broker
# takes each whatever the request's version (the clients keep to their versions).
OFFSET_SPECS = {-1: "latest", -2: "earliest", -3: "max_timestamp", -4: "earliest"}
ACKS = {0: 0, 1: 1, -1: "all"}
_TOPIC_ID_NAMESPACE = uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")  # RFC 4122's URL namespace


def _coordinator_code(error) -> int:
    """The Kafka code of a coordinator's (bus code, message); one it did not give in time is retriable."""
    code = error[0] if error else None
    return codec.COORDINATOR_NOT_AVAILABLE if code in ("TIMEOUT", "NODE_UNAVAILABLE") else codec.kafka_code(code)


def _int_config(configs: dict, name: str) -> int | None:
    """A topic config given to CreateTopics as an integer (ValueError if it is not one), or None."""
    value = configs.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"config {name}={value!r} is not an integer") from None


def _gather(count: int, answer) -> Callable[[int, dict], None]:
    """``done(index, row)`` for rows that come in one at a time, in any order (each topic's answer from the
    coordinator): ``answer(rows)`` once all ``count`` are in, at once when there are none."""
    rows: list = [None] * count

    def done(index: int, row: dict) -> None:
        rows[index] = row
        if all(r is not None for r in rows):
            answer(rows)

    if not count:
        answer([])
    return done


def topic_uuid(cluster_id: str | None, topic_id: int) -> uuid.UUID:
    """The Kafka topic id of the bus's topic ``topic_id``: stable, and distinct across clusters and across a
    topic deleted and created again (bus topic ids are never reused)."""
    return uuid.uuid5(_TOPIC_ID_NAMESPACE, f"bus:{cluster_id}:{topic_id}")


class KafkaService:
    def __init__(self, cluster_id, brokers, topics, handlers: dict | None, coordinator, apis: dict | None = None,
                 node_id: int | None = None):
        """``apis``: more api key -> handler(header, body, respond) (the group APIs, group_apis.py);
        ``node_id``: the broker this is (DescribeConfigs answers for its id)."""
        self.cluster_id, self.brokers, self.topics = cluster_id, brokers, topics
        self.node_id = node_id
        self.handlers = handlers
        self.coordinator = coordinator
        self.apis = {codec.API_VERSIONS: self._api_versions, codec.METADATA: self._metadata,
                     codec.PRODUCE: self._produce, codec.FETCH: self._fetch, codec.LIST_OFFSETS: self._list_offsets,
                     codec.INIT_PRODUCER_ID: self._init_producer_id, codec.CREATE_TOPICS: self._create_topics,
                     codec.DELETE_TOPICS: self._delete_topics,
                     codec.OFFSET_FOR_LEADER_EPOCH: self._offset_for_leader_epoch,
                     codec.DESCRIBE_CONFIGS: self._describe_configs, **(apis or {})}

    def handle(self, header: codec.RequestHeader, body, respond) -> None:
        self.apis[header.api_key](header, body, respond)

    # -- ApiVersions, Metadata -------------------------------------------------------------------

    def _api_versions(self, header, body, respond) -> None:
        respond(codec.api_versions_values())

    def _metadata(self, header, body, respond) -> None:
        brokers = []
        for node_id, address in sorted(self.brokers().items()):
            host, port = parse_host_port(address)
            brokers.append({"node_id": node_id, "host": host, "port": port, "rack": None})
        live = {b["node_id"] for b in brokers}
        placement = self.topics()
        cluster_id = self.cluster_id()
        if body.topics is None:
            names = list(placement)
        else:  # v10+ may name a topic by its id alone (a KIP-848 member learns its assignment's topics so)
            by_id = {topic_uuid(cluster_id, t["id"]): n for n, t in placement.items()}
            names = [t.name if t.name is not None else by_id.get(getattr(t, "topic_id", None)) for t in body.topics]
        topics = []
        for name in names:
            topic = placement.get(name)
            if topic is None:
                topics.append({"error_code": codec.UNKNOWN_TOPIC_OR_PARTITION, "name": name, "partitions": []})
                continue
            partitions = []
            for index, state in enumerate(topic["partitions"]):
                leader = state["leader"]
                partitions.append({
                    "error_code": codec.NONE if leader in live else 5,  # LEADER_NOT_AVAILABLE
                    "partition_index": index, "leader_id": leader, "leader_epoch": state["leader_epoch"],
                    "replica_nodes": list(state["replicas"]), "isr_nodes": list(state["isr"]),
                    "offline_replicas": [r for r in state["replicas"] if r not in live]})
            topics.append({"error_code": codec.NONE, "name": name, "topic_id": topic_uuid(cluster_id, topic["id"]),
                           "is_internal": False, "partitions": partitions})
        respond({"throttle_time_ms": 0, "brokers": brokers, "cluster_id": cluster_id,
                 "controller_id": min(live, default=-1), "topics": topics})

    def _init_producer_id(self, header, body, respond) -> None:
        if body.transactional_id is not None:
            respond({"throttle_time_ms": 0, "error_code": codec.TRANSACTIONAL_ID_NOT_FOUND, "producer_id": -1,
                     "producer_epoch": -1})  # no transactions yet
            return

        def answer(result, error) -> None:
            if result is None:
                respond({"throttle_time_ms": 0, "error_code": _coordinator_code(error), "producer_id": -1,
                         "producer_epoch": -1})
            else:
                respond({"throttle_time_ms": 0, "error_code": codec.NONE, "producer_id": result["producer_id"],
                         "producer_epoch": result["epoch"]})

        self.coordinator(wire.INIT_PRODUCER_ID, {}, answer)

    def _describe_configs(self, header, body, respond) -> None:
        topics = self.topics()
        respond({"throttle_time_ms": 0, "results": [
            configs.describe(r.resource_type, r.resource_name, r.configuration_keys, topics, self.node_id,
                             bool(getattr(body, "include_synonyms", False))) for r in body.resources]})

    # -- CreateTopics, DeleteTopics: the coordinator's -------------------------------------------------

    def _create_topics(self, header, body, respond) -> None:
        topics = list(body.topics)
        done = _gather(len(topics), lambda rows: respond({"throttle_time_ms": 0, "topics": rows}))
        for index, topic in enumerate(topics):
            row = {"name": topic.name, "num_partitions": -1, "replication_factor": -1}
            configs = {c.name: c.value for c in topic.configs or ()}
            try:
                if body.validate_only:
                    raise ValueError("validate_only is not supported")
                if topic.assignments:
                    raise ValueError("manual replica assignments are not supported")
                args = {"name": topic.name, "partitions": topic.num_partitions if topic.num_partitions > 0 else 1,
                        "replication_factor": topic.replication_factor if topic.replication_factor > 0 else None,
                        "retention_ms": _int_config(configs, "retention.ms"),
                        "retention_bytes": _int_config(configs, "retention.bytes"),
                        "min_insync_replicas": _int_config(configs, "min.insync.replicas")}
            except ValueError as exc:
                done(index, {**row, "error_code": codec.INVALID_REQUEST if "supported" in str(exc) else
                             codec.INVALID_CONFIG, "error_message": str(exc)})
                continue

            def answer(result, error, index=index, row=row) -> None:
                if result is None:
                    done(index, {**row, "error_code": _coordinator_code(error), "error_message": error[1]})
                else:
                    done(index, {**row, "error_code": codec.NONE, "num_partitions": len(result["partitions"]),
                                 "replication_factor": result["replication_factor"],
                                 "topic_id": topic_uuid(self.cluster_id(), result["id"])})

            self.coordinator(wire.CREATE_TOPIC, args, answer)

    def _delete_topics(self, header, body, respond) -> None:
        names = list(body.topic_names or ())
        done = _gather(len(names), lambda rows: respond({"throttle_time_ms": 0, "responses": rows}))
        for index, name in enumerate(names):
            def answer(result, error, index=index, name=name) -> None:
                done(index, {"name": name, "error_code": codec.NONE if error is None else _coordinator_code(error),
                             "error_message": None if error is None else error[1]})

            self.coordinator(wire.DELETE_TOPIC, {"name": name}, answer)

    # -- KIP-951: where the leader is now, told with NOT_LEADER_OR_FOLLOWER and FENCED_LEADER_EPOCH -----

    def _leader_hints(self, entries: list) -> list:
        """Give each ``(topic, partition, entry)`` whose ``entry`` (a partition of a Produce or Fetch answer)
        says NOT_LEADER_OR_FOLLOWER or FENCED_LEADER_EPOCH the partition's ``current_leader`` {leader id,
        epoch}, as the controller's placement has it (-1, -1 when it has none); return the node endpoints
        of the leaders named, for the answer's ``node_endpoints``. A client of Produce v10+ (Fetch v16+)
        then sends to the new leader at once instead of asking Metadata first (librdkafka 2.4+ does)."""
        placement, named = None, set()
        for topic, partition, entry in entries:
            if entry["error_code"] not in (codec.NOT_LEADER_OR_FOLLOWER, codec.FENCED_LEADER_EPOCH):
                continue
            placement = self.topics() if placement is None else placement
            partitions = placement.get(topic, {}).get("partitions", ())
            state = partitions[partition] if 0 <= partition < len(partitions) else None
            leader, epoch = (-1, -1) if state is None or state["leader"] is None else (state["leader"],
                                                                                       state["leader_epoch"])
            entry["current_leader"] = {"leader_id": leader, "leader_epoch": epoch}
            named.add(leader)
        if not named:
            return []
        endpoints = []
        for node_id, address in sorted(self.brokers().items()):
            if node_id in named:
                host, port = parse_host_port(address)
                endpoints.append({"node_id": node_id, "host": host, "port": port, "rack": None})
        return endpoints

    # -- the bus's handlers, asked as the ROUTER asks them ----------------------------------------

    def _call(self, op: str, args: dict, respond_bus, bulk=()) -> None:
        """Run the bus handler of ``op``; ``respond_bus(result, bulk, error_code)`` gets its answer, now or,
        when the handler holds the request (a produce's group commit, a long poll), later."""
        now_s = time.monotonic()

        def held(result, bulk=(), error=None) -> None:
            respond_bus(result, bulk, None)  # a held answer's errors are in its parts (``error`` is for metrics)

        request = Request(b"", op, None, args, list(bulk), int(now_s * 1000), now_s, held)
        try:
            answer = self.handlers[op](request)
        except BusError as exc:
            respond_bus(None, (), exc)
            return
        if answer is LATER:
            return
        if isinstance(answer, Reply):
            respond_bus(answer.result, answer.bulk, None)
        else:
            respond_bus(answer, (), None)

    # -- Produce -------------------------------------------------------------------------------------

    def _produce(self, header, body, respond) -> None:
        acks = ACKS.get(body.acks)
        rows = []  # (topic, partition, [error code, message] or None), in the request's order
        parts, bulk = [], []
        for topic in body.topic_data:
            for part in topic.partition_data:
                error = None
                if self.handlers is None:
                    error = [codec.NOT_LEADER_OR_FOLLOWER, "the coordinator leads no partition"]
                elif acks is None:
                    error = [21, f"acks must be 0, 1 or -1, not {body.acks}"]  # INVALID_REQUIRED_ACKS
                else:
                    try:
                        batch = bus_batch.wrap_kafka(part.records or b"")
                        parts.append([topic.name, part.index])
                        bulk.append(batch)
                    except CorruptRecord as exc:
                        error = [getattr(exc, "kafka_code", codec.CORRUPT_MESSAGE), exc.message]
                rows.append((topic.name, part.index, error))

        def answered(result, _bulk, error) -> None:
            results = iter(result["parts"] if result is not None else ())
            by_topic: dict[str, list] = {}
            entries = []
            for name, index, row_error in rows:
                base_offset, message = -1, None
                if row_error is not None:
                    code, message = row_error
                elif error is not None:
                    code, message = codec.kafka_code(error.code), error.message
                else:
                    part_code, message, base_offset, _, _ = next(results)
                    code = codec.kafka_code(part_code)
                    base_offset = base_offset if part_code is None else -1
                entry = {"index": index, "error_code": code, "base_offset": base_offset, "log_append_time_ms": -1,
                         "log_start_offset": -1, "error_message": message}
                by_topic.setdefault(name, []).append(entry)
                entries.append((name, index, entry))
            respond({"responses": [{"name": n, "partition_responses": p} for n, p in by_topic.items()],
                     "throttle_time_ms": 0, "node_endpoints": self._leader_hints(entries)})

        args = {"acks": acks, "timeout_ms": max(1, body.timeout_ms), "parts": parts}
        if body.acks == 0:
            # Kafka answers nothing, and neither does the node; even a refusal here goes unanswered.
            if parts:
                self._call(wire.PRODUCE, args, lambda *_: None, bulk)
            respond(None)
        elif not parts:
            answered(None, (), None)
        else:
            self._call(wire.PRODUCE, args, answered, bulk)


    # -- Fetch ---------------------------------------------------------------------------------------

    def _fetch(self, header, body, respond) -> None:
        asked = [(t.topic, p.partition, p.fetch_offset) for t in body.topics for p in t.partitions]
        if self.handlers is None:
            self._fetch_answer(respond, asked, None, (), None, {}, codec.NOT_LEADER_OR_FOLLOWER)
            return
        parts, checks = [], []  # checks: (index in parts, [topic, partition, current epoch, last fetched epoch])
        for t in body.topics:
            for p in t.partitions:
                epoch, last_fetched = getattr(p, "current_leader_epoch", -1), getattr(p, "last_fetched_epoch", -1)
                parts.append([t.topic, p.partition, p.fetch_offset, p.partition_max_bytes,
                              *(() if epoch < 0 else (epoch,))])
                if last_fetched >= 0:
                    checks.append((len(parts) - 1, [t.topic, p.partition, None if epoch < 0 else epoch, last_fetched]))
        args = {"max_wait_ms": body.max_wait_ms, "min_bytes": body.min_bytes,
                "max_bytes": body.max_bytes, "parts": parts}

        def fetch(diverged: dict) -> None:
            self._call(wire.FETCH, args, lambda result, bulk, error: self._fetch_answer(
                respond, asked, result, bulk, error, diverged))

        if not checks:
            fetch({})
            return

        def checked(result, _bulk, error) -> None:
            """Fetch v12's divergence check (KIP-595, as Kafka's Partition.fetchRecords makes it): a fetch
            whose last fetched epoch ends here below the fetch offset, or that this log does not have, read
            a log that diverged from this one; it is answered the largest epoch at or below it and where
            that ends (DivergingEpoch), with no records, at once. Its read is then one batch at that end, for
            the answer's high watermark and log start (its records are left out)."""
            diverged = {}
            for (index, (_, _, _, last_fetched)), row in zip(checks, result["parts"] if result is not None else ()):
                code, _, epoch, end_offset = row
                # An epoch this log does not know (-1/-1, the field's default) cannot be told: an ordinary fetch.
                if code is None and epoch >= 0 and (end_offset < parts[index][2] or epoch < last_fetched):
                    diverged[index] = {"epoch": epoch, "end_offset": end_offset}
                    parts[index][2:4] = [end_offset, 1]
            if diverged:
                args["max_wait_ms"] = 0
            fetch(diverged)

        self._call(wire.EPOCH_END_OFFSETS, {"parts": [part for _, part in checks]}, checked)

    def _fetch_answer(self, respond, asked, result, bulk, error, diverged: dict, error_code=None) -> None:
        """``diverged``: index in ``asked`` -> the DivergingEpoch of a partition whose log diverged."""
        by_topic: dict[str, list] = {}
        entries = []
        rows = result["parts"] if result is not None else [None] * len(asked)
        for index, ((topic, partition, offset), row, data) in enumerate(zip(asked, rows, bulk or [b""] * len(asked))):
            entry = {"partition_index": partition, "high_watermark": -1, "last_stable_offset": -1,
                     "log_start_offset": -1, "aborted_transactions": None, "preferred_read_replica": -1,
                     "records": b""}
            if row is None:
                entry["error_code"] = error_code if error_code is not None else codec.kafka_code(error.code)
            else:
                _, _, code, message, log_start, high_watermark, _ = row
                entry.update(error_code=codec.kafka_code(code), high_watermark=high_watermark,
                             last_stable_offset=high_watermark, log_start_offset=log_start)
                if index in diverged:
                    entry.update(error_code=codec.NONE, diverging_epoch=diverged[index])
                elif code is None and data:
                    try:
                        entry["records"] = records.as_kafka(data, skip_below=offset)
                    except CorruptRecord as exc:
                        log.error("serving %s/%s to a Kafka client failed: %s", topic, partition, exc)
                        entry.update(error_code=codec.CORRUPT_MESSAGE, records=b"")
            by_topic.setdefault(topic, []).append(entry)
            entries.append((topic, partition, entry))
        respond({"throttle_time_ms": 0, "error_code": codec.NONE, "session_id": 0,
                 "responses": [{"topic": t, "partitions": p} for t, p in by_topic.items()],
                 "node_endpoints": self._leader_hints(entries)})

    # -- ListOffsets ---------------------------------------------------------------------------------

    def _list_offsets(self, header, body, respond) -> None:
        asked, parts = [], []
        for t in body.topics:
            for p in t.partitions:
                epoch = getattr(p, "current_leader_epoch", -1)
                asked.append((t.name, p.partition_index, p.timestamp))
                parts.append([t.name, p.partition_index, OFFSET_SPECS.get(p.timestamp, p.timestamp),
                              *(() if epoch < 0 else (epoch,))])

        def answered(result, _bulk, error) -> None:
            by_topic: dict[str, list] = {}
            rows = result["parts"] if result is not None else [None] * len(asked)
            for (topic, partition, timestamp), row in zip(asked, rows):
                entry = {"partition_index": partition, "timestamp": -1, "offset": -1, "leader_epoch": -1}
                if row is None:
                    entry["error_code"] = (codec.NOT_LEADER_OR_FOLLOWER if error is None
                                           else codec.kafka_code(error.code))
                else:
                    code, _, offset, _, high_watermark, found_ms, leader_epoch = row
                    entry["error_code"] = codec.kafka_code(code)
                    # For a time with no record at or after it Kafka answers offset -1 (the node: its bound,
                    # the high watermark, with no timestamp found).
                    none_found = timestamp not in OFFSET_SPECS and found_ms < 0
                    if code is None and not none_found:
                        entry.update(offset=offset, timestamp=found_ms, leader_epoch=leader_epoch)
                by_topic.setdefault(topic, []).append(entry)
            respond({"throttle_time_ms": 0, "topics": [{"name": t, "partitions": p} for t, p in by_topic.items()]})

        if self.handlers is None:
            answered(None, (), None)
            return
        self._call(wire.LIST_OFFSETS, {"parts": parts, "detail": True}, answered)

    # -- OffsetForLeaderEpoch --------------------------------------------------------------------------

    def _offset_for_leader_epoch(self, header, body, respond) -> None:
        """Where each asked leader epoch ends on this leader (``Node._epoch_end_offsets``): a consumer
        whose position is past the end of the epoch it last read in was truncated (KIP-320). Fenced by
        ``current_leader_epoch`` as Fetch is."""
        asked = [(t.topic, p.partition, p.current_leader_epoch, p.leader_epoch)
                 for t in body.topics for p in t.partitions]

        def answered(result, _bulk, error) -> None:
            by_topic: dict[str, list] = {}
            rows = result["parts"] if result is not None else [None] * len(asked)
            for (topic, partition, _, _), row in zip(asked, rows):
                entry = {"partition": partition, "leader_epoch": -1, "end_offset": -1}
                if row is None:
                    entry["error_code"] = (codec.NOT_LEADER_OR_FOLLOWER if error is None
                                           else codec.kafka_code(error.code))
                else:
                    code, _, epoch, end_offset = row
                    entry["error_code"] = codec.kafka_code(code)
                    if code is None:
                        entry.update(leader_epoch=epoch, end_offset=end_offset)
                by_topic.setdefault(topic, []).append(entry)
            respond({"throttle_time_ms": 0, "topics": [{"topic": t, "partitions": p} for t, p in by_topic.items()]})

        if self.handlers is None:
            answered(None, (), None)
            return
        parts = [[topic, partition, None if current < 0 else current, epoch]
                 for topic, partition, current, epoch in asked]
        self._call(wire.EPOCH_END_OFFSETS, {"parts": parts}, answered)
