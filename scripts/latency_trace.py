"""One record's latency, hop by hop: where the time between ``send()`` and ``poll()`` goes.

    python scripts/latency_trace.py [--rate 5000] [--seconds 5] [--replication-factor 1] [--acks all] [--sync none]

Starts a local cluster (a coordinator and ``--replication-factor`` nodes, fsync on every commit, as the
bench runs it), a producer process (``linger_ms=0``) offering 100-byte records at ``--rate`` as the
bench's latency mode does, and a consumer process reading them by ``assign()``. Every process stamps the
wall clock (``time.time_ns()``, one clock for every process of the machine) when a record passes a hop,
keyed by the record's due time (its first 8 bytes, as in the bench); the script matches the stamps and
prints each hop's p50 / p90 / p99 in milliseconds:

    due          the pacer's due time; the producer calls send() at it
    sent         send() returned
    packed       the producer's sender thread packed the record's batch (the hop between the two threads)
    wired        the sender handed the produce request to its socket (the wait for a request in flight to end)
    turn         the leader's loop began the turn that took the request (the wire, and the wait for the loop)
    received     the turn had taken every request waiting on its socket
    node_in      the turn reached the produce request (the requests before it in the turn: fetches, produces)
    commit_from  the turn's group commit began (the rest of the turn before it)
    committed    the commit and its fsyncs ended
    fetch_out    the leader answered the consumer's fetch holding the record (parked, or at once)
    fetched      the consumer's fetcher thread handed the record to the consumer's buffer
    polled       poll() returned it (the hop between the fetcher thread and the poll thread)
    produce_out  (beside the path) the leader answered the produce request
    acked        (beside the path) the producer's callback ran for the record

The stamps are taken by subclassing and wrapping the real parts in this script's processes (the node
through ``LocalCluster``'s ``node_command``): no code of the bus changes for it. Decoding each batch to find
its records' due times is left to the end of the run; what the stamps cost on the way (a clock read and a
copy of each batch) is a microsecond or two per request.
"""

from __future__ import annotations

import argparse
import bisect
import multiprocessing
import os
import struct
import sys
import tempfile
import time
import uuid

import msgpack

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEND_TIME = struct.Struct(">q")
VALUE_BYTES = 100
PATH = ["due", "sent", "packed", "wired", "turn", "received", "node_in", "commit_from", "committed", "fetch_out", "fetched", "polled"]


class Stamps:
    """(hop, due_ns, at_ns) rows, written to ``path`` as msgpack when the process ends. Batches are kept as
    bytes and decoded only then, so finding their due times costs the traced process nothing on the way."""

    def __init__(self, path: str):
        self.path, self.rows, self.batches = path, [], []
        # A leader's: (base offset, batch bytes) of what it appended, and (hop, end offset, at_ns) events that
        # every record below the end offset passed (a follower's fetch reporting its log end, the high
        # watermark moving), matched to due times at the end as the batches are.
        self.appended, self.offset_rows = [], []

    def add(self, hop: str, dues, at_ns: int | None = None) -> None:
        at_ns = time.time_ns() if at_ns is None else at_ns
        self.rows.extend((hop, due, at_ns) for due in dues)

    def add_batches(self, hop: str, buf, at_ns: int) -> None:
        """The records of ``buf`` (concatenated bus batches) passed ``hop`` at ``at_ns``."""
        if len(buf):
            self.batches.append((hop, bytes(buf), at_ns))

    def write(self) -> None:
        for hop, buf, at_ns in self.batches:
            self.add(hop, batch_dues(buf), at_ns)
        offsets = []  # (offset, due) of every record appended, in offset order
        for base, buf in sorted(self.appended, key=lambda a: a[0]):
            offsets.extend(enumerate(batch_dues(buf), base))
        passed: dict[str, int] = {}  # hop -> how many of ``offsets`` have passed it
        ends = [offset for offset, _ in offsets]
        for hop, end, at_ns in sorted(self.offset_rows, key=lambda r: r[2]):
            upto = bisect.bisect_left(ends, end)
            self.add(hop, [due for _, due in offsets[passed.get(hop, 0):upto]], at_ns)
            passed[hop] = max(passed.get(hop, 0), upto)
        with open(self.path, "wb") as f:
            msgpack.pack(self.rows, f)


