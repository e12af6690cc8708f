"""Wire fuzzing: any sequence of frames sent to a node or to the coordinator gets an error reply or a valid
answer, the process never dies, and it goes on serving (a produce and a fetch work after every example).

Hypothesis builds messages at every level of the protocol: raw bytes, msgpack headers of the wrong shape,
well-formed headers with hostile arguments for every op (wrong types, missing keys, huge and negative
numbers, unknown topics), and bulk frames that are valid record batches, corrupted ones or garbage. Each
message goes out on a fresh DEALER, so a reply is matched to the message that caused it whatever request
id the fuzzer chose. Two messages legitimately get no reply: a produce with ``acks=0``, and a fetch that
long-polls for longer than we wait (its reply would come later); both are still sent, to exercise them.
"""

from __future__ import annotations

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus import Admin, Consumer, Producer, wire
from bus import batch as batch_format
from nodes.cluster import LocalCluster

CHECK_TOPIC = "fuzz-check"  # created before fuzzing; the fuzzer may not delete it
# How long to wait for a reply before calling the server silent: generous, since a loaded CI machine may
# stall a process for a while; it costs nothing when the reply comes.
REPLY_WAIT_MS = 10_000
LONG_POLL_MS = 1_500  # a fetch may wait this long for data before it must answer
NODE_OPS = [wire.PRODUCE, wire.FETCH, wire.LIST_OFFSETS, wire.PING]
COORDINATOR_OPS = [wire.METADATA, wire.CREATE_TOPIC, wire.DELETE_TOPIC, wire.NODE_HEARTBEAT, wire.INIT_PRODUCER_ID,
                   wire.GROUP_JOIN, wire.GROUP_HEARTBEAT, wire.GROUP_LEAVE, wire.OFFSET_COMMIT, wire.OFFSET_FETCH,
                   wire.GROUP_LIST, wire.GROUP_DESCRIBE, wire.GROUP_RESET_OFFSETS, wire.GROUP_DELETE, wire.PING]
_packb = msgpack.Packer(use_bin_type=True).pack

# -- strategies --------------------------------------------------------------------------------------

ints = st.integers(-(2 ** 63), 2 ** 64 - 1)  # everything msgpack can carry
junk = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True), st.text(max_size=12),
                 st.binary(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2))
def mostly(strategy, other=junk, one_in: int = 8):
    """``strategy``, and ``other`` about once in ``one_in`` draws (so most messages get past the first
    check and reach the handlers, where the interesting bugs are)."""
    return st.integers(1, one_in).flatmap(lambda i: other if i == 1 else strategy)


names = mostly(st.sampled_from([CHECK_TOPIC, CHECK_TOPIC, "g1"]),
              st.one_of(st.sampled_from(["fuzz-other", "", "x" * 300, "no spaces!"]), st.text(max_size=8)), 3)
small = st.one_of(st.integers(-3, 12), junk)
partition = mostly(st.integers(-1, 2))
offset = mostly(st.integers(-1, 20), st.one_of(ints, junk), 4)
tp = mostly(st.tuples(names, partition).map(list))


def _optional(**fields):
    """Args with these fields: all of them (well-typed or hostile values), or any subset; or junk."""
    return mostly(st.one_of(st.fixed_dictionaries(fields), st.fixed_dictionaries({}, optional=fields)))


