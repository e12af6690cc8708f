"""bus.aio: the Producer, Consumer and Admin for asyncio, with the sync classes' options, errors and guarantees.

Each wraps the synchronous client of the same name and drives the same parts: the producer's accumulator and
sender thread (batching, in-flight windows, retries, idempotent sequences), the consumer's positions, seek
epochs and fetcher thread, the group member and its heartbeat thread. So every socket and every wait for
the network stays off the event loop, and a group member's liveness never rides on it: a handler that
blocks the loop past ``session_timeout_ms`` is not expelled, while ``max_poll_interval_ms`` still guards
progress (docs/architecture.md, "The clients").

What must never happen here: a call that blocks the event loop on I/O. What runs in the loop's thread is
only what the sync client does from memory: ``send()`` appending to an open batch, ``poll()`` taking
records already fetched, ``seek()``, ``pause()``. Anything that may wait on the network (a metadata lookup,
buffer space, a commit, an offset fetch, a rebalance's reconciliation, ``flush()``, ``close()``) runs in the
client's own worker thread and is awaited.

Completions cross into the loop once per batch or fetch, never once per record: a produce reply completes
a batch in the sender thread, whose one callback (``loop.call_soon_threadsafe``) wakes every task awaiting
one of its records; a poll with nothing buffered awaits the consumer's notification, which the fetcher
gives once per reply that brings data.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import re
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar

from . import admin as _admin, consumer as _consumer, fork_guard, producer as _producer
from .errors import BufferFull, ClosedError
from .producer import Headers, ProducerBatch, RecordFuture
from .records import (CommitCallback, CommitOffsets, K, KeyIn, PartitionMap, Partitions, Record, RecordMetadata,
                      TopicPartition, V, ValueIn)

_P = ParamSpec("_P")
_R = TypeVar("_R")
_Self = TypeVar("_Self", bound="_Closing")
_Sync = TypeVar("_Sync")
_Aio = TypeVar("_Aio")

# Sends that must wait before the sync producer takes them (the first records of a topic whose partition
# count is being looked up, or a buffer with less room than the largest record): beyond this many, send()
# raises BufferFull at once rather than hold records without bound. send() cannot block the loop, so this
# queue is what stands for the sync send()'s wait of up to max_block_ms; a loop that sends faster than the
# cluster takes awaits Producer.wait_for_room() now and then.
DEFERRED_SENDS_MAX = 100_000
# A poll waiting in the loop for records looks again at least this often (a rebalance to act on, an error, a
# close: the notifications that wake it at once are the fetch replies').
WAIT_SLICE_MS = 50

# A send's arguments, as bus.Producer.send takes them: (topic, value, key, headers, partition, timestamp_ms).
# Generic in ValueIn and KeyIn, in that order (the order they appear in).
_SendArguments = tuple[str, ValueIn | None, KeyIn | None, Headers | None, int | None, int | None]


def _wrapping(sync_class: Callable[_P, _Sync]
              ) -> Callable[[Callable[[_Aio, _Sync], None]], Callable[Concatenate[_Aio, _P], None]]:
    """The constructor of an aio client from ``init(self, sync)``, which takes the sync client it wraps: it
    takes ``sync_class``'s own arguments, typed, defaults and all (for the checkers through the ParamSpec,
    for help() and inspect through ``__signature__``), makes that client with them and hands it to ``init``.
    So the sync classes alone hold the options and their defaults, and an unknown one is the sync
    constructor's TypeError, before anything starts."""
    def decorate(init: Callable[[_Aio, _Sync], None]) -> Callable[Concatenate[_Aio, _P], None]:
        def __init__(self: _Aio, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
            init(self, sync_class(*args, **kwargs))

        __init__.__qualname__, __init__.__doc__ = init.__qualname__, init.__doc__
        # inspect reads a function's __signature__ first; typeshed's functions do not declare one.
        __init__.__signature__ = inspect.signature(getattr(sync_class, "__init__"))  # type: ignore[attr-defined]
        return __init__
    return decorate


def _worker(name: str, threads: int = 1) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)