def batch_dues(buf) -> list[int]:
    """The due times of the records in a concatenation of bus batches."""
    from bus.batch import iter_batches, read_columns

    dues = []
    for header, payload in iter_batches(buf):
        values = read_columns(payload, header.record_count, header.attributes)[2]
        dues.extend(SEND_TIME.unpack_from(v)[0] for v in values if v is not None and len(v) >= 8)
    return dues


# -- the node ------------------------------------------------------------------------------------------------

def run_traced_node(argv: list[str]) -> None:
    from nodes import node as node_module

    stamps = Stamps(os.environ["BUS_TRACE_DIR"] + f"/node-{os.getpid()}.msgpack")

    class TracedNode(node_module.Node):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            append = self.store.append

            def timed_append(flat):
                out = append(flat)
                self._trace_committed_ns = time.time_ns()
                return out

            self.store.append = timed_append

        def serve_forever(self):
            serve_turn = self.server.serve_turn

            def traced_serve_turn(*args, **kwargs):
                self._trace_turn_ns = time.time_ns()
                return serve_turn(*args, **kwargs)

            self.server.serve_turn = traced_serve_turn
            recv_batch = self.server._recv_batch

            def traced_recv_batch():
                out = recv_batch()
                self._trace_received_ns = time.time_ns()
                return out

            self.server._recv_batch = traced_recv_batch
            super().serve_forever()

        def _produce(self, request):
            now_ns = time.time_ns()
            for buf in request.bulk:
                stamps.add_batches("turn", buf, self._trace_turn_ns)
                stamps.add_batches("received", buf, self._trace_received_ns)
                stamps.add_batches("node_in", buf, now_ns)
            return super()._produce(request)

        def _commit(self, produces):
            started_ns = time.time_ns()
            self._trace_committed_ns = None
            bufs = [(buf, results, index) for *_, results, items in produces for index, _, buf in items]
            super()._commit(produces)
            for buf, results, index in bufs:
                stamps.add_batches("commit_from", buf, started_ns)
                if self._trace_committed_ns is not None:
                    stamps.add_batches("committed", buf, self._trace_committed_ns)
                if results[index] is not None and results[index][0] is None and not results[index][3]:
                    stamps.appended.append((results[index][2], bytes(buf)))

        # R > 1: the follower round, per follower (the hop names carry the follower's node id).
        def _replica_fetch(self, request):
            now_ns = time.time_ns()
            follower = request.args["replica_id"]
            for part in request.args["parts"]:
                stamps.offset_rows.append((f"rf_report@{follower}", int(part[3]), now_ns))
            answer = super()._replica_fetch(request)
            if isinstance(answer, node_module.Reply):  # answered at once (else parked: _answer)
                for buf in answer.bulk:
                    stamps.add_batches(f"rf_out@{follower}", buf, time.time_ns())
            return answer

        def _high_watermark_moved(self, tp):
            super()._high_watermark_moved(tp)
            if self.replicas[tp].role == node_module.LEADER:
                stamps.offset_rows.append(("hw", self.replicas[tp].high_watermark, time.time_ns()))

        def _replica_fetched(self, link, error, result, bulk):
            now_ns = time.time_ns()
            super()._replica_fetched(link, error, result, bulk)
            stored_ns = time.time_ns()
            for buf in bulk:
                stamps.add_batches(f"rf_in@{self.node_id}", buf, now_ns)
                stamps.add_batches(f"rf_stored@{self.node_id}", buf, stored_ns)

        def _fetch(self, request):
            answer = super()._fetch(request)
            if isinstance(answer, node_module.Reply):  # answered at once (else parked: _answer)
                for buf in answer.bulk:
                    stamps.add_batches("fetch_out", buf, time.time_ns())
            return answer

        def _answer(self, request, result, bulk=(), error=None):
            now_ns = time.time_ns()
            for buf in (bulk if request.op == "fetch" else request.bulk if request.op == "produce" else ()):
                stamps.add_batches(f"{request.op}_out", buf, now_ns)
            if request.op == "replica_fetch":
                for buf in bulk:
                    stamps.add_batches(f"rf_out@{request.args['replica_id']}", buf, now_ns)
            super()._answer(request, result, bulk, error)

        def close(self):
            super().close()
            stamps.write()

    node_module.main(argv, node_class=TracedNode)


