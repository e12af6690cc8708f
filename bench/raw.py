"""The raw ceiling: the best pyzmq + LMDB can do in Python, with none of the bus's logic.

The bus's figures are read as ratios against these, so this must be the honest best case of the same
parts: a DEALER client process pipelines msgpack-packed batches to a ROUTER server process, which drains
everything waiting on its socket, appends each batch as one LMDB value in one write transaction, commits
(fsynced when ``sync="always"``) and only then acks. No checksums, epochs, sequences, coordinator,
retries or record headers: each of those is a cost the bus pays and this does not.

Wire (frame 0 is a fixed struct, big-endian; a ROUTER sees the peer's identity frame in front)::

    produce  client -> server   PRODUCE  "P", request_id u64, partition u16;  frame 1: the batch
    ack      server -> client   ACK      "A", request_id u64, base_offset i64  (sent after the commit)
    fetch    client -> server   FETCH    "F", request_id u64, partition u16, offset i64,
                                         max_bytes u32, max_wait_ms i32
    data     server -> client   DATA     "D", request_id u64, next_offset i64;  frames 1..: batches

A batch is one msgpack array of record values (bin), packed once per batch by the producer.

On disk: one LMDB environment, one named database per partition (``p0``, ``p1``, ...); a batch is one
value under the 8-byte big-endian offset of its first record, written with ``append=True``, so keys are
in offset order and every put goes to the rightmost leaf. A fetch from ``offset`` (always a batch
boundary) positions a cursor with ``set_range`` and returns whole batches up to ``max_bytes`` (at least
one); if none are there yet the fetch is parked until data arrives or ``max_wait_ms`` passes.

Public face: ``run_produce(cfg)``, ``run_consume(cfg)``, ``run_latency(cfg, rate_per_s)`` and ``SYSTEM``.
This module must never import the bus: the ceiling does not move when the bus changes.
"""

from __future__ import annotations

import struct
import time
import traceback
from array import array
from typing import Any

import msgpack

from .harness import Gate, reap, run_clients, scratch_dir, storage_notes, wait_toward
from .pacer import Pacer
from .results import (
    SEND_TIME,
    BenchConfig,
    BenchError,
    ClientReport,
    Result,
    System,
    assign_partitions,
    build_result,
    expected_per_partition,
    latency_result,
    record_partition,
    split,
)

SYSTEM_NAME = "raw"

PRODUCE = struct.Struct(">cQH")
ACK = struct.Struct(">cQq")
FETCH = struct.Struct(">cQHqIi")
DATA = struct.Struct(">cQq")
KEY = struct.Struct(">Q")

DRAIN_MESSAGES_MAX = 1024  # messages taken off the socket in one loop turn (one write transaction)
DRAIN_BYTES_MAX = 64 << 20  # ... and their payload bytes
FETCH_BYTES_MIN = 4 << 20  # a fetch asks for at least this much (and at least one batch size)
FETCH_WAIT_MS = 100  # how long an empty fetch is parked on the server
SOCKET_HWM = 1000  # messages queued per socket before zmq pushes back
REPLY_TIMEOUT_S = 60.0  # a client waiting this long for any reply gives up loudly
SERVER_START_TIMEOUT_S = 30.0
MAP_SIZE_MIN = 1 << 30


def array_len(buf: Any) -> int:
    """Elements in the msgpack array that ``buf`` starts with (read from its header, O(1))."""
    b0 = buf[0]
    if 0x90 <= b0 <= 0x9F:
        return b0 & 0x0F
    if b0 == 0xDC:
        return int.from_bytes(buf[1:3], "big")
    if b0 == 0xDD:
        return int.from_bytes(buf[1:5], "big")
    raise BenchError(f"batch is not a msgpack array (first byte {b0:#x})")


def map_size_for(payload_bytes: int) -> int:
    """LMDB map size (address space, not disk) for a run storing ``payload_bytes``, with room for overhead."""
    return max(MAP_SIZE_MIN, 4 * payload_bytes + (256 << 20))


# --------------------------------------------------------------------------------------------------------------
# The server process


