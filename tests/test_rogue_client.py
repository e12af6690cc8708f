"""Rogue clients: garbage over a raw ZeroMQ DEALER to a node and to the coordinator gets an error reply
(never a crash, never silence), and the servers go on serving everyone else. And a node started on a data
directory that is not its own is refused clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from bus import Admin, Consumer, Producer, wire
from bus import batch as bf
from nodes.cluster import LocalCluster, free_ports
from tests.conftest import wait_for
from tests.core_helpers import child_env

packb = msgpack.Packer(use_bin_type=True).pack
V = wire.VERSION  # the version every well-formed header below carries


@pytest.fixture(scope="module")
def rogue_cluster(tmp_path_factory):
    cluster = LocalCluster(str(tmp_path_factory.mktemp("rogue")), 2).start()
    try:
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic("target", 2)  # partition 0 on node 1, partition 1 on node 2
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def dealer(context, address):
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def exchange(sock, frames, timeout_ms=5_000):
    """Send raw frames; return the decoded reply header [version, request_id, error, result] and bulk."""
    sock.send_multipart(frames)
    assert sock.poll(timeout_ms), f"no reply to {frames!r:.100}"
    reply = sock.recv_multipart()
    header = msgpack.unpackb(reply[0], raw=False)
    assert isinstance(header, list) and len(header) == 4 and header[0] == wire.VERSION
    return header, reply[1:]


def error_code(sock, frames):
    header, _ = exchange(sock, frames)
    assert header[2] is not None, f"expected an error, got {header!r}"
    return header[2][0], header[1]


def a_batch(value=b"rogue", count=1):
    flat = []
    for _ in range(count):
        flat += [None, None, value, None]
    return bf.pack_batch(flat, count)


# Garbage that either server must answer, with the code and the echoed request id it must carry.
COMMON_GARBAGE = [
    ("random bytes", [os.urandom(64)], "INVALID_REQUEST", None),
    ("empty frame", [b""], "INVALID_REQUEST", None),
    ("truncated msgpack", [packb([V, "ping", 5, {}])[:-3]], "INVALID_REQUEST", None),
    ("not an array", [packb({"v": 1, "op": "ping"})], "INVALID_REQUEST", None),
    ("short array", [packb([V, "ping", 6])], "INVALID_REQUEST", None),
    ("unknown op", [packb([V, "explode", 7, {}])], "INVALID_REQUEST", 7),
    ("op not a string", [packb([V, 42, 8, {}])], "INVALID_REQUEST", 8),
    ("wrong version", [packb([wire.VERSION + 1, "ping", 9, {}])], "UNSUPPORTED_VERSION", 9),
    ("version not an int", [packb(["one", "ping", 10, {}])], "UNSUPPORTED_VERSION", 10),
    ("oversized header", [packb([V, "ping", 11, {"pad": "x" * (1 << 20)}])], "INVALID_REQUEST", None),
    ("ping with bulk frames", [packb([V, "ping", 12, {}]), b"extra"], "INVALID_REQUEST", 12),
]

NODE_GARBAGE = [
    ("produce args not a map", [packb([V, "produce", 20, [1, 2]]), a_batch()], "INVALID_REQUEST"),
    ("produce without parts", [packb([V, "produce", 21, {}]), a_batch()], "INVALID_REQUEST"),
    ("produce parts not a list", [packb([V, "produce", 22, {"parts": "target"}]), a_batch()], "INVALID_REQUEST"),
    ("produce part not a pair", [packb([V, "produce", 23, {"parts": [["target"]]}]), a_batch()], "INVALID_REQUEST"),
    ("produce unhashable topic", [packb([V, "produce", 24, {"parts": [[["t"], 0]]}]), a_batch()], "INVALID_REQUEST"),
    ("produce more parts than batches", [packb([V, "produce", 25, {"parts": [["target", 0], ["target", 0]]}]),
                                         a_batch()], "INVALID_REQUEST"),
    ("produce more batches than parts", [packb([V, "produce", 26, {"parts": [["target", 0]]}]), a_batch(),
                                         a_batch()], "INVALID_REQUEST"),
    ("produce with no bulk frame", [packb([V, "produce", 27, {"parts": [["target", 0]]}])], "INVALID_REQUEST"),
    ("fetch args not a map", [packb([V, "fetch", 28, "all of it"])], "INVALID_REQUEST"),
    ("fetch part of wrong arity", [packb([V, "fetch", 29, {"parts": [["target", 0, 0]]}])], "INVALID_REQUEST"),
    ("fetch offset not a number", [packb([V, "fetch", 30, {"parts": [["target", 0, "zero", 100]]}])],
     "INVALID_REQUEST"),
    ("fetch max_wait_ms not a number", [packb([V, "fetch", 31, {"max_wait_ms": [], "parts": []}])],
     "INVALID_REQUEST"),
    ("fetch offset infinite", [packb([V, "fetch", 32, {"parts": [["target", 0, float("inf"), 100]]}])],
     "INVALID_REQUEST"),
    ("list_offsets parts not a list", [packb([V, "list_offsets", 33, {"parts": 5}])], "INVALID_REQUEST"),
    ("fetch with bulk frames", [packb([V, "fetch", 34, {"parts": []}]), b"x"], "INVALID_REQUEST"),
    ("epoch_end_offsets parts not a list", [packb([V, "epoch_end_offsets", 35, {"parts": 5}])], "INVALID_REQUEST"),
    ("epoch_end_offsets part of wrong arity", [packb([V, "epoch_end_offsets", 36, {"parts": [["target", 0, 1]]}])],
     "INVALID_REQUEST"),
    ("epoch_end_offsets epoch not a number",
     [packb([V, "epoch_end_offsets", 37, {"parts": [["target", 0, None, "one"]]}])], "INVALID_REQUEST"),
    ("epoch_end_offsets current epoch not a number",
     [packb([V, "epoch_end_offsets", 38, {"parts": [["target", 0, "one", 0]]}])], "INVALID_REQUEST"),
]

COORDINATOR_GARBAGE = [
    ("args not a map", [packb([V, "metadata", 40, [1]])], "INVALID_REQUEST"),
    ("metadata topics not a list", [packb([V, "metadata", 41, {"topics": 5}])], "INVALID_REQUEST"),
    ("metadata unhashable topic", [packb([V, "metadata", 42, {"topics": [[1]]}])], "INVALID_REQUEST"),
    ("create_topic without name", [packb([V, "create_topic", 43, {}])], "INVALID_REQUEST"),
    ("create_topic name not a string", [packb([V, "create_topic", 44, {"name": 5}])], "INVALID_REQUEST"),
    ("create_topic bad name", [packb([V, "create_topic", 45, {"name": "a b/c"}])], "INVALID_REQUEST"),
    ("create_topic partitions a string", [packb([V, "create_topic", 46, {"name": "x", "partitions": "many"}])],
     "INVALID_REQUEST"),
    ("create_topic zero partitions", [packb([V, "create_topic", 47, {"name": "x", "partitions": 0}])],
     "INVALID_REQUEST"),
    ("create_topic negative retention", [packb([V, "create_topic", 48, {"name": "x", "retention_ms": -1}])],
     "INVALID_REQUEST"),
    ("delete_topic name unhashable", [packb([V, "delete_topic", 49, {"name": [1]}])], "INVALID_REQUEST"),
    ("node_heartbeat node_id not a number", [packb([V, "node_heartbeat", 50, {"node_id": "abc", "address": "x"}])],
     "INVALID_REQUEST"),
    # A float node id that int() would turn into a number no reply can carry (the fuzzer found this one:
    # stored, it broke every later metadata reply).
    ("node_heartbeat node_id huge float", [packb([V, "node_heartbeat", 54, {"node_id": 1e300, "address": "x"}])],
     "INVALID_REQUEST"),
    ("node_heartbeat node_id out of range", [packb([V, "node_heartbeat", 55, {"node_id": 2 ** 40, "address": "x"}])],
     "INVALID_REQUEST"),
    ("metadata with bulk frames", [packb([V, "metadata", 51, {}]), b"bulk"], "INVALID_REQUEST"),
    ("create_topic existing", [packb([V, "create_topic", 52, {"name": "target"}])], "TOPIC_EXISTS"),
    ("delete_topic unknown", [packb([V, "delete_topic", 53, {"name": "nope"}])], "UNKNOWN_TOPIC"),
]


def still_serves(cluster, topic="target"):
    """A real producer and consumer still work through every node, and the coordinator answers."""
    with Producer(cluster.bootstrap) as producer:
        metadata = [producer.send(topic, b"after-%d" % p, partition=p).get(10) for p in range(2)]
    with Consumer(cluster.bootstrap, auto_offset_reset="latest") as consumer:
        consumer.assign([(topic, p) for p in range(2)])
        for m in metadata:
            consumer.seek((topic, m.partition), m.offset)
        got = []
        wait_for(lambda: got.extend(consumer.poll(timeout_ms=200)) or len(got) >= 2, 10, message="fetch")
        assert sorted(r.value for r in got) == [b"after-0", b"after-1"]


@pytest.mark.parametrize("server", ["node", "coordinator"])
def test_garbage_gets_an_error_reply_and_the_server_goes_on(rogue_cluster, context, server):
    address = rogue_cluster.node_address(1) if server == "node" else rogue_cluster.bootstrap
    specific = NODE_GARBAGE if server == "node" else COORDINATOR_GARBAGE
    sock = dealer(context, address)
    for name, frames, code, request_id in COMMON_GARBAGE + [(n, f, c, int(msgpack.unpackb(f[0])[2]))
                                                            for n, f, c in specific]:
        got_code, got_id = error_code(sock, frames)
        assert (got_code, got_id) == (code, request_id), name
    # A request id that is not a plain value is not echoed back.
    assert error_code(sock, [packb([V, "explode", {"id": 1}, {}])]) == ("INVALID_REQUEST", None)
    # The same socket still gets proper answers.
    header, _ = exchange(sock, [packb([V, "ping", 99, {}])])
    assert header[1:3] == [99, None]
    still_serves(rogue_cluster)


def test_per_partition_produce_errors(rogue_cluster, context):
    sock = dealer(context, rogue_cluster.node_address(1))
    corrupt = bytearray(a_batch(count=3))
    corrupt[-4] ^= 0x20
    truncated = a_batch()[:-2]
    parts = [["target", 0], ["target", 0], ["target", 0], ["target", 1], ["target", 7], ["nope", 0],
             ["target", "0"], ["target", 0]]
    # acks=all: answered once committed (replicated), so the fetch below, bound to the high watermark, sees it.
    header, _ = exchange(sock, [packb([V, "produce", 60, {"acks": "all", "parts": parts}]), bytes(corrupt), truncated,
                                a_batch(b"good"), a_batch(), a_batch(), a_batch(), a_batch(), b"\x00" * 10])
    assert header[2] is None
    codes = [part[0] for part in header[3]["parts"]]
    assert codes == ["CORRUPT_RECORD", "CORRUPT_RECORD", None, "NOT_LEADER", "UNKNOWN_PARTITION", "UNKNOWN_TOPIC",
                     "UNKNOWN_PARTITION", "CORRUPT_RECORD"]
    good_offset = header[3]["parts"][2][2]
    # Only the good batch was stored; the fetch returns it as it was produced, CRC intact.
    header, bulk = exchange(sock, [packb([V, "fetch", 61, {"parts": [["target", 0, good_offset, 1 << 20]]}])])
    assert header[2] is None and header[3]["parts"][0][2] is None
    batches = list(bf.iter_batches(bulk[0]))
    assert [h.base_offset for h, _ in batches] == [good_offset]
    assert bf.read_columns(batches[0][1], 1)[2] == [b"good"]
    # A fetch past the end is out of range, per partition.
    header, _ = exchange(sock, [packb([V, "fetch", 62, {"parts": [["target", 0, good_offset + 5, 100]]}])])
    assert header[3]["parts"][0][2] == "OFFSET_OUT_OF_RANGE"
    still_serves(rogue_cluster)


def test_abandoned_long_polls_and_oversized_messages_do_not_hurt(rogue_cluster, context):
    # Long-poll fetches whose clients vanish: the node drops the replies when they come due.
    sock = dealer(context, rogue_cluster.node_address(2))
    header, _ = exchange(sock, [packb([V, "list_offsets", 69, {"parts": [["target", 1, "latest"]]}])])
    end = header[3]["parts"][0][2]
    for _ in range(20):
        sock = dealer(context, rogue_cluster.node_address(2))
        sock.send_multipart([packb([V, "fetch", 70, {"max_wait_ms": 200, "parts": [["target", 1, end, 100]]}])])
        sock.send_multipart([packb([V, "fetch", 71, {"max_wait_ms": 300, "parts": []}])])
        sock.close(0)
    # A message over the coordinator's size limit: ZeroMQ drops that connection, nothing else.
    big = dealer(context, rogue_cluster.bootstrap)
    big.send_multipart([packb([V, "metadata", 72, {}]), b"x" * (17 << 20)])
    assert not big.poll(300)
    big.close(0)
    sock = dealer(context, rogue_cluster.node_address(2))
    header, _ = exchange(sock, [packb([V, "ping", 73, {}])])
    assert header[1:3] == [73, None]
    still_serves(rogue_cluster)
    assert rogue_cluster.coordinator.poll() is None
    assert all(p.poll() is None for p in rogue_cluster.nodes.values())


# -- a node on someone else's data directory ------------------------------------------------------

def start_node_process(cluster, node_id, data_dir, log_path):
    port = free_ports(1)[0]
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "nodes.node", "--node-id", str(node_id), "--data-dir", data_dir,
             "--bind", f"tcp://127.0.0.1:{port}", "--coordinator", cluster.bootstrap],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env())


def refused(proc, log_path, text):
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the node was not refused")
    log = open(log_path, errors="replace").read()
    assert proc.returncode != 0, log
    assert text in log, log
    assert "Traceback" not in log, log
    return log


def test_a_node_on_another_nodes_data_directory_is_refused(make_cluster, tmp_path):
    cluster = make_cluster(2)
    node1_dir = os.path.join(cluster.data_dir, "node-1")
    with Producer(cluster.bootstrap) as producer, Admin(cluster.bootstrap) as admin:
        admin.create_topic("kept", 2)
        producer.send("kept", b"safe", partition=0).get(10)

    # While node 1 runs: its directory is locked.
    proc = start_node_process(cluster, 3, node1_dir, tmp_path / "while.log")
    refused(proc, tmp_path / "while.log", "in use by another process")

    # After node 1 stopped: the directory still belongs to node 1, not to node 3.
    cluster.kill_node(1, sig=15)
    proc = start_node_process(cluster, 3, node1_dir, tmp_path / "after.log")
    refused(proc, tmp_path / "after.log", "belongs to node-1")

    # Node id 2 again, on a fresh directory, while node 2 is live elsewhere: the coordinator refuses it.
    proc = start_node_process(cluster, 2, str(tmp_path / "fresh"), tmp_path / "dup.log")
    refused(proc, tmp_path / "dup.log", "already live")

    # Node 1's data is untouched by all this.
    cluster.restart_node(1)
    with Consumer(cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([("kept", 0)])
        got = wait_for(lambda: consumer.poll(timeout_ms=200), 10, message="node 1's record")
        assert [r.value for r in got] == [b"safe"]


def test_a_coordinator_on_a_data_directory_in_use_is_refused(make_cluster, tmp_path):
    cluster = make_cluster(1)
    port = free_ports(1)[0]
    log_path = tmp_path / "coordinator.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodes.coordinator", "--data-dir", os.path.join(cluster.data_dir, "coordinator"),
             "--bind", f"tcp://127.0.0.1:{port}"], stdout=log_file, stderr=subprocess.STDOUT, env=child_env())
    refused(proc, log_path, "in use by another process")
