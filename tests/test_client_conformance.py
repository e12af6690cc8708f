"""One test body, two clients: every test here runs against the sync client (bus.Producer, bus.Consumer,
bus.Admin) and the asyncio one (bus.aio), on one real cluster, and must see the same outcomes.

The bodies are written against bus.aio's API (``await consumer.poll()``, ``await send(...)``); for the sync
client, ``SyncAsAio`` wraps each call in a finished awaitable, blocking the test's loop, which is fine
here: the loop runs nothing else. Which calls are awaited is the aio classes' own choice (the
``AWAITED`` sets below are checked against them).
"""

from __future__ import annotations

import asyncio
import inspect

import pytest

import bus
import bus.aio
from bus.errors import ClosedError, ConfigError, InvalidRecord, OffsetOutOfRange, UnknownTopic

PRODUCER_AWAITED = {"flush", "close", "wait_for_room"}
CONSUMER_AWAITED = {"poll", "assign", "subscribe", "unsubscribe", "commit", "committed", "position",
                    "partitions_for_topic", "offsets_for_times", "beginning_offsets", "end_offsets", "close"}
ADMIN_AWAITED = {"create_topic", "delete_topic", "list_topics", "nodes", "describe_topic", "elect_unclean",
                 "list_groups", "describe_group", "reset_offsets", "delete_group", "group_offsets", "close"}


class _Done:
    """An awaitable of a value (or an error) the sync call already produced."""

    def __init__(self, fn, *args, **kwargs):
        try:
            self.value, self.error = fn(*args, **kwargs), None
        except Exception as exc:
            self.value, self.error = None, exc

    def __await__(self):
        if self.error is not None:
            raise self.error
        return self.value
        yield  # a generator: __await__ must return an iterator


class SyncAsAio:
    """A sync client with bus.aio's surface: the ``awaited`` calls return awaitables; ``send`` returns one of
    its RecordFuture's outcome; ``async for`` iterates ``poll()``; ``async with`` closes."""

    def __init__(self, client, awaited: set):
        self._client, self._awaited = client, awaited

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if name in self._awaited:
            return lambda *args, **kwargs: _Done(attr, *args, **kwargs)
        if name == "send":
            def send(*args, **kwargs):
                return _Done(attr(*args, **kwargs).get, 30)  # input errors raise here, as aio's send() does

            return send
        return attr

    async def __aiter__(self):
        while True:
            try:
                records = self._client.poll(timeout_ms=200)
            except ClosedError:
                return
            for record in records:
                yield record

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self._client.close()


def test_the_awaited_calls_are_the_aio_classes_coroutines():
    for cls, awaited in ((bus.aio.Producer, PRODUCER_AWAITED), (bus.aio.Consumer, CONSUMER_AWAITED),
                         (bus.aio.Admin, ADMIN_AWAITED)):
        coroutines = {name for name, fn in inspect.getmembers(cls, inspect.iscoroutinefunction)
                      if not name.startswith("_")}
        assert coroutines == awaited, cls


@pytest.fixture(scope="module")
def served(one_node):
    return one_node


class Clients:
    def __init__(self, kind: str, bootstrap: str):
        self.kind, self.bootstrap = kind, bootstrap

    def producer(self, **options):
        if self.kind == "aio":
            return bus.aio.Producer(self.bootstrap, **options)
        return SyncAsAio(bus.Producer(self.bootstrap, **options), PRODUCER_AWAITED)

    def consumer(self, *args, **options):
        if self.kind == "aio":
            return bus.aio.Consumer(self.bootstrap, *args, **options)
        return SyncAsAio(bus.Consumer(self.bootstrap, *args, **options), CONSUMER_AWAITED)

    def admin(self):
        if self.kind == "aio":
            return bus.aio.Admin(self.bootstrap)
        return SyncAsAio(bus.Admin(self.bootstrap), ADMIN_AWAITED)


@pytest.fixture(params=["sync", "aio"])
def clients(request, served):
    return Clients(request.param, served.bootstrap)


def conforms(body):
    """A test of both clients: ``async def test_x(clients, topic)`` run in a fresh loop, with a topic name of
    its own for each client (``conf-<test>-<kind>``)."""
    def test(clients):
        topic = f"conf-{body.__name__.removeprefix('test_')[:40]}-{clients.kind}"
        asyncio.run(asyncio.wait_for(body(clients, topic), 60))

    test.__name__, test.__doc__ = body.__name__, body.__doc__
    return test