ARGS = {
    # (PRODUCE is built with its bulk frames below: one batch per named partition, mostly.)
    wire.FETCH: _optional(parts=mostly(st.lists(mostly(
                              st.tuples(names, partition, offset, mostly(st.integers(-1, 1 << 20))).map(list)),
                              min_size=1, max_size=3)),
                          max_wait_ms=mostly(st.integers(-10, 30)), min_bytes=small,
                          max_bytes=mostly(st.integers(-1, 1 << 20))),
    wire.LIST_OFFSETS: _optional(parts=mostly(st.lists(mostly(
        st.tuples(names, partition, mostly(st.sampled_from(["earliest", "latest"]), offset, 3)).map(list)),
        min_size=1, max_size=3))),
    wire.PING: _optional(),
    wire.METADATA: _optional(topics=st.one_of(st.lists(names, max_size=3), junk), strict=junk),
    wire.CREATE_TOPIC: _optional(name=names, partitions=small, retention_ms=small, retention_bytes=small),
    wire.DELETE_TOPIC: _optional(name=names.filter(lambda n: n != CHECK_TOPIC)),
    # Node ids of nodes that do not exist: a fuzzer must not take over the real nodes' identities.
    wire.NODE_HEARTBEAT: _optional(node_id=st.one_of(st.integers(100, 103), junk), address=junk,
                                   instance=junk, version=junk),
    wire.INIT_PRODUCER_ID: _optional(),
    wire.GROUP_JOIN: _optional(group_id=names, client_id=junk, group_instance_id=junk,
                               topics=st.one_of(st.lists(names, max_size=3), junk), pattern=junk,
                               session_timeout_ms=small, assignor=junk, member_id=junk),
    wire.GROUP_HEARTBEAT: _optional(group_id=names, member_id=junk, member_epoch=small,
                                    owned=st.one_of(st.lists(tp, max_size=3), junk)),
    wire.GROUP_LEAVE: _optional(group_id=names, member_id=junk, member_epoch=small, reason=junk),
    wire.OFFSET_COMMIT: _optional(group_id=names, member_id=junk, member_epoch=small, offsets=st.one_of(
        st.lists(st.one_of(st.tuples(names, partition, offset, junk).map(list), junk), max_size=3), junk)),
    wire.OFFSET_FETCH: _optional(group_id=names, partitions=st.one_of(st.lists(tp, max_size=3), junk)),
    wire.GROUP_LIST: _optional(),
    wire.GROUP_DESCRIBE: _optional(group_id=names),
    wire.GROUP_RESET_OFFSETS: _optional(group_id=names, offsets=st.one_of(
        st.lists(st.one_of(st.tuples(names, partition, offset).map(list), junk), max_size=3), junk)),
    wire.GROUP_DELETE: _optional(group_id=names),
}


@st.composite
def batches(draw):
    """A record batch as a producer packs it; sometimes with a flipped bit or cut short."""
    count = draw(st.integers(1, 3))
    flat = []
    for _ in range(count):
        flat += [draw(st.one_of(st.none(), st.integers(1_700_000_000_000, 1_700_000_000_005))),
                 draw(st.one_of(st.none(), st.binary(max_size=8))), draw(st.binary(max_size=40)), None]
    packed = bytearray(batch_format.pack_batch(
        flat, count, draw(st.sampled_from([-1, 1, 2 ** 40])),
        draw(st.sampled_from([-1, 0, 1])), draw(st.sampled_from([-1, 0, 1, 7]))))
    damage = draw(st.sampled_from(["none", "none", "flip", "cut"]))
    if damage == "flip":
        at = draw(st.integers(0, len(packed) - 1))
        packed[at] ^= 1 << draw(st.integers(0, 7))
    elif damage == "cut":
        packed = packed[:draw(st.integers(0, len(packed) - 1))]
    return bytes(packed)


bulk = st.lists(st.one_of(batches(), st.binary(max_size=64)), max_size=3)


def _args_and_bulk(op):
    if op != wire.PRODUCE:
        return st.tuples(ARGS[op], mostly(st.just([]), bulk, 4))
    # A produce names partitions and carries one batch for each, mostly; sometimes the counts differ.
    matched = st.integers(0, 3).flatmap(lambda n: st.tuples(
        _optional(parts=st.lists(tp, min_size=n, max_size=n),
                  acks=mostly(st.sampled_from([1, 1, 0, -1, "all"]))),
        st.lists(mostly(batches(), st.binary(max_size=64), 4), min_size=n, max_size=n)))
    return mostly(matched, st.tuples(_optional(parts=st.lists(tp, max_size=4), acks=small), bulk), 4)


def messages(ops):
    """One request: a list of frames (what a DEALER sends; the ROUTER adds the identity)."""
    well_formed = st.sampled_from(ops).flatmap(lambda op: st.tuples(
        mostly(st.just(wire.VERSION)), st.just(op), mostly(st.integers(0, 2 ** 40)), _args_and_bulk(op))).map(
        lambda t: [_packb([t[0], t[1], t[2], t[3][0]]), *t[3][1]])
    wrong_op = st.tuples(st.one_of(st.text(max_size=12), junk), junk, bulk).map(
        lambda t: [_packb([wire.VERSION, t[0], 1, t[1]]), *t[2]])
    wrong_shape = st.tuples(junk, bulk).map(lambda t: [_packb(t[0]), *t[1]])
    raw = st.lists(st.binary(max_size=64), min_size=1, max_size=4)
    return mostly(well_formed, st.one_of(wrong_op, wrong_shape, raw), 4)