# -- the clients ---------------------------------------------------------------------------------------------

def produce(bootstrap: str, topic: str, rate_per_s: float, count: int, acks, trace_dir: str, start_at_ns: int,
            options: dict) -> None:
    from bench.harness import wait_toward
    from bus import Producer
    from bus import sender as sender_module

    stamps = Stamps(f"{trace_dir}/producer.msgpack")
    pack_batch = sender_module.pack_batch

    def traced_pack_batch(flat, record_count, *args, **kwargs):
        stamps.add("packed", [SEND_TIME.unpack_from(v)[0] for v in flat[2::4]])
        return pack_batch(flat, record_count, *args, **kwargs)

    sender_module.pack_batch = traced_pack_batch
    send_request = sender_module.Sender._send_request

    def traced_send_request(self, node_id, connection, batches, now_s):
        send_request(self, node_id, connection, batches, now_s)
        stamps.add("wired", [SEND_TIME.unpack_from(v)[0] for b in batches for v in b.flat[2::4]])

    sender_module.Sender._send_request = traced_send_request
    tail = os.urandom(VALUE_BYTES - SEND_TIME.size)
    with Producer(bootstrap, linger_ms=0, acks=acks, **options) as producer:
        producer._partitions(topic)  # the topic's metadata before the clock starts, as the bench does
        while time.time_ns() < start_at_ns:
            time.sleep(0.001)
        interval_ns = int(1e9 / rate_per_s)
        for k in range(count):
            due = start_at_ns + k * interval_ns
            while (wait_ns := due - time.time_ns()) > 0:
                wait_toward(time.monotonic_ns() + wait_ns)  # as the bench's producers wait
            future = producer.send(topic, SEND_TIME.pack(due) + tail, partition=0)
            stamps.add("sent", (due,))
            future.add_callback(lambda _md, _error, due=due: stamps.add("acked", (due,)))
        producer.flush()
    stamps.write()


def consume(bootstrap: str, topic: str, count: int, trace_dir: str, ready) -> None:
    from bus import Consumer
    from bus import consumer as consumer_module

    stamps = Stamps(f"{trace_dir}/consumer.msgpack")
    fetched = consumer_module.Consumer._fetched

    def traced_fetched(self, parts):
        parts = list(parts)
        now_ns = time.time_ns()
        for part in parts:
            stamps.add_batches("fetched", part[3], now_ns)
        return fetched(self, parts)

    consumer_module.Consumer._fetched = traced_fetched
    got = 0
    with Consumer(bootstrap) as consumer:
        consumer.assign([(topic, 0)])
        consumer.seek((topic, 0), 0)
        ready.set()
        deadline_s = time.monotonic() + 120
        while got < count and time.monotonic() < deadline_s:
            records = consumer.poll(timeout_ms=100)
            now_ns = time.time_ns()
            stamps.add("polled", [SEND_TIME.unpack_from(r.value)[0] for r in records], now_ns)
            got += len(records)
    stamps.write()


# -- the run and its report ----------------------------------------------------------------------------------

def percentiles_ms(values: list[int]) -> tuple[float, float, float]:
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))] / 1e6  # noqa: E731
    return pick(0.5), pick(0.9), pick(0.99)