async def poll_until(consumer, count: int, timeout_s: float = 20) -> list:
    """Poll until ``count`` records came (a deadline, not a sleep)."""
    got: list = []
    loop = asyncio.get_running_loop()
    deadline_s = loop.time() + timeout_s
    while len(got) < count:
        assert loop.time() < deadline_s, f"{len(got)} of {count} records within {timeout_s} s"
        got += await consumer.poll(timeout_ms=200)
    return got


async def create(clients, topic: str, partitions: int) -> None:
    async with clients.admin() as admin:
        await admin.create_topic(topic, partitions, exist_ok=True)


async def load(clients, topic: str, partitions: int, count: int) -> None:
    """A topic of ``partitions`` holding ``count`` records b"0", b"1", ... spread over them in turn."""
    await create(clients, topic, partitions)
    async with clients.producer() as producer:
        for i in range(count):
            producer.send(topic, b"%d" % i, partition=i % partitions)
        await producer.flush()


@conforms
async def test_produce_consume_in_order_with_keys_headers_and_tombstones(clients, topic):
    await create(clients, topic, 3)
    await create(clients, topic, 3)  # exist_ok: no error the second time
    async with clients.producer() as producer:
        pending = [producer.send(topic, b"%d" % i, key=b"k%d" % (i % 5), headers=[("n", b"%d" % i)])
                   for i in range(300)]
        tombstone = producer.send(topic, None, key=b"k0")
        await producer.flush()
        metadata = [await p for p in pending]
        assert (await tombstone).offset >= 0
    assert all(m.topic == topic and m.offset >= 0 for m in metadata)
    async with clients.consumer(auto_offset_reset="earliest") as consumer:
        await consumer.assign([(topic, p) for p in range(3)])
        records = await poll_until(consumer, 301)
    by_partition: dict = {}
    for r in records:
        by_partition.setdefault(r.partition, []).append(r)
    for partition, rs in by_partition.items():
        assert [r.offset for r in rs] == list(range(len(rs)))  # consecutive, in order
        assert len({r.key for r in rs if r.key is not None}) <= 5
    values = [r.value for r in records if r.value is not None]
    assert sorted(values, key=int) == [b"%d" % i for i in range(300)]
    assert [r.key for r in records if r.value is None] == [b"k0"]
    assert all(r.headers == [("n", r.value)] for r in records if r.value is not None)
    sent = {(m.partition, m.offset) for m in metadata}
    assert sent <= {(r.partition, r.offset) for r in records}


@conforms
async def test_seek_pause_resume_and_positions(clients, topic):
    await load(clients, topic, 2, 20)
    async with clients.consumer(auto_offset_reset="earliest") as consumer:
        await consumer.assign([(topic, 0), (topic, 1)])
        assert len(await poll_until(consumer, 20)) == 20
        assert await consumer.position((topic, 0)) == 10
        consumer.seek((topic, 0), 7)
        consumer.pause([(topic, 1)])
        assert consumer.paused() == {(topic, 1)}
        consumer.seek((topic, 1), 0)
        again = await poll_until(consumer, 3)
        assert [(r.partition, r.offset) for r in again] == [(0, 7), (0, 8), (0, 9)]
        assert await consumer.poll(timeout_ms=100) == []  # partition 1 is paused
        consumer.resume([(topic, 1)])
        assert [r.offset for r in await poll_until(consumer, 10)] == list(range(10))
        assert await consumer.end_offsets([(topic, 0)]) == {(topic, 0): 10}
        assert await consumer.partitions_for_topic(topic) == {0, 1}
        assert await consumer.partitions_for_topic("no-such-topic") is None


@conforms
async def test_group_commit_and_committed_offsets_resume_the_next_member(clients, topic):
    group = topic
    options = dict(group=group, auto_offset_reset="earliest", session_timeout_ms=1_500,
                   heartbeat_interval_ms=200, enable_auto_commit=False)
    await load(clients, topic, 2, 10)
    async with clients.consumer(topics=[topic], **options) as consumer:
        assert consumer.subscription() == {topic}
        records = await poll_until(consumer, 10)
        assert sorted(r.value for r in records) == sorted(b"%d" % i for i in range(10))
        assert consumer.assignment() == {(topic, 0), (topic, 1)}
        committed = await consumer.commit({(topic, 0): 3, (topic, 1): 5})
        assert committed == {(topic, 0): 3, (topic, 1): 5}
        assert await consumer.committed((topic, 0)) == 3
    async with clients.consumer(topics=[topic], **options) as consumer:
        again = await poll_until(consumer, 2)  # partition 0 from 3 (offsets 3, 4); partition 1 from 5, its end
        assert sorted((r.partition, r.offset) for r in again) == [(0, 3), (0, 4)]
    async with clients.admin() as admin:
        described = await admin.describe_group(group)
        assert described["state"] == "empty"  # each member left on close