class _BatchWatch:
    """The loop futures waiting on one ProducerBatch; settled in the loop by the batch's one callback."""

    __slots__ = ("loop", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.waiters: list[asyncio.Future[None]] = []

    def settle(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()


class PendingRecord(Protocol):
    """What ``Producer.send()`` returns: awaited, the record's RecordMetadata (or its error); ``done()`` says
    whether it is settled. A RecordFuture, or a send queued behind others (_DeferredSend)."""

    def done(self) -> bool: ...

    def __await__(self) -> Generator[Any, None, RecordMetadata]: ...


class _DeferredSend:
    """A send() that had to wait (see Producer): awaiting it awaits its turn in the queue, then its record."""

    __slots__ = ("_queued", "_producer")

    def __init__(self, queued: asyncio.Future[RecordFuture], producer: Producer[Any, Any]) -> None:
        self._queued, self._producer = queued, producer

    def done(self) -> bool:
        queued = self._queued
        return queued.done() and (queued.cancelled() or queued.exception() is not None
                                  or queued.result()[0].done.is_set())

    def __await__(self) -> Generator[Any, None, RecordMetadata]:
        record_future = yield from asyncio.shield(self._queued).__await__()
        return (yield from record_future.__await__())


class _Closing:
    """``async with`` for the clients below: closes on the way out."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: _Self) -> _Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Producer(_Closing, Generic[KeyIn, ValueIn]):
    """bus.Producer for asyncio: the same keyword options (``help(bus.Producer)``), errors and guarantees.

    ``send()`` is a plain call that never blocks the loop and returns an awaitable of RecordMetadata, so many
    records are in flight at once::

        async with bus.aio.Producer(bootstrap) as producer:
            pending = [producer.send("audit", b"%d" % i) for i in range(1000)]
            await producer.flush()
            print(await pending[0])

    Its input checks raise at once, as the sync send()'s do. A send that must wait (the first record of a
    topic, whose partition count is looked up; a full buffer) is queued on the producer's worker thread, in
    order with the sends after it, and its errors (UnknownTopic, BufferFull after ``max_block_ms``) come
    when it is awaited.
    """

    @_wrapping(_producer.Producer)
    def __init__(self, sync: _producer.Producer[KeyIn, ValueIn]) -> None:
        self._sync = sync
        self._sync._on_new_batch = self._watch
        self._worker = _worker("bus-aio-producer")
        # Sends waiting to be handed to the sync producer, in order: [(send's arguments, loop future of its
        # RecordFuture)]; and the task that hands them over.
        self._deferred: deque[tuple[_SendArguments[ValueIn, KeyIn], asyncio.Future[RecordFuture]]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        fork_guard.register(self)

    @property
    def bootstrap(self) -> str:
        return self._sync.bootstrap

    def send(self, topic: str, value: ValueIn | None, key: KeyIn | None = None, headers: Headers | None = None,
             partition: int | None = None, timestamp_ms: int | None = None) -> PendingRecord:
        """Queue one record (the arguments of ``bus.Producer.send``); returns its RecordFuture, to be awaited
        for its RecordMetadata (not get(): that would block the loop). Call it from the event loop's thread.

        Not a coroutine (nothing to warn about when it is never awaited: sends are fire-and-forget until
        ``flush()``) and not a loop future per record: the sync send()'s own future, whose batch's watch
        wakes the tasks awaiting it (``RecordFuture.__await__``)."""
        # The hot path, once per record: the sync send() when it cannot block (the topic known, room for the
        # largest record, nothing queued before it). Each batch gets its watch as it opens (_watch).
        sync = self._sync
        try:
            inline = (not self._deferred and not self._closed and sync._free_bytes >= sync._record_bytes_max
                      and topic in sync._partition_counts)
        except TypeError:  # an unhashable topic: the sync send() names it
            inline = True
        if not inline:
            if self._closed:
                raise ClosedError("send() on a closed Producer")
            return self._send_deferred((topic, value, key, headers, partition, timestamp_ms))
        return sync.send(topic, value, key, headers, partition, timestamp_ms)

    def _send_deferred(self, args: _SendArguments[ValueIn, KeyIn]) -> _DeferredSend:
        """Queue a send behind those already waiting (in order: a partition's records keep their order)."""
        if len(self._deferred) >= DEFERRED_SENDS_MAX:
            raise BufferFull(f"{DEFERRED_SENDS_MAX} sends are waiting for metadata or buffer space "
                             "(bus.aio.DEFERRED_SENDS_MAX); the record was not sent")
        loop = self._running_loop()
        queued: asyncio.Future[RecordFuture] = loop.create_future()
        self._deferred.append((args, queued))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain_deferred())
        return _DeferredSend(queued, self)

    async def _drain_deferred(self) -> None:
        """Hand the waiting sends to the sync producer in order, in the loop's thread, each once it cannot
        block: a topic not known yet is looked up in the worker thread (once: the sends after it find it
        known), and while the buffer has less room than the largest record this waits in the loop for the
        sender to release some (``Producer._space``'s notification), up to ``max_block_ms``, then fails that
        send with BufferFull as the sync send() would."""
        sync, loop = self._sync, self._running_loop()
        room = asyncio.Event()
        call_soon_threadsafe = loop.call_soon_threadsafe
        sync._space.on_notify = lambda: call_soon_threadsafe(room.set)
        try:
            while self._deferred:
                args, queued = self._deferred[0]
                try:
                    try:
                        known = args[0] in sync._partition_counts
                    except TypeError:
                        known = True
                    if not known:
                        await loop.run_in_executor(self._worker, sync._partitions, args[0])
                        continue  # known now (or UnknownTopic, below): the send goes as any other
                    if sync._free_bytes < sync._record_bytes_max:
                        await self._wait_for_room(room)
                        continue
                    record_future = sync.send(*args)
                except Exception as exc:
                    if not queued.done():
                        queued.set_exception(exc)
                else:
                    if not queued.done():
                        queued.set_result(record_future)
                self._deferred.popleft()
        finally:
            sync._space.on_notify = None
            self._drainer = None

    async def _wait_for_room(self, room: asyncio.Event) -> None:
        """Until the buffer has room for the largest record; BufferFull after max_block_ms (as the sync send)."""
        sync, loop = self._sync, self._running_loop()
        deadline_s = loop.time() + sync.max_block_s
        while sync._free_bytes < sync._record_bytes_max:
            room.clear()
            with sync._lock:
                sync._close_open_batches()  # so the sender can ship them and free space
            remaining_s = deadline_s - loop.time()
            if remaining_s <= 0 or self._sync._closed:
                raise BufferFull(f"producer buffer of {sync.buffer_bytes} bytes stayed full for "
                                 f"{sync.max_block_s * 1000:.0f} ms (max_block_ms); the record was not sent")
            try:
                await asyncio.wait_for(room.wait(), min(remaining_s, WAIT_SLICE_MS / 1000))
            except asyncio.TimeoutError:
                pass

    def _watch(self, batch: ProducerBatch) -> None:
        """``on_new_batch`` of the sync producer (under its lock, in the loop's thread or the worker's): give
        the batch its watch and its one completion callback, which the sender thread runs and which settles
        the watch in the loop."""
        watch = batch.aio_watch = _BatchWatch(self._loop or asyncio.get_running_loop())
        call_soon_threadsafe = watch.loop.call_soon_threadsafe

        def completed(_metadata: RecordMetadata | None, _error: BaseException | None) -> None:  # in the sender thread
            try:
                call_soon_threadsafe(watch.settle)
            except RuntimeError:  # the loop is closed: no one is left waiting
                pass

        _producer.RecordFuture((batch, 0)).add_callback(completed)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def metrics(self) -> dict[str, int | float]:
        """``bus.Producer.metrics()``, with ``sends_waiting``: sends queued behind a lookup or a full buffer."""
        return {**self._sync.metrics(), "sends_waiting": len(self._deferred)}

    async def wait_for_room(self) -> None:
        """Return once no send is waiting for buffer space or a topic's metadata: what a loop that sends
        faster than the cluster takes awaits now and then (where the sync send() would block), so that it
        never meets the DEFERRED_SENDS_MAX bound. At once when nothing waits."""
        while self._drainer is not None:
            await asyncio.shield(self._drainer)

    async def flush(self, timeout: float | None = None) -> None:
        """Ship every record sent so far and wait until each is acknowledged or failed."""
        if self._closed:
            raise ClosedError("flush() on a closed Producer")
        await self.wait_for_room()
        await self._running_loop().run_in_executor(self._worker, self._sync.flush, timeout)

    async def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the sender thread and release the sockets. Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.wait_for_room()
            await self._running_loop().run_in_executor(self._worker, self._sync.close, timeout)
        finally:
            self._worker.shutdown(wait=False)


class Consumer(_Closing, Generic[K, V]):
    """bus.Consumer for asyncio: the same arguments and group options (``help(bus.Consumer)``), errors and
    guarantees.

    ``await poll()``, ``async for record in consumer``, ``await commit()``; ``seek()``, ``pause()``,
    ``resume()``, ``paused()``, ``assignment()`` and ``subscription()`` are plain calls, as they wait for
    nothing. Group callbacks (``on_assign``, ``on_revoke``, ``on_lost``, ``on_commit``) run in the consumer's
    worker thread, not in the loop (use ``loop.call_soon_threadsafe`` to reach it).
    """

    @_wrapping(_consumer.Consumer)
    def __init__(self, sync: _consumer.Consumer[K, V]) -> None:
        self._sync = sync
        # Polls that wait run one at a time in their own thread (so that one abandoned by a cancellation is
        # settled before the next); the other calls in a second, not held up behind a poll waiting for records.
        self._poller = _worker("bus-aio-poll")
        self._worker = _worker("bus-aio-consumer")
        self._polls_in_thread = 0  # while one is in the poll thread, polls go there too (it holds _poll_lock)
        # The loop whose event the consumer's notifications set (Consumer._data.on_notify), and that event.
        self._signal_loop: asyncio.AbstractEventLoop | None = None
        self._signal_event: asyncio.Event | None = None
        fork_guard.register(self)

    def _call(self, fn: Callable[..., _R], *args: Any) -> asyncio.Future[_R]:
        if self._sync._closed:
            fn(*args)  # its ClosedError, at once (the worker is gone)
        return asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def poll(self, timeout_ms: int = 1000, max_records: int = 10_000) -> list[Record[K, V]]:
        """Records as ``bus.Consumer.poll``. Taken in the loop's thread when the group has nothing to reconcile,
        and waited for in the loop too (woken once per fetch reply that brings data, or every WAIT_SLICE_MS
        to look again); while the group has a rebalance to act on (commits, offset fetches, callbacks) the
        poll runs in the consumer's poll thread instead. A cancelled poll puts back what that thread took
        (its partitions' positions return to those records), so cancelling loses none."""
        sync = self._sync
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + max(0, timeout_ms) / 1000
        while True:
            group = sync._group
            if self._polls_in_thread or not (group is None or group.on_poll_is_quick()):
                remaining_ms = max(0, int((deadline_s - loop.time()) * 1000))
                return await self._poll_waiting_in_thread(remaining_ms, max_records)
            # Nothing can block here: sync.poll's lock is free (no poll is in the thread), the group has no
            # request to make, and a timeout of 0 waits for nothing.
            records = sync.poll(0, max_records)
            remaining_s = deadline_s - loop.time()
            if records or remaining_s <= 0:
                return records
            arrived = self._arrived(loop)
            arrived.clear()  # before yielding: a notify from now on sets it again
            try:
                await asyncio.wait_for(arrived.wait(), min(remaining_s, WAIT_SLICE_MS / 1000))
            except asyncio.TimeoutError:
                pass

    def _arrived(self, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        """The event the consumer's notifications set in ``loop`` (made anew for another loop)."""
        if self._signal_loop is not loop:
            event = asyncio.Event()
            call_soon_threadsafe = loop.call_soon_threadsafe

            def notified() -> None:  # any thread, under the consumer's lock: only schedules
                try:
                    call_soon_threadsafe(event.set)
                except RuntimeError:  # that loop is closed
                    pass

            self._signal_loop, self._signal_event = loop, event
            self._sync._data.on_notify = notified
        assert self._signal_event is not None  # set with _signal_loop, just above if not before
        return self._signal_event

    async def _poll_waiting_in_thread(self, timeout_ms: int, max_records: int) -> list[Record[K, V]]:
        sync = self._sync
        if sync._closed:
            sync.poll(0)  # its ClosedError (the threads are gone)
        token = _ThreadPoll()
        self._polls_in_thread += 1
        future = asyncio.get_running_loop().run_in_executor(self._poller, self._poll_in_thread, token, timeout_ms,
                                                            max_records)
        future.add_done_callback(lambda f: self._thread_poll_done(f, token))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with token.lock:
                token.abandoned = True
            raise

    def _poll_in_thread(self, token: _ThreadPoll, timeout_ms: int, max_records: int) -> list[Record[K, V]]:
        records = self._sync.poll(timeout_ms, max_records)
        with token.lock:
            if token.abandoned:  # cancelled while waiting: no one will take these
                self._sync._unread(records)
                return []
            token.delivered = True
        return records

    def _thread_poll_done(self, future: asyncio.Future[list[Record[K, V]]], token: _ThreadPoll) -> None:
        """In the loop, once the thread's poll returned. Cancelled after the thread delivered its records:
        they go back before any other poll can run (inline polls wait for this; the poll thread is one)."""
        self._polls_in_thread -= 1
        if token.abandoned and token.delivered and not future.cancelled() and future.exception() is None:
            self._sync._unread(future.result())

    async def __aiter__(self) -> AsyncIterator[Record[K, V]]:
        """Records as they come, until the consumer is closed."""
        while not self._sync._closed:
            try:
                records = await self.poll(timeout_ms=1000)
            except ClosedError:
                if self._sync._closed:
                    return
                raise
            for record in records:
                yield record

    async def assign(self, partitions: Partitions) -> None:
        await self._call(self._sync.assign, partitions)

    async def subscribe(self, topics: Iterable[str] | re.Pattern[str] | None = None, *,
                        pattern: str | None = None) -> None:
        await self._call(lambda: self._sync.subscribe(topics, pattern=pattern))

    async def unsubscribe(self) -> None:
        await self._call(self._sync.unsubscribe)

    async def commit(self, offsets: CommitOffsets | None = None) -> dict[TopicPartition, int]:
        return await self._call(self._sync.commit, offsets)

    async def committed(self, tp: tuple[str, int]) -> int | None:
        return await self._call(self._sync.committed, tp)

    async def position(self, tp: tuple[str, int], timeout_ms: int = 30_000) -> int:
        return await self._call(self._sync.position, tp, timeout_ms)

    async def partitions_for_topic(self, topic: str) -> set[int] | None:
        return await self._call(self._sync.partitions_for_topic, topic)

    async def offsets_for_times(self, timestamps: PartitionMap[int]) -> dict[TopicPartition, int]:
        return await self._call(self._sync.offsets_for_times, timestamps)

    async def beginning_offsets(self, partitions: Partitions) -> dict[TopicPartition, int]:
        return await self._call(self._sync.beginning_offsets, partitions)

    async def end_offsets(self, partitions: Partitions) -> dict[TopicPartition, int]:
        return await self._call(self._sync.end_offsets, partitions)

    def commit_async(self, offsets: CommitOffsets | None = None, callback: CommitCallback | None = None) -> None:
        self._sync.commit_async(offsets, callback)

    def seek(self, tp: tuple[str, int], offset: int) -> None:
        self._sync.seek(tp, offset)

    def seek_to_beginning(self, partitions: Partitions | None = None) -> None:
        self._sync.seek_to_beginning(partitions)

    def seek_to_end(self, partitions: Partitions | None = None) -> None:
        self._sync.seek_to_end(partitions)

    def pause(self, partitions: Partitions) -> None:
        self._sync.pause(partitions)

    def resume(self, partitions: Partitions) -> None:
        self._sync.resume(partitions)

    def paused(self) -> set[TopicPartition]:
        return self._sync.paused()

    def metrics(self) -> dict[str, Any]:
        """``bus.Consumer.metrics()``: counters read from memory, no request."""
        return self._sync.metrics()

    def assignment(self) -> set[TopicPartition]:
        return self._sync.assignment()

    def subscription(self) -> set[str] | str:
        return self._sync.subscription()

    async def close(self) -> None:
        """As ``bus.Consumer.close``: a member commits (auto-commit on), gives its partitions back and leaves."""
        if self._sync._closed:
            return
        try:
            await self._call(self._sync.close)
        finally:
            self._worker.shutdown(wait=False)
            self._poller.shutdown(wait=False)


class _ThreadPoll:
    """One poll in the poll thread: whether the awaiting task gave up on it, and whether its records were
    handed over (under its lock, so exactly one side puts them back)."""

    __slots__ = ("lock", "abandoned", "delivered")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = self.delivered = False


def _in_worker(sync_method: Callable[Concatenate[_admin.Admin, _P], _R]
               ) -> Callable[Concatenate[Admin, _P], Coroutine[Any, Any, _R]]:
    """An Admin method that runs ``sync_method`` (``bus.Admin.<name>``) in the admin's worker thread (every
    one is a request), with its signature."""
    name = sync_method.__name__

    async def method(self: Admin, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self._sync._closed:
            return sync_method(self._sync, *args, **kwargs)  # its ClosedError, at once (the worker is gone)
        return await asyncio.get_running_loop().run_in_executor(
            self._worker, lambda: sync_method(self._sync, *args, **kwargs))

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"Awaitable ``bus.Admin.{name}``: {sync_method.__doc__ or ''}"
    return method


class Admin(_Closing):
    """bus.Admin for asyncio: every call of the sync Admin, awaited (its one worker thread makes the requests,
    in the order called)."""

    @_wrapping(_admin.Admin)
    def __init__(self, sync: _admin.Admin) -> None:
        self._sync = sync
        self._worker = _worker("bus-aio-admin")
        fork_guard.register(self)

    create_topic = _in_worker(_admin.Admin.create_topic)
    delete_topic = _in_worker(_admin.Admin.delete_topic)
    list_topics = _in_worker(_admin.Admin.list_topics)
    nodes = _in_worker(_admin.Admin.nodes)
    describe_topic = _in_worker(_admin.Admin.describe_topic)
    elect_unclean = _in_worker(_admin.Admin.elect_unclean)
    list_groups = _in_worker(_admin.Admin.list_groups)
    describe_group = _in_worker(_admin.Admin.describe_group)
    reset_offsets = _in_worker(_admin.Admin.reset_offsets)
    delete_group = _in_worker(_admin.Admin.delete_group)
    group_offsets = _in_worker(_admin.Admin.group_offsets)

    async def close(self) -> None:
        if self._sync._closed:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._worker, self._sync.close)
        finally:
            self._worker.shutdown(wait=False)


__all__ = ["Admin", "Consumer", "Producer", "PendingRecord", "RecordFuture", "RecordMetadata", "DEFERRED_SENDS_MAX"]