def report(trace_dir: str, warmup_s: float) -> None:
    at: dict[str, dict[int, int]] = {}
    for name in os.listdir(trace_dir):
        with open(os.path.join(trace_dir, name), "rb") as f:
            for hop, due, at_ns in msgpack.unpack(f):
                at.setdefault(hop, {}).setdefault(due, at_ns)  # the first time a record passes a hop
    dues = sorted(at.get("polled", {}))
    if not dues:
        raise SystemExit("no record reached poll(): nothing to report")
    dues = [d for d in dues if d >= dues[0] + int(warmup_s * 1e9)]  # leave out the start (connections, metadata)
    at["due"] = {d: d for d in dues}
    print(f"{len(dues)} records traced (after a {warmup_s:g} s warm-up)\n")
    print(f"{'hop':<26} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")

    def row(name: str, start: str, end: str) -> None:
        deltas = [at[end][d] - at[start][d] for d in dues if d in at.get(start, {}) and d in at.get(end, {})]
        if deltas:
            print(f"{name:<26} " + " ".join(f"{v:8.3f}" for v in percentiles_ms(deltas)))

    for start, end in zip(PATH, PATH[1:]):
        row(f"{start} -> {end}", start, end)
    followers = sorted({hop.split("@")[1] for hop in at if hop.startswith("rf_in@")})
    for f in followers:
        chain = ["committed", f"rf_out@{f}", f"rf_in@{f}", f"rf_stored@{f}", f"rf_report@{f}"]
        for start, end in zip(chain, chain[1:]):
            row(f"{start} -> {end}".replace(f"@{f}", ""), start, end)
        row(f"  (follower node {f})", chain[0], chain[-1])
    if followers:
        row("committed -> hw", "committed", "hw")
    row("due -> polled (end to end)", "due", "polled")
    row("fetch_out -> produce_out", "fetch_out", "produce_out")
    row("produce_out -> acked", "produce_out", "acked")
    row("due -> acked", "due", "acked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=5000, help="records per second")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--replication-factor", type=int, default=1)
    parser.add_argument("--acks", default="all", help='0, 1 or "all"')
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--sync", choices=["always", "none"], default="always",
                        help="none: the nodes commit without fsync, leaving the software's own hops")
    parser.add_argument("--producer-option", action="append", default=[], metavar="NAME=INT",
                        help="a Producer option to set, e.g. max_in_flight_per_node=5 (repeatable)")
    args = parser.parse_args()
    acks = args.acks if args.acks == "all" else int(args.acks)
    count = int(args.rate * args.seconds)
    options = {name: int(value) for name, value in (o.split("=", 1) for o in args.producer_option)}

    from bus import Admin
    from nodes.cluster import LocalCluster

    with tempfile.TemporaryDirectory(prefix="bus-trace-") as tmp:
        trace_dir = os.path.join(tmp, "stamps")
        os.mkdir(trace_dir)
        os.environ["BUS_TRACE_DIR"] = trace_dir
        cluster = LocalCluster(os.path.join(tmp, "cluster"), args.replication_factor, sync=args.sync,
                               node_command=(os.path.abspath(__file__), "node"))
        with cluster:
            topic = f"trace-{uuid.uuid4().hex[:8]}"
            with Admin(cluster.bootstrap) as admin:
                admin.create_topic(topic, 1, replication_factor=args.replication_factor)
                deadline_s = time.monotonic() + 30
                while not all(p["end_offset"] is not None and not p["under_replicated"]
                              for p in admin.describe_topic(topic)["partitions"]):
                    if time.monotonic() > deadline_s:
                        raise SystemExit("the topic was not served within 30 s")
                    time.sleep(0.02)
            spawn = multiprocessing.get_context("spawn")
            ready = spawn.Event()
            reader = spawn.Process(target=consume, args=(cluster.bootstrap, topic, count, trace_dir, ready))
            reader.start()
            try:
                if not ready.wait(30):
                    raise SystemExit("the consumer did not start within 30 s")
                start_at_ns = time.time_ns() + int(1e9)
                writer = spawn.Process(target=produce, args=(cluster.bootstrap, topic, args.rate, count, acks,
                                                             trace_dir, start_at_ns, options))
                writer.start()
                writer.join(args.seconds + 60)
                reader.join(60)
            finally:
                for p in (reader, locals().get("writer")):
                    if p is not None and p.is_alive():
                        p.kill()
                        p.join()
        print(f"rate {args.rate:g}/s for {args.seconds:g} s, R={args.replication_factor}, acks={args.acks}, sync={args.sync}, "
              f"linger_ms=0, {VALUE_BYTES}-byte records; load average {os.getloadavg()[0]:.1f}")
        report(trace_dir, args.warmup_s)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        run_traced_node(sys.argv[2:])
    else:
        main()