@conforms
async def test_bad_input_is_a_typed_error_and_loses_nothing(clients, topic):
    await create(clients, topic, 1)
    async with clients.producer() as producer:
        await producer.send(topic, b"first")  # the topic is known from here on
        with pytest.raises(InvalidRecord, match="value must be bytes"):
            producer.send(topic, "a str")
        with pytest.raises(InvalidRecord, match="headers"):
            producer.send(topic, b"v", headers=42)
        with pytest.raises(UnknownTopic):
            await producer.send("conf-no-such-topic", b"v")
        assert (await producer.send(topic, b"second")).offset == 1  # nothing lost, nothing queued in between
    async with clients.consumer(auto_offset_reset="none") as consumer:
        await consumer.assign([(topic, 0)])
        with pytest.raises(OffsetOutOfRange):
            await consumer.poll(timeout_ms=100)
        consumer.seek((topic, 0), 0)
        assert [r.value for r in await poll_until(consumer, 2)] == [b"first", b"second"]
        with pytest.raises(ConfigError):
            consumer.pause([("not-assigned", 0)])
        with pytest.raises(ConfigError):
            await consumer.commit()  # no group


@conforms
async def test_every_call_after_close_is_a_closed_error(clients, topic):
    admin = clients.admin()
    await admin.create_topic(topic, 1, exist_ok=True)
    await admin.close()
    await admin.close()  # twice: nothing
    with pytest.raises(ClosedError):
        await admin.list_topics()
    producer = clients.producer()
    await producer.send(topic, b"v")
    await producer.close()
    await producer.close()
    with pytest.raises(ClosedError):
        await producer.send(topic, b"after close")
    consumer = clients.consumer(auto_offset_reset="earliest")
    await consumer.assign([(topic, 0)])
    assert len(await poll_until(consumer, 1)) == 1
    await consumer.close()
    await consumer.close()
    with pytest.raises(ClosedError):
        await consumer.poll(timeout_ms=10)
    with pytest.raises(ClosedError):
        consumer.seek((topic, 0), 0)
    with pytest.raises(ClosedError):
        await consumer.assign([(topic, 0)])
    assert [r async for r in consumer] == []  # iterating a closed consumer just ends


@conforms
async def test_metrics_count_what_was_sent_fetched_and_consumed_and_the_lag(clients, topic):
    await create(clients, topic, 1)
    async with clients.producer() as producer:
        assert producer.metrics()["records_sent"] == 0
        for i in range(100):
            producer.send(topic, b"%03d" % i)
        await producer.flush()
        sent = producer.metrics()
        assert sent["records_sent"] == 100 and sent["bytes_sent"] >= 300
        assert 1 <= sent["requests_sent"] and 1 <= sent["batches_sent"] <= 100
        assert sent["record_errors"] == sent["batch_errors"] == sent["retries"] == 0
        # (the buffer is released just after a batch completes: not asserted here, it may be a batch behind)
        assert sent["requests_in_flight"] == 0 and sent["buffer_bytes_total"] == 64 << 20
        assert sent["batch_records_avg"] == 100 / sent["batches_sent"]
        async with clients.consumer(auto_offset_reset="earliest") as consumer:
            await consumer.assign([(topic, 0)])
            assert len(await poll_until(consumer, 100)) == 100
            got = consumer.metrics()
            assert got["records_consumed"] == 100 and got["bytes_fetched"] >= 300 and got["fetch_requests"] >= 1
            assert got["fetch_errors"] == 0 and got["lag"] == {(topic, 0): 0}
            for i in range(10):  # ten more, fetched but not polled: a lag of ten
                producer.send(topic, b"late")
            await producer.flush()
            loop = asyncio.get_running_loop()
            deadline_s = loop.time() + 10
            while consumer.metrics()["lag"] != {(topic, 0): 10}:
                assert loop.time() < deadline_s, consumer.metrics()
                await asyncio.sleep(0.02)
            assert consumer.metrics()["records_lag_max"] == 10
