"""bus.aio on a real cluster: what only the asyncio client has to show (the shared behaviour is
tests/test_client_conformance.py's): send() never blocks the loop, even with the buffer full and the node
stopped; many sends in flight complete through one callback per batch; a cancelled poll loses nothing; and a
group member's liveness does not ride on the loop: a handler blocking it past the session timeout keeps its
partitions, while one that stops polling past max_poll_interval_ms is removed, with that reason recorded.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import bus
import bus.aio
from bus.errors import BufferFull


@pytest.fixture(scope="module")
def served(one_node):
    return one_node


def run(coroutine, timeout_s: float = 60):
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def create(cluster, topic: str, partitions: int) -> None:
    with bus.Admin(cluster.bootstrap) as admin:
        admin.create_topic(topic, partitions, exist_ok=True)


class LoopLag:
    """A task that ticks every ``interval_s`` and records the longest gap between ticks: how long anything
    blocked the loop."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.longest_s, self._task = interval_s, 0.0, None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.interval_s)
            now = loop.time()
            self.longest_s = max(self.longest_s, now - last - self.interval_s)
            last = now

    def __enter__(self):
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc):
        self._task.cancel()


def test_send_never_blocks_the_loop_with_the_buffer_full_and_the_node_stopped(served):
    topic = "aio-full"
    create(served, topic, 1)
    value = b"v" * 1000

    async def body():
        async with bus.aio.Producer(served.bootstrap, buffer_bytes=256 << 10, batch_bytes=32 << 10,
                                    max_record_bytes=16 << 10, linger_ms=1) as producer:
            await producer.send(topic, b"warm")  # the topic's partition count is known from here on
            served.pause_node(1)
            try:
                with LoopLag() as lag:
                    pending, slowest_send_s = [], 0.0
                    for i in range(2_000):  # ~2 MB: eight times the buffer
                        started = time.perf_counter()
                        pending.append(producer.send(topic, b"%06d" % i + value))
                        slowest_send_s = max(slowest_send_s, time.perf_counter() - started)
                        if i % 100 == 0:
                            await asyncio.sleep(0)
                    await asyncio.sleep(0.5)  # the node is stopped: the sync send() would block here
                    assert not pending[-1].done()
            finally:
                served.resume_node(1)
            offsets = [(await p).offset for p in pending]
        assert offsets == list(range(1, 2_001))  # every one written once, in order
        # A send() that blocked would have waited for the node (0.5 s at least); these bounds leave room for a
        # loaded machine's scheduling, not for that.
        assert slowest_send_s < 0.25, slowest_send_s
        assert lag.longest_s < 0.25, lag.longest_s

    run(body())


def test_deferred_sends_are_bounded_and_wait_for_room_is_the_backpressure(served):
    topic = "aio-bound"
    create(served, topic, 1)

    async def body():
        async with bus.aio.Producer(served.bootstrap) as producer:
            pending = [producer.send(topic, b"x") for _ in range(bus.aio.DEFERRED_SENDS_MAX)]  # topic unknown yet
            with pytest.raises(BufferFull, match="DEFERRED_SENDS_MAX"):
                producer.send(topic, b"one too many")
            await producer.flush()
            assert (await pending[-1]).offset == bus.aio.DEFERRED_SENDS_MAX - 1
        # A loop sending 16 times its buffer, awaiting wait_for_room() now and then, never meets the bound.
        async with bus.aio.Producer(served.bootstrap, buffer_bytes=1 << 20, batch_bytes=64 << 10,
                                    max_record_bytes=64 << 10) as producer:
            value = b"v" * 1000
            for chunk in range(16):
                pending = [producer.send(topic, value) for _ in range(1000)]
                assert producer.metrics()["sends_waiting"] <= 1000
                await producer.wait_for_room()
            await producer.flush()
            assert (await pending[-1]).offset == bus.aio.DEFERRED_SENDS_MAX + 16_000 - 1

    run(body())


def test_many_sends_in_flight_complete_with_one_callback_per_batch(served, monkeypatch):
    topic = "aio-many"
    create(served, topic, 4)
    settled = []
    settle = bus.aio._BatchWatch.settle
    monkeypatch.setattr(bus.aio._BatchWatch, "settle", lambda watch: (settled.append(watch), settle(watch)))

    async def body():
        async with bus.aio.Producer(served.bootstrap) as producer:
            await producer.send(topic, b"warm", partition=0)
            settled.clear()
            pending = [producer.send(topic, b"%d" % i, key=b"%d" % (i % 8)) for i in range(20_000)]
            results = await asyncio.gather(*pending)
        assert len(results) == 20_000 and all(m.offset >= 0 for m in results)
        batches = {p[0] for p in pending}
        assert len(settled) == len(batches) < 1_000  # one hop into the loop per batch, not per record
        assert {(m.partition, m.offset) for m in results} == {(p[0].partition, p[0].base_offset + p[1]) for p in pending}

    run(body())