# -- the servers under test --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_cluster(tmp_path_factory):
    cluster = LocalCluster(str(tmp_path_factory.mktemp("fuzz")), 1).start()
    try:
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic(CHECK_TOPIC, 2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _may_stay_silent(frames) -> bool:
    """Whether the server may rightly send no reply (within REPLY_WAIT_MS) to this message."""
    try:
        version, op, _, args = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    except Exception:
        return False
    if version != wire.VERSION or not isinstance(args, dict):
        return False
    if op == wire.PRODUCE:
        return args.get("acks", 1) == 0  # acks=0: the client asked for no reply
    if op == wire.FETCH:
        try:  # the node's own reading of the long-poll wait (nodes/node.py)
            return int(args.get("max_wait_ms", 0)) > LONG_POLL_MS
        except Exception:
            return False
    return False


def _exchange(context, address, frames, wait_ms=REPLY_WAIT_MS):
    """Send one message on a fresh DEALER; its reply frames, or None if none came within ``wait_ms``."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        if not sock.poll(wait_ms):
            return None
        return sock.recv_multipart()
    finally:
        sock.close(0)


def _check_reply(frames, reply) -> None:
    request_id, error, result, _ = wire.decode_reply(reply)  # a valid reply, whatever was asked
    if error is not None:
        assert isinstance(error, list) and len(error) == 2, error
        code, message = error
        assert isinstance(code, str) and code and isinstance(message, str), error
    else:
        version, op, sent_id, _ = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        if not isinstance(sent_id, (int, str, bytes, type(None))):
            sent_id = None  # an id a reply cannot carry back is answered with none (nodes/server.py)
        assert version == wire.VERSION and request_id == sent_id, (request_id, sent_id)


def _fuzz(cluster, context, address, frames_list, process) -> None:
    for frames in frames_list:
        silent_ok = _may_stay_silent(frames)
        reply = _exchange(context, address, frames, 100 if silent_ok else REPLY_WAIT_MS)
        if reply is None:
            assert silent_ok, f"no reply to {frames!r}"
        else:
            _check_reply(frames, reply)
        assert process().poll() is None, f"the server died on {frames!r}"
    # Still serving: a well-formed ping after the fuzzed sequence is answered.
    reply = _exchange(context, address, wire.encode_request(wire.PING, 7, {}))
    assert reply is not None and wire.decode_reply(reply)[1] is None, f"not serving after {frames_list!r}"


SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(frames_list=st.lists(messages(NODE_OPS + [wire.METADATA]), min_size=1, max_size=4))
def test_node_answers_every_message(fuzz_cluster, context, frames_list):
    _fuzz(fuzz_cluster, context, fuzz_cluster.node_address(1), frames_list, lambda: fuzz_cluster.nodes[1])


@SETTINGS
@given(frames_list=st.lists(messages(COORDINATOR_OPS + [wire.PRODUCE]), min_size=1, max_size=4))
def test_coordinator_answers_every_message(fuzz_cluster, context, frames_list):
    _fuzz(fuzz_cluster, context, fuzz_cluster.bootstrap, frames_list, lambda: fuzz_cluster.coordinator)


def test_the_cluster_still_serves_after_the_fuzzing(fuzz_cluster):
    """Runs after the fuzz tests (file order): both processes alive, and a produce + fetch round trip."""
    assert fuzz_cluster.coordinator.poll() is None and fuzz_cluster.nodes[1].poll() is None
    with Producer(fuzz_cluster.bootstrap) as producer:
        offsets = [producer.send(CHECK_TOPIC, b"after-fuzz-%d" % p, partition=p).get(10).offset for p in (0, 1)]
    with Consumer(fuzz_cluster.bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=100) as consumer:
        consumer.assign([(CHECK_TOPIC, 0), (CHECK_TOPIC, 1)])
        for p, o in zip((0, 1), offsets):
            consumer.seek((CHECK_TOPIC, p), o)
        seen = {}
        for _ in range(50):
            for record in consumer.poll(200):
                seen[record.partition] = record.value
            if len(seen) == 2:
                break
    assert seen == {0: b"after-fuzz-0", 1: b"after-fuzz-1"}