def _serve(data_dir: str, sync: str, partitions: int, map_size: int, control: Any) -> None:
    """Server process body: reports its port on ``control``, serves until ``control`` says stop or closes."""
    try:
        _serve_loop(data_dir, sync, partitions, map_size, control)
    except BaseException:
        try:
            control.send(("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001 - the parent is gone; nothing more to tell
            pass
        raise


def _serve_loop(data_dir: str, sync: str, partitions: int, map_size: int, control: Any) -> None:
    import lmdb
    import zmq

    durable = sync == "always"
    # Opened here, in the spawned process, never inherited (STYLE: open environments after fork).
    env = lmdb.open(
        data_dir,
        map_size=map_size,
        max_dbs=partitions,
        sync=durable,
        metasync=durable,
        writemap=False,  # with sync, writemap would flush the whole map
        readahead=False,
    )
    env.reader_check()
    dbs = [env.open_db(b"p%d" % p) for p in range(partitions)]
    next_offset = [0] * partitions  # offset the next batch of each partition gets
    with env.begin() as txn:
        for p, db in enumerate(dbs):
            cur = txn.cursor(db=db)
            if cur.last():
                next_offset[p] = KEY.unpack(cur.key())[0] + array_len(cur.value())

    zctx = zmq.Context()
    sock = zctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
    sock.setsockopt(zmq.RCVHWM, SOCKET_HWM)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    control.send(("port", port))

    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(control.fileno(), zmq.POLLIN)
    parked: list[tuple[int, bytes, int, int, int, int]] = []  # (deadline_ns, ident, req, part, offset, max_bytes)

    def reply(frames: list) -> None:
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:  # the client went away: drop its reply
                raise

    try:
        while True:
            if parked:
                wait_ms = max(0, min(p[0] for p in parked) - time.monotonic_ns()) // 1_000_000 + 1
            else:
                wait_ms = 1000
            ready = dict(poller.poll(wait_ms))
            if control.fileno() in ready:
                return  # "stop", or the parent closed the pipe: either way we are done

            produces = []  # (ident, request_id, partition, frame)
            fetches = []  # as parked
            taken = taken_bytes = 0
            while taken < DRAIN_MESSAGES_MAX and taken_bytes < DRAIN_BYTES_MAX:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                taken += 1
                ident, head = frames[0].bytes, frames[1].bytes
                op = head[:1]
                if op == b"P":
                    _, req, part = PRODUCE.unpack(head)
                    produces.append((ident, req, part, frames[2]))
                    taken_bytes += len(frames[2])
                elif op == b"F":
                    _, req, part, offset, max_bytes, max_wait_ms = FETCH.unpack(head)
                    deadline = time.monotonic_ns() + max_wait_ms * 1_000_000
                    fetches.append((deadline, ident, req, part, offset, max_bytes))
                else:
                    raise BenchError(f"unknown op {op!r}")

            if produces:
                acks = []
                # One write transaction per loop turn: a group commit of everything that was waiting.
                with env.begin(write=True) as txn:
                    for ident, req, part, frame in produces:
                        buf = frame.buffer
                        base = next_offset[part]
                        if not txn.put(KEY.pack(base), buf, append=True, db=dbs[part]):
                            raise BenchError(f"append refused at partition {part} offset {base}")
                        next_offset[part] = base + array_len(buf)
                        acks.append((ident, ACK.pack(b"A", req, base)))
                # The commit (and its fsync, with sync="always") happened on leaving the block: ack now.
                for ident, ack in acks:
                    reply([ident, ack])

            if fetches or parked:
                now = time.monotonic_ns()
                waiting = parked + fetches
                parked = []
                with env.begin() as txn:
                    for item in waiting:
                        deadline, ident, req, part, offset, max_bytes = item
                        if next_offset[part] <= offset and now < deadline:
                            parked.append(item)
                            continue
                        batches, nxt = _read_batches(txn, dbs[part], offset, max_bytes)
                        reply([ident, DATA.pack(b"D", req, nxt), *batches])
    finally:
        sock.close(0)
        zctx.term()
        env.close()


def _read_batches(txn: Any, db: Any, offset: int, max_bytes: int) -> tuple[list[bytes], int]:
    """Whole batches from ``offset`` up to ``max_bytes`` (at least one if any), and the offset after them."""
    cur = txn.cursor(db=db)
    out: list[bytes] = []
    if not cur.set_range(KEY.pack(offset)):
        return out, offset
    size = 0
    nxt = offset
    for key, value in cur.iternext():
        if out and size + len(value) > max_bytes:
            break
        base = KEY.unpack(key)[0]
        if not out and base != offset:
            raise BenchError(f"fetch at {offset} is not a batch boundary (next batch starts at {base})")
        out.append(value)
        size += len(value)
        nxt = base + array_len(value)
    return out, nxt


class RawServer:
    """The raw server in its own spawned process, for a ``with`` block; always stopped and reaped."""

    def __init__(self, cfg: BenchConfig, data_dir: str, map_size: int):
        self.cfg = cfg
        self.data_dir = data_dir
        self.map_size = map_size
        self.endpoint = ""
        self.pid = 0
        self._proc: Any = None
        self._conn: Any = None

    def __enter__(self) -> RawServer:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve,
            args=(self.data_dir, self.cfg.sync, self.cfg.partitions, self.map_size, child),
            name="bench-raw-server",
            daemon=True,
        )
        try:
            self._proc.start()
            child.close()
            if not self._conn.poll(SERVER_START_TIMEOUT_S):
                raise BenchError("raw server did not start")
            try:
                kind, value = self._conn.recv()
            except EOFError:
                raise BenchError("raw server exited while starting") from None
            if kind != "port":
                raise BenchError(f"raw server failed to start:\n{value}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.endpoint = f"tcp://127.0.0.1:{value}"
        self.pid = self._proc.pid
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._conn.send(("stop", None))
        except (OSError, EOFError, ValueError):
            pass
        try:
            reap([self._proc])
        finally:
            self._conn.close()


# --------------------------------------------------------------------------------------------------------------
# Client processes


def _dealer(endpoint: str) -> tuple[Any, Any]:
    import zmq

    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
    sock.setsockopt(zmq.RCVHWM, SOCKET_HWM)
    sock.connect(endpoint)
    return zctx, sock


def _await_reply(sock: Any) -> None:
    if not sock.poll(int(REPLY_TIMEOUT_S * 1000)):
        raise BenchError(f"no reply from the raw server within {REPLY_TIMEOUT_S} s")


def produce_client(endpoint: str, cfg: BenchConfig, index: int, count: int, gate: Gate) -> ClientReport:
    """Send ``count`` records as full batches, ``inflight_batches_max`` in flight, round robin over partitions."""
    import zmq

    zctx, sock = _dealer(endpoint)
    pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
    full = cfg.client_values(index)[: cfg.batch_records]  # one batch of distinct values, sent again and again
    per_partition = [0] * cfg.partitions
    inflight: dict[int, tuple[int, int]] = {}  # request_id -> (sent at ns, records)
    report = ClientReport(0, 0, 0, latency_counts=array("q"))
    sent = acked = batch_no = 0
    try:
        report.start_ns = gate.wait()
        while acked < count:
            while sent < count and len(inflight) < cfg.inflight_batches_max:
                n = min(cfg.batch_records, count - sent)
                part = (batch_no + index) % cfg.partitions
                payload = pack(full if n == len(full) else full[:n])  # packed once per batch
                inflight[batch_no] = (time.monotonic_ns(), n)
                sock.send_multipart([PRODUCE.pack(b"P", batch_no, part), payload], copy=False)
                per_partition[part] += n
                batch_no += 1
                sent += n
            _await_reply(sock)
            while True:
                try:
                    head = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now = time.monotonic_ns()
                _, req, _base = ACK.unpack(head)
                t0, n = inflight.pop(req)
                acked += n
                report.latencies_ns.append(now - t0)
                report.latency_counts.append(n)
                report.add_event(now, n)
                report.end_ns = now
        report.records = acked
        report.extra["per_partition"] = per_partition
        return report
    finally:
        sock.close(0)
        zctx.term()


def consume_client(endpoint: str, cfg: BenchConfig, parts: list[int], expected: list[int], gate: Gate) -> ClientReport:
    """Read ``expected[i]`` records from each partition ``parts[i]``, unpacking every batch.

    One fetch is outstanding per partition, and the next one is sent as soon as a reply arrives, before
    unpacking it, so the server reads while the client unpacks. In latency mode (records carry their send
    time) each record's end-to-end latency is taken when its batch arrives.
    """
    return _consume(endpoint, cfg, parts, expected, gate, latency=False)


def latency_consume_client(
    endpoint: str, cfg: BenchConfig, parts: list[int], expected: list[int], gate: Gate
) -> ClientReport:
    return _consume(endpoint, cfg, parts, expected, gate, latency=True)


def _consume(
    endpoint: str, cfg: BenchConfig, parts: list[int], expected: list[int], gate: Gate, latency: bool
) -> ClientReport:
    zctx, sock = _dealer(endpoint)
    unpackb = msgpack.unpackb
    max_bytes = max(FETCH_BYTES_MIN, cfg.batch_bytes)
    want = dict(zip(parts, expected))
    got = {p: 0 for p in parts}
    outstanding: dict[int, int] = {}  # request_id -> partition
    report = ClientReport(0, 0, 0)
    lat = report.latencies_ns
    req = 0
    budget_s = cfg.timeout_s

    def fetch(part: int, offset: int) -> None:
        nonlocal req
        sock.send(FETCH.pack(b"F", req, part, offset, max_bytes, FETCH_WAIT_MS))
        outstanding[req] = part
        req += 1

    try:
        report.start_ns = gate.wait()
        give_up = report.start_ns + int(budget_s * 1e9)
        for p in parts:
            if want[p] > 0:
                fetch(p, 0)
        while outstanding:
            _await_reply(sock)
            frames = sock.recv_multipart()
            now_wall = time.time_ns()
            now = time.monotonic_ns()
            _, r, nxt = DATA.unpack(frames[0])
            part = outstanding.pop(r)
            if nxt < want[part]:
                if now > give_up:
                    raise BenchError(f"partition {part}: {nxt} of {want[part]} records after {budget_s} s")
                fetch(part, nxt)  # prefetch before unpacking
            n = 0
            for batch in frames[1:]:
                records = unpackb(batch)
                n += len(records)
                if latency:
                    for value in records:
                        lat.append(now_wall - SEND_TIME.unpack_from(value)[0])
            if n:
                got[part] += n
                report.records += n
                report.add_event(now, n)
                report.end_ns = now
        short = {p: (got[p], want[p]) for p in parts if got[p] != want[p]}
        if short:
            raise BenchError(f"records received != expected per partition: {short}")
        return report
    finally:
        sock.close(0)
        zctx.term()


def latency_produce_client(
    endpoint: str, cfg: BenchConfig, index: int, count: int, rate_per_s: float, gate: Gate
) -> ClientReport:
    """Offer ``count`` records at ``rate_per_s``, each carrying its due time (wall clock) in its first 8 bytes."""
    import zmq

    zctx, sock = _dealer(endpoint)
    pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
    tails = cfg.latency_tails(index)
    inflight: dict[int, int] = {}  # request_id -> records
    report = ClientReport(0, 0, 0)
    req = 0
    acked = 0
    try:
        start = gate.wait()
        wall0 = time.time_ns()
        report.start_ns = start
        pacer = Pacer(rate_per_s, count, int(cfg.linger_ms * 1e6), cfg.batch_records, start)
        while acked < count:
            while len(inflight) < cfg.inflight_batches_max:
                batch = pacer.take(time.monotonic_ns())
                if batch is None:
                    break
                by_part: dict[int, list[bytes]] = {}
                for k in batch:
                    sent_at = wall0 + (pacer.due_ns(k) - start)
                    part = record_partition(k, index, cfg.partitions)
                    by_part.setdefault(part, []).append(SEND_TIME.pack(sent_at) + tails[k % len(tails)])
                for part, values in by_part.items():
                    sock.send_multipart([PRODUCE.pack(b"P", req, part), pack(values)], copy=False)
                    inflight[req] = len(values)
                    req += 1
            deadline = pacer.next_deadline_ns()
            if deadline is None or len(inflight) >= cfg.inflight_batches_max:
                wait_ms = int(REPLY_TIMEOUT_S * 1000)
            else:
                # Acks as they come, but never past the next record's due time: a poll's timeout is whole
                # milliseconds, so within 2 ms of it the wait is wait_toward's, as every system's producer's.
                wait_ms = (deadline - time.monotonic_ns()) // 1_000_000 - 1
                if wait_ms <= 0 and not sock.poll(0):
                    wait_toward(deadline)
                    continue
                wait_ms = max(0, wait_ms)
            if sock.poll(wait_ms):
                while True:
                    try:
                        head = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    acked += inflight.pop(ACK.unpack(head)[1])
            elif deadline is None or len(inflight) >= cfg.inflight_batches_max:
                raise BenchError(f"no ack from the raw server within {REPLY_TIMEOUT_S} s")
        report.end_ns = time.monotonic_ns()
        report.records = acked
        report.extra.update(pacer.lateness())
        return report
    finally:
        sock.close(0)
        zctx.term()


# --------------------------------------------------------------------------------------------------------------
# Runners


def run_produce(cfg: BenchConfig) -> Result:
    """Produce ``cfg.records`` records; measured from the first send to the last ack."""
    cfg.validate()
    with scratch_dir(cfg, SYSTEM_NAME) as d:
        with RawServer(cfg, d, map_size_for(cfg.records * cfg.record_bytes)) as srv:
            clients = [
                (produce_client, (srv.endpoint, cfg, j, n)) for j, n in enumerate(split(cfg.records, cfg.producers))
            ]
            reports, usage = run_clients(clients, [srv.pid], cfg.timeout_s)
        notes = storage_notes(d, cfg.sync)
        return build_result(SYSTEM_NAME, "produce", cfg, reports, usage, latency_kind="ack", notes=notes)


def run_consume(cfg: BenchConfig) -> Result:
    """Store ``cfg.records`` records (not measured), then read them all back; measured first fetch to last record."""
    cfg.validate()
    with scratch_dir(cfg, SYSTEM_NAME) as d:
        with RawServer(cfg, d, map_size_for(cfg.records * cfg.record_bytes)) as srv:
            load = [
                (produce_client, (srv.endpoint, cfg, j, n)) for j, n in enumerate(split(cfg.records, cfg.producers))
            ]
            loaded, _ = run_clients(load, [srv.pid], cfg.timeout_s)
            stored = [sum(r.extra["per_partition"][p] for r in loaded) for p in range(cfg.partitions)]
            clients = [
                (consume_client, (srv.endpoint, cfg, parts, [stored[p] for p in parts]))
                for parts in assign_partitions(cfg.partitions, cfg.consumers)
            ]
            reports, usage = run_clients(clients, [srv.pid], cfg.timeout_s)
        return build_result(SYSTEM_NAME, "consume", cfg, reports, usage, notes=storage_notes(d, cfg.sync))


def run_latency(cfg: BenchConfig, rate_per_s: float | None = None) -> Result:
    """Offer records at ``rate_per_s`` (default ``cfg.latency_rate``) for ``cfg.latency_seconds``; measure each
    record's end-to-end latency, send (its due time) to receipt by a consumer."""
    cfg.validate()
    rate = float(rate_per_s or cfg.latency_rate)
    total = cfg.latency_records(rate)
    per_producer = split(total, cfg.producers)
    per_partition = expected_per_partition(per_producer, cfg.partitions)
    with scratch_dir(cfg, SYSTEM_NAME) as d:
        with RawServer(cfg, d, map_size_for(total * cfg.record_bytes)) as srv:
            consumers = [
                (latency_consume_client, (srv.endpoint, cfg, parts, [per_partition[p] for p in parts]))
                for parts in assign_partitions(cfg.partitions, cfg.consumers)
            ]
            producers = [
                (latency_produce_client, (srv.endpoint, cfg, j, n, rate / cfg.producers))
                for j, n in enumerate(per_producer)
            ]
            reports, usage = run_clients(consumers + producers, [srv.pid], cfg.timeout_s)
        k = len(consumers)
        return latency_result(SYSTEM_NAME, cfg, rate, reports[:k], reports[k:], usage, storage_notes(d, cfg.sync))


SYSTEM = System(SYSTEM_NAME, run_produce, run_consume, run_latency)
