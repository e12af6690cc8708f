"""Redis Streams as a peer of the bench, run on the same workload as the bus.

``redis-server`` is started by the bench (``RedisServer``) and driven through redis-py with hiredis, used
the way its documentation recommends for throughput: ``appendonly yes`` with ``appendfsync always`` for
``sync="always"`` (``no`` for ``"none"``). Produce: pipelines of ``XADD`` (``REDIS_PIPELINE_RECORDS_MAX``),
one pipeline in flight per producer. Consume: ``XREADGROUP COUNT 1000``, with the previous read's ``XACK``
in the same round trip. Latency: the same, the reader blocking up to ``REDIS_BLOCK_MS``. A record is one
stream field ``v``; partitions are separate streams.

Public face: ``REDIS`` (a ``results.System``, built by ``peer.peer_system()``) and ``check_redis()``, which
raises ``PeerUnavailable`` with the install command when the server or redis-py is missing. This module
imports redis only inside functions, so the bench runs without it.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from array import array
from typing import Any

from .harness import Gate, wait_toward
from .peer import PeerServer, free_port, paced_start, peer_system, send_time_ns, server_exe, stamp, wait_ready
from .results import BenchConfig, BenchError, ClientReport, PeerUnavailable, record_partition

REDIS_SERVER_INSTALL = "apt-get install redis-server"
REDIS_PIPELINE_RECORDS_MAX = 1000  # XADDs per pipeline
REDIS_READ_COUNT = 1000  # entries per XREADGROUP
REDIS_BLOCK_MS = 100  # latency mode: how long XREADGROUP waits for new entries
REDIS_GROUP = "bench"


def check_redis() -> None:
    server_exe("redis-server", REDIS_SERVER_INSTALL)
    try:
        import redis  # noqa: F401
    except ImportError:
        raise PeerUnavailable("redis-py not installed: pip install redis hiredis") from None


def _redis_stream(partition: int) -> str:
    return f"bench-{partition}"


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
            server_exe("redis-server", REDIS_SERVER_INSTALL),
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
            wait_ready(self._proc, client.ping, log, "redis-server", (OSError, redis.exceptions.ConnectionError))
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
    values = itertools.cycle(cfg.client_values(index))
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
                pipe.execute_command("XADD", stream, "*", "v", next(values))
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
                        lat.append(now_wall - send_time_ns(fields[b"v"]))
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
    tails = cfg.latency_tails(index)
    report = ClientReport(0, 0, 0)
    try:
        per_pipeline = min(REDIS_PIPELINE_RECORDS_MAX, cfg.batch_records)
        pacer, wall_offset_ns = paced_start(gate, report, cfg, rate_per_s, count, per_pipeline)
        while not pacer.done:
            batch = pacer.take(time.monotonic_ns())
            if batch is None:
                wait_toward(pacer.next_deadline_ns())
                continue
            pipe = r.pipeline(transaction=False)
            for k in batch:
                stream = _redis_stream(record_partition(k, index, cfg.partitions))
                value = stamp(pacer.due_ns(k) + wall_offset_ns, tails[k % len(tails)])
                pipe.execute_command("XADD", stream, "*", "v", value)
            pipe.execute()
            report.records += len(batch)
        report.end_ns = time.monotonic_ns()
        report.extra.update(pacer.lateness())
        return report
    finally:
        r.close()


REDIS = peer_system("redis", check_redis, RedisServer, redis_produce_client, redis_consume_client,
                    redis_latency_consume_client, redis_latency_produce_client)
