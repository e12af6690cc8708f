"""Kafka consumer groups on a real cluster (coordinator and node processes, LocalCluster(kafka_port=0)),
driven by real Kafka clients: confluent-kafka (librdkafka), kafka-python and aiokafka, each with
``subscribe()`` and committed offsets (docs/kafka.md). The classic protocol's pure core is tested on a fake
clock in tests/test_kafka_classic_group.py."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import uuid

import pytest
from click.testing import CliRunner

from bus import Admin, Consumer, Producer, wire
from bus.cli import main
from bus.errors import InconsistentGroupProtocol
from nodes.cluster import LocalCluster
from nodes.controller import COORDINATOR_BROKER_ID
from nodes.kafka import codec
from tests.conftest import wait_for
from tests.test_cli_groups import partition_rows

confluent_kafka = pytest.importorskip("confluent_kafka")
kafka = pytest.importorskip("kafka")
aiokafka = pytest.importorskip("aiokafka")
from kafka.protocol.consumer.metadata import ConsumerProtocolSubscription  # noqa: E402

PARTITIONS = 4
PER_PARTITION = 25
CLIENT_S = 45  # a deadline, not a wait: generous for a loaded machine (a rebalance under a load of 8+ took over 20 s)
SESSION_MS = 6_000  # the clients' session timeout (a close leaves at once, not after this)
HEARTBEAT_MS = 300


@pytest.fixture(scope="module")
def groups_cluster(tmp_path_factory):
    cluster = LocalCluster(str(tmp_path_factory.mktemp("kafka-groups") / "cluster"), 2, kafka_port=0)
    try:
        cluster.start()
        # Every server's Metadata lists both nodes and the coordinator (addresses come with heartbeats).
        for index in (0, *cluster.node_ports):
            wait_for(lambda: len(brokers_of(cluster.kafka_address(index))) == 3, CLIENT_S,
                     message=f"every broker in server {index}'s Metadata")
        yield cluster
    finally:
        cluster.stop()


def create_topic(cluster: LocalCluster, topic: str, partitions: int = PARTITIONS) -> None:
    """The topic, in every server's Metadata with a leader for each partition before a client asks: a node
    learns a new topic with its next placement, and a group leader whose metadata came from a node that had
    not yet (kafka-python's range assignor: "No partition metadata") assigns nothing until it refreshes."""
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic(topic, partitions, exist_ok=True)
    for index in (0, *cluster.node_ports):
        wait_for(lambda: leaders_of(cluster.kafka_address(index), topic) == partitions, CLIENT_S,
                 message=f"topic {topic} with its leaders in server {index}'s Metadata")


def new_group(cluster: LocalCluster, group: str) -> tuple[str, str]:
    """A topic of PARTITIONS partitions for the group ``group`` of one test: (topic, group)."""
    create_topic(cluster, f"groups-{group}")
    return f"groups-{group}", group


def produce(cluster: LocalCluster, topic: str, per_partition: int, start: int = 0) -> None:
    with Producer(cluster.bootstrap) as producer:
        for o in range(start, start + per_partition):
            for p in range(PARTITIONS):
                producer.send(topic, b"p%d-%d" % (p, o), partition=p)
        producer.flush()


def describe(cluster: LocalCluster, group: str) -> str:
    result = CliRunner(env={"BUS_BOOTSTRAP": cluster.bootstrap}).invoke(main, ["group", "describe", group],
                                                                        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# -- one face for three clients: poll() -> [(partition, offset)], assignment(), commit(), close() ---------

class Confluent:
    def __init__(self, bootstrap: str, group: str, topic: str):
        self.consumer = confluent_kafka.Consumer({
            "bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
            "enable.auto.commit": False, "fetch.wait.max.ms": 100, **self.protocol_settings()})
        self.consumer.subscribe([topic])

    @staticmethod
    def protocol_settings() -> dict:
        return {"session.timeout.ms": SESSION_MS, "heartbeat.interval.ms": HEARTBEAT_MS}

    def poll(self) -> list:
        out = []
        for m in self.consumer.consume(num_messages=50, timeout=0.2):
            assert m.error() is None, m.error()
            out.append((m.partition(), m.offset()))
        return out

    def assignment(self) -> set:
        return {tp.partition for tp in self.consumer.assignment()}

    def commit(self) -> None:
        self.consumer.commit(asynchronous=False)

    def close(self) -> None:
        self.consumer.close()


class ConfluentConsumerProtocol(Confluent):
    """KIP-848's protocol (ConsumerGroupHeartbeat): the coordinator assigns, as for the bus's own members."""

    @staticmethod
    def protocol_settings() -> dict:
        return {"group.protocol": "consumer"}  # the session and heartbeat interval are the coordinator's


class KafkaPython:
    def __init__(self, bootstrap: str, group: str, topic: str):
        self.consumer = kafka.KafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
            enable_auto_commit=False, session_timeout_ms=SESSION_MS, heartbeat_interval_ms=HEARTBEAT_MS,
            fetch_max_wait_ms=100)

    def poll(self) -> list:
        batches = self.consumer.poll(timeout_ms=200)
        return [(r.partition, r.offset) for records in batches.values() for r in records]

    def assignment(self) -> set:
        return {tp.partition for tp in self.consumer.assignment()}

    def commit(self) -> None:
        self.consumer.commit()

    def close(self) -> None:
        self.consumer.close()


class AioKafka:
    """aiokafka's consumer on an event loop of its own thread, driven synchronously."""

    def __init__(self, bootstrap: str, group: str, topic: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            consumer = aiokafka.AIOKafkaConsumer(
                topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                enable_auto_commit=False, session_timeout_ms=SESSION_MS, heartbeat_interval_ms=HEARTBEAT_MS,
                fetch_max_wait_ms=100)
            await consumer.start()
            return consumer

        self.consumer = self._run(start())

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(CLIENT_S)

    def poll(self) -> list:
        batches = self._run(self.consumer.getmany(timeout_ms=200))
        return [(r.partition, r.offset) for records in batches.values() for r in records]

    def assignment(self) -> set:
        async def assigned():
            return {tp.partition for tp in self.consumer.assignment()}
        return self._run(assigned())

    def commit(self) -> None:
        self._run(self.consumer.commit())

    def close(self) -> None:
        try:
            self._run(self.consumer.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(CLIENT_S)
            self.loop.close()


# What the clients raise for a commit refused (a rebalance under way) or with nothing consumed to commit.
COMMIT_ERRORS = (confluent_kafka.KafkaException, kafka.errors.KafkaError, aiokafka.errors.KafkaError)
CLIENTS = {"confluent-kafka": Confluent, "kafka-python": KafkaPython, "aiokafka": AioKafka,
           "confluent-kafka-kip848": ConfluentConsumerProtocol}


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_two_members_share_a_topic_one_leaves_the_other_takes_over_and_a_restart_resumes_from_commits(
        groups_cluster, client):
    cluster, make = groups_cluster, CLIENTS[client]
    topic, group = new_group(cluster, f"readers-{client}")
    produce(cluster, topic, PER_PARTITION)
    seen: dict[tuple, int] = {}  # (partition, offset) -> times handled
    a = make(cluster.kafka_bootstrap, group, topic)
    b = make(cluster.kafka_bootstrap, group, topic)
    members = [a, b]
    try:
        def poll_all() -> set:
            for consumer in members:
                for record in consumer.poll():
                    seen[record] = seen.get(record, 0) + 1
            return set(seen)

        def every(end: int) -> set:
            return {(p, o) for p in range(PARTITIONS) for o in range(end)}

        # Both members hold partitions, disjoint and together all of them, and read the first records.
        def shared() -> bool:
            poll_all()
            held_a, held_b = a.assignment(), b.assignment()
            return held_a and held_b and not held_a & held_b and held_a | held_b == set(range(PARTITIONS))
        wait_for(shared, CLIENT_S, message="both members assigned")
        wait_for(lambda: poll_all() >= every(PER_PARTITION), CLIENT_S, message="the first records")
        a.commit()
        a.close()  # leaves the group midway: b takes over a's partitions and reads what comes next there
        members.remove(a)
        produce(cluster, topic, PER_PARTITION, start=PER_PARTITION)
        done = 2 * PER_PARTITION

        # b handles and commits as an at-least-once loop does, until the group's offsets are at the end
        # (a partition it held before is read again from the committed offset: the clients drop their
        # positions in an eager rebalance; a commit the rebalance refuses is tried again).
        def committed_to_the_end() -> bool:
            poll_all()
            try:
                b.commit()
            except COMMIT_ERRORS:
                return False
            with Admin(cluster.bootstrap) as admin:
                partitions = admin.describe_group(group)["partitions"]
            return {p["partition"]: p["committed"] for p in partitions} == dict.fromkeys(range(PARTITIONS), done)
        wait_for(committed_to_the_end, CLIENT_S, interval_s=0.1, message="b committed every partition's end")
        assert set(seen) == every(done)  # every record at least once, nothing else
        assert b.assignment() == set(range(PARTITIONS))
        # While b is in the group, `bus group describe` shows it with the committed offsets and no lag.
        out = describe(cluster, group)
        assert "state=stable" in out and "members=1" in out, out
        rows = partition_rows(out)
        assert {p: row[1:] for p, row in rows.items()} == {p: (done, done, 0) for p in range(PARTITIONS)}, out
        assert len({row[0] for row in rows.values()}) == 1 and "-" not in {row[0] for row in rows.values()}
        b.close()
        members.remove(b)
    finally:
        for consumer in members:
            consumer.close()

    # Five more records per partition: the group's lag, then a restarted member reads only those.
    produce(cluster, topic, 5, start=done)
    out = describe(cluster, group)
    assert {p: row[1:] for p, row in partition_rows(out).items()} == {
        p: (done, done + 5, 5) for p in range(PARTITIONS)}, out
    assert f"total lag: {PARTITIONS * 5}" in out
    c = make(cluster.kafka_bootstrap, group, topic)
    try:
        got: list = []
        wait_for(lambda: got.extend(c.poll()) or len(got) >= PARTITIONS * 5, CLIENT_S, message="the new records")
        assert sorted(got) == [(p, o) for p in range(PARTITIONS) for o in range(done, done + 5)]
    finally:
        c.close()


@pytest.mark.parametrize("protocol", [Confluent, ConfluentConsumerProtocol], ids=["classic", "kip848"])
def test_a_static_member_restarted_gets_its_partitions_back_without_a_rebalance(groups_cluster, protocol):
    """KIP-345 (classic: a static member sends no LeaveGroup on close) and KIP-848 (its heartbeat's epoch -2 on
    close): the member's place, and its partitions, wait for it until its session times out."""
    cluster = groups_cluster
    topic, group = new_group(cluster, f"static-{protocol.__name__.lower()}")

    def member(instance: str):
        consumer = confluent_kafka.Consumer({
            "bootstrap.servers": cluster.kafka_bootstrap, "group.id": group, "group.instance.id": instance,
            **protocol.protocol_settings()})
        consumer.subscribe([topic])
        return consumer

    def held(consumer) -> set:
        return {tp.partition for tp in consumer.assignment()}

    a, b = member("a"), member("b")
    try:
        wait_for(lambda: [c.poll(0.05) for c in (a, b)] and held(a) and held(b), CLIENT_S, message="both assigned")
        before = held(a), held(b)
        with Admin(cluster.bootstrap) as admin:
            epoch = admin.describe_group(group)["group_epoch"]
        a.close()  # a static member's place waits for it
        with Admin(cluster.bootstrap) as admin:
            assert sorted(m["group_instance_id"] for m in admin.describe_group(group)["members"]) == ["a", "b"]
        a = member("a")
        wait_for(lambda: [c.poll(0.05) for c in (a, b)] and held(a), CLIENT_S, message="a back")
        assert (held(a), held(b)) == before
        with Admin(cluster.bootstrap) as admin:
            described = admin.describe_group(group)
        assert described["group_epoch"] == epoch  # the same generation: nobody rebalanced
        assert sorted(m["group_instance_id"] for m in described["members"]) == ["a", "b"]
    finally:
        a.close()
        b.close()


def test_a_kip848_member_that_subscribes_to_another_topic_is_moved_to_it_by_its_heartbeats(groups_cluster):
    """confluent-kafka's ``subscribe()`` again with another topic (``group.protocol=consumer``): its next
    heartbeat carries the new subscription, the coordinator takes back the first topic's partitions and
    grants the second's, and the member reads the second topic's records, without leaving the group."""
    cluster = groups_cluster
    first, group = new_group(cluster, "kip848-resubscribe")
    second = f"{first}-second"
    create_topic(cluster, second)
    produce(cluster, first, PER_PARTITION)
    produce(cluster, second, PER_PARTITION)
    member = ConfluentConsumerProtocol(cluster.kafka_bootstrap, group, first)
    seen: dict[str, set] = {first: set(), second: set()}

    def read() -> None:
        for m in member.consumer.consume(num_messages=50, timeout=0.2):
            assert m.error() is None, m.error()
            seen[m.topic()].add((m.partition(), m.offset()))

    def holds(topic: str) -> bool:
        read()
        return {(tp.topic, tp.partition) for tp in member.consumer.assignment()} == {
            (topic, p) for p in range(PARTITIONS)}

    every = {(p, o) for p in range(PARTITIONS) for o in range(PER_PARTITION)}
    try:
        wait_for(lambda: holds(first) and seen[first] == every, CLIENT_S, message="the first topic read")
        with Admin(cluster.bootstrap) as admin:
            (described,) = admin.describe_group(group)["members"]
        assert described["topics"] == [first]
        member_id, epoch = described["member_id"], admin_epoch(cluster, group)
        member.consumer.subscribe([second])
        wait_for(lambda: holds(second) and seen[second] == every, CLIENT_S, message="the second topic read")
        with Admin(cluster.bootstrap) as admin:
            described = admin.describe_group(group)
        (now,) = described["members"]
        assert (now["member_id"], now["topics"]) == (member_id, [second])  # the same member, resubscribed
        assert described["group_epoch"] > epoch  # the target was recomputed for the new subscription
        assert sorted(now["assignment"]) == [[second, p] for p in range(PARTITIONS)]
    finally:
        member.close()


def test_admin_clients_describe_consumer_groups_of_both_protocols(groups_cluster):
    """confluent-kafka's ``AdminClient.describe_consumer_groups`` asks ConsumerGroupDescribe (KIP-848) first:
    a KIP-848 group's members, subscriptions and assignments come from it; a classic group is refused there
    (GROUP_ID_NOT_FOUND) and described by DescribeGroups, as against Kafka."""
    from confluent_kafka import ConsumerGroupState, ConsumerGroupType
    from confluent_kafka.admin import AdminClient

    cluster = groups_cluster
    topic, group = new_group(cluster, "describe-kip848")
    classic_group = f"{group}-classic"
    members = {group: ConfluentConsumerProtocol(cluster.kafka_bootstrap, group, topic),
               classic_group: Confluent(cluster.kafka_bootstrap, classic_group, topic)}
    admin = AdminClient({"bootstrap.servers": cluster.kafka_bootstrap})
    every = {(topic, p) for p in range(PARTITIONS)}
    try:
        for member in members.values():
            wait_for(lambda: member.poll() is not None and member.assignment() == set(range(PARTITIONS)),
                     CLIENT_S, message="each member holds every partition")
        futures = admin.describe_consumer_groups([group, classic_group, "groups-nobody"], request_timeout=CLIENT_S)
        described = {g: f.result(CLIENT_S) for g, f in futures.items() if g != "groups-nobody"}
        kip848, classic = described[group], described[classic_group]
        assert (kip848.type, kip848.state) == (ConsumerGroupType.CONSUMER, ConsumerGroupState.STABLE)
        (m,) = kip848.members
        with Admin(cluster.bootstrap) as bus_admin:
            (bus_member,) = bus_admin.describe_group(group)["members"]
        assert m.member_id == bus_member["member_id"]
        assert {(tp.topic, tp.partition) for tp in m.assignment.topic_partitions} == every
        assert {(tp.topic, tp.partition) for tp in m.target_assignment.topic_partitions} == every
        assert (classic.type, classic.state) == (ConsumerGroupType.CLASSIC, ConsumerGroupState.STABLE)
        (c,) = classic.members
        assert {(tp.topic, tp.partition) for tp in c.assignment.topic_partitions} == every
        nobody = futures["groups-nobody"].result(CLIENT_S)  # Kafka answers an unknown group as Dead
        assert nobody.state == ConsumerGroupState.DEAD and not nobody.members
    finally:
        for member in members.values():
            member.close()


def admin_epoch(cluster: LocalCluster, group: str) -> int:
    with Admin(cluster.bootstrap) as admin:
        return admin.describe_group(group)["group_epoch"]


# -- raw Kafka requests (kafka-python's message classes, our own socket) -------------------------------

class Raw:
    """One connection to a Kafka listener; ``call(api_key, version, fields)`` -> the decoded response."""

    def __init__(self, address: str):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=CLIENT_S)
        self.correlation_id = 0

    def call(self, api_key: int, version: int, fields: dict):
        self.correlation_id += 1
        message = codec.build(codec.message_class(api_key, version, "request"), fields)
        message.with_header(correlation_id=self.correlation_id, client_id="raw")
        self.sock.sendall(bytes(message.encode(header=True, framed=True)))
        (length,) = struct.unpack(">i", self._recv(4))
        data = self._recv(length)
        assert struct.unpack_from(">i", data)[0] == self.correlation_id
        response = codec.message_class(api_key, version, "response")
        flexible = response.flexible_version_q(version) and api_key != codec.API_VERSIONS
        return response.decode(data[4 + flexible:])

    def _recv(self, count: int) -> bytes:
        out = b""
        while len(out) < count:
            chunk = self.sock.recv(count - len(out))
            if not chunk:
                raise ConnectionError("closed by the server")
            out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


def leaders_of(address: str, topic: str) -> int:
    """How many partitions of ``topic`` have a leader in the Metadata of the server at ``address``."""
    raw = Raw(address)
    try:
        (answer,) = raw.call(codec.METADATA, 12, {"topics": [{"name": topic, "topic_id": None}]}).topics
        return 0 if answer.error_code else sum(p.error_code == 0 and p.leader_id >= 0 for p in answer.partitions)
    finally:
        raw.close()


def brokers_of(address: str) -> dict:
    """broker id -> (host, port), as the Metadata of the server at ``address`` lists them."""
    raw = Raw(address)
    try:
        return {b.node_id: (b.host, b.port) for b in raw.call(codec.METADATA, 12, {"topics": None}).brokers}
    finally:
        raw.close()


def subscription(topic: str) -> bytes:
    return bytes(ConsumerProtocolSubscription(version=0, topics=[topic], user_data=None).encode())


def join_fields(group: str, member_id: str, metadata: bytes, session_ms: int = 1_500) -> dict:
    return {"group_id": group, "session_timeout_ms": session_ms, "rebalance_timeout_ms": 10_000,
            "member_id": member_id, "protocol_type": "consumer",
            "protocols": [{"name": "range", "metadata": metadata}]}


def test_find_coordinator_on_every_server_names_the_coordinator_which_metadata_lists(groups_cluster):
    cluster = groups_cluster
    host, port = cluster.kafka_bootstrap.rsplit(":", 1)
    for index in (0, *cluster.node_ports):
        raw = Raw(cluster.kafka_address(index))
        try:
            old = raw.call(codec.FIND_COORDINATOR, 1, {"key": "any-group", "key_type": 0})
            assert (old.error_code, old.node_id, old.host, old.port) == (0, COORDINATOR_BROKER_ID, host, int(port))
            batch = raw.call(codec.FIND_COORDINATOR, 4, {"key_type": 0, "coordinator_keys": ["a", "b"]})
            assert [(c.key, c.node_id, c.error_code) for c in batch.coordinators] == [
                ("a", COORDINATOR_BROKER_ID, 0), ("b", COORDINATOR_BROKER_ID, 0)]
            assert raw.call(codec.FIND_COORDINATOR, 3, {"key": "t", "key_type": 1}).error_code == codec.INVALID_REQUEST
            brokers = brokers_of(cluster.kafka_address(index))
            assert brokers[COORDINATOR_BROKER_ID] == (host, int(port)) and set(cluster.node_ports) <= set(brokers)
            if index:  # a node: the group APIs are the coordinator's
                assert raw.call(codec.HEARTBEAT, 4, {"group_id": "g", "generation_id": 1, "member_id": "m"}
                                ).error_code == codec.NOT_COORDINATOR
        finally:
            raw.close()


def test_a_member_that_stops_heartbeating_is_expelled_and_the_other_gets_its_partitions(groups_cluster):
    cluster = groups_cluster
    topic, group = new_group(cluster, "expel")
    b = Confluent(cluster.kafka_bootstrap, group, topic)
    raw = Raw(cluster.kafka_bootstrap)
    try:
        wait_for(lambda: b.poll() is not None and b.assignment() == set(range(PARTITIONS)), CLIENT_S,
                 message="b alone holds everything")
        # A raw member joins (its JoinGroup is held until b joins again), syncs, and then goes silent.
        answers = {}

        def join_and_sync():
            first = raw.call(codec.JOIN_GROUP, 5, join_fields(group, "", subscription(topic)))
            assert first.error_code == codec.MEMBER_ID_REQUIRED
            joined = raw.call(codec.JOIN_GROUP, 5, join_fields(group, first.member_id, subscription(topic)))
            answers["join"] = joined
            answers["sync"] = raw.call(codec.SYNC_GROUP, 3, {"group_id": group, "generation_id": joined.generation_id,
                                                             "member_id": joined.member_id, "assignments": []})

        joiner = threading.Thread(target=join_and_sync, daemon=True)
        joiner.start()
        wait_for(lambda: b.poll() is not None and "sync" in answers, CLIENT_S, message="the raw member in")
        joiner.join(CLIENT_S)
        assert answers["join"].error_code == 0 and answers["sync"].error_code == 0
        wait_for(lambda: b.poll() is not None and len(b.assignment()) == PARTITIONS // 2, CLIENT_S,
                 message="b gives half back")
        out = describe(cluster, group)
        assert "members=2" in out and answers["join"].member_id in out, out
        # Silent for longer than its 1.5 s session: out, and b holds everything again.
        wait_for(lambda: b.poll() is not None and b.assignment() == set(range(PARTITIONS)), CLIENT_S,
                 message="b holds everything again")
        assert raw.call(codec.HEARTBEAT, 3, {"group_id": group, "generation_id": answers["join"].generation_id,
                                             "member_id": answers["join"].member_id}).error_code == \
            codec.UNKNOWN_MEMBER_ID
        assert "members=1" in describe(cluster, group)
    finally:
        raw.close()
        b.close()


def test_bad_group_requests_get_kafkas_error_codes_and_the_coordinator_keeps_serving(groups_cluster):
    cluster = groups_cluster
    create_topic(cluster, "groups-bad", 2)
    raw = Raw(cluster.kafka_bootstrap)
    try:
        for garbage in (b"", b"\xff" * 7, b"\x00\x00\x7f\xff\xff\xff", b"\x00\x00\x00\x00\x00\x01\x00\x09t"):
            answer = raw.call(codec.JOIN_GROUP, 3, join_fields("bad", "", garbage))
            assert answer.error_code == codec.INCONSISTENT_GROUP_PROTOCOL
        assert raw.call(codec.SYNC_GROUP, 3, {"group_id": "bad", "generation_id": 1, "member_id": "who",
                                              "assignments": []}).error_code == codec.UNKNOWN_MEMBER_ID
        assert raw.call(codec.JOIN_GROUP, 5, join_fields("bad", "unknown-id", subscription("t"))).error_code == \
            codec.UNKNOWN_MEMBER_ID
        commit = raw.call(codec.OFFSET_COMMIT, 8, {
            "group_id": "bad", "generation_id_or_member_epoch": -1, "member_id": "", "topics": [
                {"name": "no-such-topic", "partitions": [{"partition_index": 0, "committed_offset": 5}]},
                {"name": "groups-bad", "partitions": [{"partition_index": 7, "committed_offset": 5},
                                                      {"partition_index": 1, "committed_offset": -3},
                                                      {"partition_index": 0, "committed_offset": 3}]}]})
        assert [[p.error_code for p in t.partitions] for t in commit.topics] == [
            [codec.UNKNOWN_TOPIC_OR_PARTITION], [codec.UNKNOWN_TOPIC_OR_PARTITION, codec.INVALID_COMMIT_OFFSET_SIZE,
                                                 codec.NONE]]
        # A simple commit of an assign() consumer is stored; a commit of a made-up generation is not.
        fetched = raw.call(codec.OFFSET_FETCH, 7, {"group_id": "bad", "topics": None})
        assert [(t.name, [(p.partition_index, p.committed_offset) for p in t.partitions]) for t in fetched.topics] == [
            ("groups-bad", [(0, 3)])]
        stale = raw.call(codec.OFFSET_COMMIT, 8, {
            "group_id": "bad", "generation_id_or_member_epoch": 4, "member_id": "ghost", "topics": [
                {"name": "groups-bad", "partitions": [{"partition_index": 0, "committed_offset": 9}]}]})
        assert stale.topics[0].partitions[0].error_code == codec.UNKNOWN_MEMBER_ID
        listed = raw.call(codec.LIST_GROUPS, 4, {"states_filter": []})
        assert "bad" in {g.group_id for g in listed.groups}
        described = raw.call(codec.DESCRIBE_GROUPS, 5, {"groups": ["bad", "nobody"]}).groups
        assert [(g.group_id, g.group_state) for g in described] == [("bad", "Empty"), ("nobody", "Dead")]
        # KIP-848's heartbeat: an unknown member, an epoch it never had, an assignor the bus has not.
        heartbeat = {"group_id": "kip848", "member_id": "m-1", "member_epoch": 0,
                     "subscribed_topic_names": ["groups-bad"]}
        joined = raw.call(codec.CONSUMER_GROUP_HEARTBEAT, 1, heartbeat)
        assert joined.error_code == 0 and joined.member_id == "m-1" and joined.member_epoch > 0
        assert [(tp.partitions) for tp in joined.assignment.topic_partitions] == [[0, 1]]
        for fields, code in (({"member_id": "nobody", "member_epoch": 1}, codec.UNKNOWN_MEMBER_ID),
                             ({"member_epoch": joined.member_epoch + 7}, codec.FENCED_MEMBER_EPOCH),
                             ({"member_id": "m-2", "server_assignor": "magic"}, codec.UNSUPPORTED_ASSIGNOR),
                             ({"member_id": "m-3", "subscribed_topic_names": None}, codec.INVALID_REQUEST)):
            assert raw.call(codec.CONSUMER_GROUP_HEARTBEAT, 1, {**heartbeat, **fields}).error_code == code, fields
        assert raw.call(codec.CONSUMER_GROUP_HEARTBEAT, 1, {**heartbeat, "member_epoch": -1}).error_code == 0
        # Still serving, this connection and others.
        assert raw.call(codec.API_VERSIONS, 3, {}).error_code == 0
    finally:
        raw.close()


def hostile_group_request(rng: random.Random, n: int) -> tuple[int, int, dict]:
    """(api key, version, fields) of a well-formed group request with values a rogue or broken client might
    send: extreme integers, odd names, garbage metadata and assignments, unknown members and generations.
    A JoinGroup that could be valid names a group of its own (``n``), so no fuzzed join waits on another's."""
    i32 = [0, 1, -1, -2, 2**31 - 1, -2**31, 6_000]
    names = ["fuzz", "no-such-topic", "", "x" * 300, "t\x00", "\u00e9"]
    metadata = [b"", b"\xff" * 9, subscription("fuzz"), subscription("x" * 300), b"\x00\x00\x7f\xff\xff\xff"]
    pick = rng.choice
    kind = rng.randrange(11)
    if kind == 0:
        version = rng.randint(0, 4)
        return codec.FIND_COORDINATOR, version, {"key": pick(names), "key_type": pick([0, 1, 2, -1]),
                                                 "coordinator_keys": [pick(names) for _ in range(rng.randint(0, 3))]}
    if kind == 1:
        version = rng.randint(0, 9)
        return codec.JOIN_GROUP, version, {
            "group_id": pick([f"fuzz-{n}", "", "x" * 300, "g\x00"]), "session_timeout_ms": pick(i32),
            "rebalance_timeout_ms": pick(i32), "member_id": pick(["", "who"]), "group_instance_id": pick([None, "i"]),
            "protocol_type": pick(["consumer", "", "connect"]),
            "protocols": [{"name": pick(["range", "range", ""]), "metadata": pick(metadata)}
                          for _ in range(rng.randint(0, 3))], "reason": pick([None, "x"])}
    if kind == 2:
        return codec.SYNC_GROUP, rng.randint(0, 5), {
            "group_id": pick(names), "generation_id": pick(i32), "member_id": pick(["", "who"]),
            "group_instance_id": pick([None, "i"]), "protocol_type": pick([None, "consumer"]),
            "protocol_name": pick([None, "range"]),
            "assignments": [{"member_id": pick(["", "who"]), "assignment": pick(metadata)} for _ in range(2)]}
    if kind == 3:
        return codec.HEARTBEAT, rng.randint(0, 4), {"group_id": pick(names), "generation_id": pick(i32),
                                                    "member_id": pick(["", "who"]), "group_instance_id": None}
    if kind == 4:
        return codec.LEAVE_GROUP, rng.randint(0, 5), {
            "group_id": pick(names), "member_id": pick(["", "who"]),
            "members": [{"member_id": pick(["", "who"]), "group_instance_id": pick([None, "i"])}
                        for _ in range(rng.randint(0, 3))]}
    if kind == 5:
        return codec.OFFSET_COMMIT, rng.randint(2, 8), {
            "group_id": pick(names), "generation_id_or_member_epoch": pick(i32), "member_id": pick(["", "who"]),
            "retention_time_ms": pick([-1, 0, 2**62]), "topics": [{"name": pick(names), "partitions": [
                {"partition_index": pick(i32), "committed_offset": pick([0, 5, -1, -2**63, 2**63 - 1]),
                 "committed_leader_epoch": pick(i32), "committed_metadata": pick([None, "", "m" * 5_000])}
                for _ in range(rng.randint(0, 3))]} for _ in range(rng.randint(0, 2))]}
    if kind == 6:
        version = rng.randint(1, 7)
        topics = [{"name": pick(names), "partition_indexes": [pick(i32) for _ in range(rng.randint(0, 3))]}
                  for _ in range(rng.randint(0, 2))]
        return codec.OFFSET_FETCH, version, {"group_id": pick(names), "require_stable": pick([False, True]),
                                             "topics": pick([None, topics]) if version >= 2 else topics}
    if kind == 8:
        return codec.CONSUMER_GROUP_HEARTBEAT, rng.randint(0, 1), {
            "group_id": pick([f"fuzz-{n}", "", "x" * 300, "g\x00"]), "member_id": pick(["", "who", f"m-{n}"]),
            "member_epoch": pick([0, 0, -1, -2, 1, 2**31 - 1, -2**31]), "instance_id": pick([None, "i"]),
            "rebalance_timeout_ms": pick(i32), "subscribed_topic_names": pick([None, [], [pick(names)]]),
            "subscribed_topic_regex": pick([None, "", "fu.*", "(", "x" * 2_000]),
            "server_assignor": pick([None, "uniform", "range", "magic"]),
            "topic_partitions": pick([None, [], [{"topic_id": uuid.uuid4(), "partitions": [pick(i32)]}]])}
    if kind == 7:
        return codec.LIST_GROUPS, rng.randint(0, 4), {"states_filter": [pick(["Stable", "", "x"])]}
    if kind == 9:
        return codec.CONSUMER_GROUP_DESCRIBE, rng.randint(0, 1), {
            "group_ids": [pick([*names, f"fuzz-{n - 1}", "after-fuzz"]) for _ in range(rng.randint(0, 3))],
            "include_authorized_operations": pick([False, True])}
    return codec.DESCRIBE_GROUPS, rng.randint(0, 5), {"groups": [pick(names) for _ in range(rng.randint(0, 3))],
                                                      "include_authorized_operations": pick([False, True])}


def test_hostile_values_in_group_requests_get_answers_and_every_server_keeps_serving(groups_cluster):
    """A seeded fuzz of the group APIs: each request, on a fresh connection to the coordinator or a node,
    gets its answer; no process dies; a group forms after."""
    cluster = groups_cluster
    create_topic(cluster, "fuzz", 2)
    rng = random.Random(17)
    addresses = [cluster.kafka_bootstrap, cluster.kafka_address(1)]
    for n in range(300):
        api_key, version, fields = hostile_group_request(rng, n)
        raw = Raw(addresses[n % 2])
        try:
            raw.call(api_key, version, fields)  # answered: the correlation id matches, the response decodes
        finally:
            raw.close()
        assert cluster.coordinator.poll() is None and cluster.nodes[1].poll() is None, (api_key, version, fields)
    raw = Raw(cluster.kafka_bootstrap)
    try:
        joined = raw.call(codec.JOIN_GROUP, 3, join_fields("after-fuzz", "", subscription("fuzz")))
        assert joined.error_code == 0 and joined.leader == joined.member_id
    finally:
        raw.close()


def test_one_group_name_is_one_kind_and_kafka_commits_survive_a_coordinator_restart(make_cluster):
    cluster = make_cluster(1, kafka_port=0)
    create_topic(cluster, "kinds", 1)
    bus_member = Consumer(cluster.bootstrap, topics=["kinds"], group="shared", session_timeout_ms=3_000,
                          heartbeat_interval_ms=300)
    raw = Raw(cluster.kafka_bootstrap)
    try:
        wait_for(lambda: bus_member.poll(100) is not None and bus_member.assignment(), CLIENT_S,
                 message="the bus member in")
        refused = raw.call(codec.JOIN_GROUP, 3, join_fields("shared", "", subscription("kinds")))
        assert refused.error_code == codec.INCONSISTENT_GROUP_PROTOCOL
        assert raw.call(codec.OFFSET_COMMIT, 8, {
            "group_id": "shared", "generation_id_or_member_epoch": -1, "member_id": "", "topics": [
                {"name": "kinds", "partitions": [{"partition_index": 0, "committed_offset": 1}]}]}
                        ).topics[0].partitions[0].error_code == codec.UNKNOWN_MEMBER_ID
        joined = raw.call(codec.JOIN_GROUP, 3, join_fields("kafka-kind", "", subscription("kinds"), session_ms=10_000))
        assert joined.error_code == 0
        # The bus's join (what a bus Consumer sends, which logs the refusal and tries again) is refused.
        with Admin(cluster.bootstrap) as admin, pytest.raises(InconsistentGroupProtocol, match="classic protocol"):
            admin._requester.coordinator(wire.GROUP_JOIN, {"group_id": "kafka-kind", "client_id": "bus",
                                                           "topics": ["kinds"], "session_timeout_ms": 3_000})
        raw.call(codec.SYNC_GROUP, 3, {"group_id": "kafka-kind", "generation_id": joined.generation_id,
                                       "member_id": joined.member_id, "assignments": []})
        commit = raw.call(codec.OFFSET_COMMIT, 8, {
            "group_id": "kafka-kind", "generation_id_or_member_epoch": joined.generation_id,
            "member_id": joined.member_id, "topics": [
                {"name": "kinds", "partitions": [{"partition_index": 0, "committed_offset": 7,
                                                  "committed_metadata": "seven"}]}]})
        assert commit.topics[0].partitions[0].error_code == 0
    finally:
        raw.close()
        bus_member.close()
    cluster.restart_coordinator()
    raw = Raw(cluster.kafka_bootstrap)
    try:
        fetched = raw.call(codec.OFFSET_FETCH, 5, {"group_id": "kafka-kind", "topics": [
            {"name": "kinds", "partition_indexes": [0]}]})
        partition = fetched.topics[0].partitions[0]
        assert (partition.committed_offset, partition.metadata, partition.error_code) == (7, "seven", 0)
        # Its membership was soft state: the member hears it is unknown and joins again.
        assert raw.call(codec.HEARTBEAT, 3, {"group_id": "kafka-kind", "generation_id": joined.generation_id,
                                             "member_id": joined.member_id}).error_code == codec.UNKNOWN_MEMBER_ID
    finally:
        raw.close()


@pytest.mark.parametrize("client", ["confluent-kafka", "kafka-python"])
def test_classic_members_rejoin_after_a_coordinator_restart_and_resume_from_their_commits(make_cluster, client):
    """A classic group's membership is the coordinator's soft state: after a restart the member hears
    UNKNOWN_MEMBER_ID (or finds the coordinator again), joins again, gets its partitions back and reads on
    from the offsets it committed: every record once, the new ones too, committed to the end."""
    cluster = make_cluster(1, kafka_port=0)
    topic, group = new_group(cluster, f"restarted-{client}")
    produce(cluster, topic, PER_PARTITION)
    seen: dict[tuple, int] = {}  # (partition, offset) -> times handled
    member = CLIENTS[client](cluster.kafka_bootstrap, group, topic)

    def poll() -> set:
        for record in member.poll():
            seen[record] = seen.get(record, 0) + 1
        return set(seen)

    def every(end: int) -> set:
        return {(p, o) for p in range(PARTITIONS) for o in range(end)}

    def committed_to(end: int) -> bool:
        poll()
        try:
            member.commit()
        except COMMIT_ERRORS:
            return False  # no coordinator yet, or the group rebalancing: the loop commits again
        with Admin(cluster.bootstrap) as admin:
            partitions = admin.describe_group(group)["partitions"]
        return {p["partition"]: p["committed"] for p in partitions} == dict.fromkeys(range(PARTITIONS), end)

    try:
        wait_for(lambda: poll() >= every(PER_PARTITION), CLIENT_S, message="the first records")
        wait_for(lambda: committed_to(PER_PARTITION), CLIENT_S, interval_s=0.1, message="the first commit")
        with Admin(cluster.bootstrap) as admin:
            (before,) = admin.describe_group(group)["members"]
        cluster.restart_coordinator()

        def joined_again() -> bool:
            poll()
            with Admin(cluster.bootstrap) as admin:
                members = admin.describe_group(group)["members"]
            return [m["member_id"] for m in members] not in ([], [before["member_id"]]) and \
                member.assignment() == set(range(PARTITIONS))
        wait_for(joined_again, CLIENT_S, interval_s=0.1, message="the member in the group again")
        # Produced once it is back: a record read before a rejoin and not committed would be read again
        # from the commit (at least once), which is not what this test is about.
        produce(cluster, topic, PER_PARTITION, start=PER_PARTITION)
        wait_for(lambda: committed_to(2 * PER_PARTITION), CLIENT_S, interval_s=0.1,
                 message="the records produced after the restart, committed")
        assert set(seen) == every(2 * PER_PARTITION)
        assert max(seen.values()) == 1, sorted(k for k, v in seen.items() if v > 1)  # on from its commits
        assert member.assignment() == set(range(PARTITIONS))
    finally:
        member.close()