def test_a_cancelled_poll_loses_no_record_and_a_waiting_poll_wakes_for_data(served):
    topic = "aio-cancel"
    create(served, topic, 1)

    async def body():
        async with bus.aio.Consumer(served.bootstrap, auto_offset_reset="earliest") as consumer:
            await consumer.assign([(topic, 0)])
            # A poll in the poll thread (as while a rebalance is to be acted on), cancelled while it waits.
            waiting = asyncio.ensure_future(consumer._poll_waiting_in_thread(3_000, 10_000))
            await asyncio.sleep(0.2)  # let it reach the poll thread; no records yet
            with bus.Producer(served.bootstrap) as producer:
                for i in range(50):
                    producer.send(topic, b"%d" % i)
                producer.flush()
            waiting.cancel()  # the thread's poll may have taken the records, or may take them now
            with pytest.raises(asyncio.CancelledError):
                await waiting
            got, deadline_s = [], asyncio.get_running_loop().time() + 10
            while len(got) < 50 and asyncio.get_running_loop().time() < deadline_s:
                got += await consumer.poll(timeout_ms=200)
            assert [r.value for r in got] == [b"%d" % i for i in range(50)]
            # A poll waiting in the loop is woken by the fetch that brings a record.
            waiting = asyncio.ensure_future(consumer.poll(timeout_ms=10_000))
            async with bus.aio.Producer(served.bootstrap) as producer:
                await producer.send(topic, b"late")
            assert [r.value for r in await asyncio.wait_for(waiting, 5)] == [b"late"]

    run(body())


GROUP_OPTIONS = dict(auto_offset_reset="earliest", session_timeout_ms=1_000, heartbeat_interval_ms=200,
                     enable_auto_commit=False)


def start_sync_member(cluster, topic: str, group: str, stop: threading.Event, assignments: list):
    """A sync group member polling in a thread; records every assignment it has."""
    consumer = bus.Consumer(cluster.bootstrap, topics=[topic], group=group, **GROUP_OPTIONS)

    def loop():
        while not stop.is_set():
            consumer.poll(timeout_ms=50)
            assignments.append(frozenset(consumer.assignment()))
        consumer.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_a_handler_blocking_the_loop_past_the_session_timeout_stays_a_member(served):
    topic, group = "aio-live", "aio-live"
    create(served, topic, 2)
    with bus.Producer(served.bootstrap) as producer:
        for i in range(4):
            producer.send(topic, b"%d" % i, partition=i % 2)
        producer.flush()
    stop, other_assignments = threading.Event(), []

    async def body():
        async with bus.aio.Consumer(served.bootstrap, topics=[topic], group=group, max_poll_interval_ms=30_000,
                                    **GROUP_OPTIONS) as consumer:
            # First alone, with both partitions; then the sync member joins and takes one.
            async for record in consumer:
                if len(consumer.assignment()) == 2:
                    break
            other = start_sync_member(served, topic, group, stop, other_assignments)
            try:
                loop = asyncio.get_running_loop()
                deadline_s = loop.time() + 20
                while not (len(consumer.assignment()) == 1 and other_assignments and len(other_assignments[-1]) == 1):
                    assert loop.time() < deadline_s, "the two members sharing the partitions"
                    await consumer.poll(timeout_ms=50)
                mine = set(consumer.assignment())
                member_id = consumer._sync._group.member_id
                seen = len(other_assignments)
                time.sleep(2.5)  # the handler blocks the loop for 2.5 sessions
                assert consumer._sync._group.member_id == member_id and consumer._sync._group.state == "member"
                await consumer.poll(timeout_ms=100)
                assert set(consumer.assignment()) == mine  # it kept its partition ...
                assert len(other_assignments) > seen  # ... while the other member polled on,
                assert all(len(a) == 1 for a in other_assignments[seen:])  # never given it
            finally:
                stop.set()
                other.join(10)
            assert not other.is_alive()

    run(body())


def test_a_handler_that_stops_polling_past_max_poll_interval_is_removed_with_that_reason(served):
    topic, group = "aio-stall", "aio-stall"
    create(served, topic, 1)
    with bus.Producer(served.bootstrap) as producer:
        producer.send(topic, b"one").get(timeout=10)

    async def body():
        lost = []
        async with bus.aio.Consumer(served.bootstrap, topics=[topic], group=group, max_poll_interval_ms=1_500,
                                    on_lost=lost.append, **GROUP_OPTIONS) as consumer:
            async for record in consumer:
                break
            member_id = consumer._sync._group.member_id
            time.sleep(2.5)  # past max_poll_interval_ms without polling (the heartbeats went on)
            async with bus.aio.Admin(served.bootstrap) as admin:
                described = await admin.describe_group(group)
            assert [e["reason"] for e in described["evictions"]] == ["max_poll_interval"]
            assert described["state"] == "empty"
            loop = asyncio.get_running_loop()
            deadline_s = loop.time() + 10
            while consumer.assignment() != {(topic, 0)} or consumer._sync._group.member_id == member_id:
                assert loop.time() < deadline_s, "rejoined"
                await consumer.poll(timeout_ms=100)
            assert lost == [[(topic, 0)]]

    run(body())
