"""The Producer: ``send()`` appends a record to an open batch and returns a future; a background sender
thread ships closed batches to their partition's owner and completes the futures.

``send()`` does as little as possible per record (a lock, a list extend, a few integer updates): the
batch is packed once, when it closes. A batch closes when it reaches ``batch_bytes``, when it has
waited ``linger_ms``, or on ``flush()``.

Memory is bounded: records held (open, waiting, or in flight) never exceed ``buffer_bytes``; a ``send()``
that finds no room waits up to ``max_block_ms`` and then raises BufferFull (nothing was sent).

Inputs are checked before anything is queued: a value is bytes, bytearray or memoryview, or None (a
tombstone: a record with no value, which consumers get as None, distinct from b""); a key the same or None
(no key); headers a list of (str, bytes) pairs or a dict of str to bytes; the topic a str; the partition and
``timestamp_ms`` an int or None. Anything else raises InvalidRecord (a TypeError) naming the argument and
saying what to pass. A bytearray or memoryview is copied, as the caller may change it after ``send()``
returns. The checks cost ``send()`` one ``type(x) is bytes`` test in the usual case (the rest runs only
when it fails), and ``send_many()`` one C-speed pass over its values' types.

Serializers (``key_serializer=``, ``value_serializer=``: callables, e.g. ``bus.serializers.json_serializer``)
turn each key and value into bytes before those checks; None (a tombstone, no key) is never passed to one,
as in kafka-python. One that raises is a SerializationError, and nothing of the call is queued. A producer
with serializers has ``send`` and ``send_many`` wrapped by its constructor, so one without pays nothing.

Compression (``compression="lz4" | "zstd"``, default None): each batch's payload is compressed as a whole
when the sender packs it (bus/batch.py), off the ``send()`` path. ``batch_bytes`` and ``buffer_bytes`` stay
in uncompressed bytes, as Kafka's batch.size does: what the buffer holds until a batch is acknowledged
is its records as sent (the packed batch is a smaller copy made from them), and a batch is the unit of
compression, so ``batch_bytes`` is what each compression sees.

Lock order: ``Producer._lock`` is the only lock; the sender thread takes it only to move batches out of
the accumulator and to release buffer space.
"""

from __future__ import annotations

import operator
import threading
import time
from bisect import bisect_left as _bisect_left, bisect_right as _bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import accumulate as _accumulate, repeat as _repeat
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeAlias, TypeVar, cast, overload

import zmq

from . import fork_guard, gil
from .batch import CODECS, UNCOMPRESSED_BYTES_MAX
from .connection import Requester
from .errors import (BufferFull, BusError, ClosedError, ConfigError, InvalidRecord, RecordTooLarge, SerializationError,
                     Timeout, UnknownPartition)
from .metadata import check_bootstrap, partition_for_key
from .records import Buffer, KeyIn, RecordMetadata, ValueIn
from .signal import Signal

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Generator

    from .aio import _BatchWatch
    from .sender import Sender

# What send() takes as a record's headers: (name, value) pairs, or a dict of name to value.
Headers: TypeAlias = Sequence[tuple[str, Buffer]] | Mapping[str, Buffer]
_T = TypeVar("_T")
_P = ParamSpec("_P")
_R = TypeVar("_R")
# A key_serializer= or value_serializer=: what send() takes as a key or value, to bytes (None, a tombstone or
# no key, is never passed).
Serializer: TypeAlias = Callable[[_T], Buffer | None]
# A send callback (RecordFuture.add_callback): the record's metadata, or None and its error.
SendCallback: TypeAlias = Callable[[RecordMetadata | None, BaseException | None], object]
# A send_many() run: (batch, first index in the batch, record count).
Run: TypeAlias = tuple["ProducerBatch", int, int]

RECORD_OVERHEAD_BYTES = 16  # msgpack framing and the timestamp, for buffer accounting
TIMESTAMP_MS_MAX = (1 << 63) - 1  # a batch header's i64


# -- the inputs' checks: send()'s slow path, run only when a cheap type test fails --------------------------

def _wrong_type(argument: str, value: object, expected: str, hint: str = "") -> InvalidRecord:
    return InvalidRecord(f"{argument} must be {expected}, not {type(value).__name__}{hint}")


_SERIALIZER_HINTS = {  # what else to do about a value or key of the wrong type
    "value": " or pass value_serializer= to the Producer (bus.serializers.json_serializer, msgpack_serializer)",
    "key": " or pass key_serializer= to the Producer (str.encode, bus.serializers.json_serializer)",
}


def _as_bytes(argument: str, value: object, none_means: str | None = None, spelled: str | None = None) -> bytes | None:
    """``value`` as bytes (a bytearray or memoryview copied: the caller may change it after send() returns),
    or None where ``none_means`` says what None is; else InvalidRecord naming ``argument`` (and, for a value or
    a key, the serializer that would take it)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if value is None and none_means is not None:
        return None
    expected = ("bytes, bytearray or memoryview" if none_means is None
                else f"bytes, bytearray, memoryview or None ({none_means})")
    spelled = spelled or argument
    hint = (f": encode it ({spelled}.encode())" if isinstance(value, str)
            else f": serialize it (json.dumps({spelled}).encode(), msgpack.packb({spelled}))")
    raise _wrong_type(argument, value, expected, hint + (_SERIALIZER_HINTS.get(spelled, "") if none_means else ""))


def _serialized(serializer: Serializer[Any], argument: str, obj: object, where: str = "") -> Buffer | None:
    """``serializer(obj)``, for ``argument`` ("key" or "value"; ``where`` names it in a list): None is passed
    through without calling it. It must return bytes, bytearray, memoryview or None."""
    if obj is None:
        return None
    try:
        data = serializer(obj)
    except Exception as exc:
        raise SerializationError(f"{argument}_serializer raised {type(exc).__name__} for {where or 'the ' + argument}: "
                                 f"{exc}; nothing was sent", argument=argument) from exc
    if data is not None and type(data) is not bytes and not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidRecord(f"{argument}_serializer returned {type(data).__name__} for {where or 'the ' + argument}: it "
                            "must return bytes, bytearray, memoryview or None; nothing was sent")
    return data


def _checked_record(value: object, key: object, headers: object
                    ) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None, int]:
    """send()'s slow path, for a record whose value, key or headers are not plain bytes and None: each checked
    and normalized. Returns (value, key, headers, buffer bytes)."""
    if type(value) is not bytes:
        value = _as_bytes("value", value, "a tombstone")
    if key is not None and type(key) is not bytes:
        key = _as_bytes("key", key, "no key")
    assert (value is None or type(value) is bytes) and (key is None or type(key) is bytes)
    size = RECORD_OVERHEAD_BYTES + (0 if value is None else len(value)) + (0 if key is None else len(key))
    checked_headers = None
    if headers is not None:
        checked_headers, header_bytes = _checked_headers(headers)
        size += header_bytes
    return value, key, checked_headers, size


def _checked_headers(headers: object) -> tuple[list[tuple[str, bytes]], int]:
    """Headers as the batch holds them, a new list of (str, bytes) (the caller's may change after send()), from
    a list or tuple of pairs or a dict; and their buffer bytes."""
    pairs: Iterable[Any]
    if type(headers) is dict or isinstance(headers, dict):
        pairs = headers.items()
    elif type(headers) is list or isinstance(headers, (list, tuple)):
        pairs = headers
    else:
        raise _wrong_type("headers", headers, "a list of (str, bytes) pairs or a dict of str to bytes")
    out: list[tuple[str, bytes]] = []
    size = 0
    for pair in pairs:
        if type(pair) is tuple and len(pair) == 2 and type(pair[0]) is str and type(pair[1]) is bytes:
            out.append(pair)  # the usual header: immutable as it is
        else:
            pair = _checked_header(len(out), pair)
            out.append(pair)
        size += len(pair[0]) + len(pair[1]) + 4
    return out, size


def _checked_header(i: int, pair: object) -> tuple[str, bytes]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise _wrong_type(f"headers[{i}]", pair, "a (name, value) pair")
    name, value = pair
    if not isinstance(name, str):
        hint = ": decode it (name.decode())" if isinstance(name, (bytes, bytearray)) else ""
        raise _wrong_type(f"the name of headers[{i}]", name, "str", hint)
    data = _as_bytes(f"the value of header {name!r}", value, spelled="value")
    assert data is not None  # None is refused without none_means
    return str(name), data


def _checked_int(argument: str, value: Any, expected: str, low: int | None = None, high: int | None = None) -> int:
    """An int argument, given as something else: a bool is refused (True is not 1), an int-like (numpy.int64,
    an IntEnum) taken as its int; ConfigError outside [low, high] when given."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        hint = f": pass int({argument})" if isinstance(value, float) else ""
        raise _wrong_type(argument, value, f"{expected} or None", hint)
    number = operator.index(value)
    if low is not None and not low <= number <= high:  # type: ignore[operator]  # high is given with low
        raise ConfigError(f"{argument} must be from {low} to {high}, not {number}")
    return number


def _checked_topic(topic: object) -> None:
    if not isinstance(topic, str):
        hint = ": decode it (topic.decode())" if isinstance(topic, (bytes, bytearray)) else ""
        raise _wrong_type("topic", topic, "str", hint)


class ProducerBatch:
    """Records for one partition, appended by ``send()`` until closed, then owned by the sender thread."""

    __slots__ = ("topic", "partition", "flat", "count", "bytes", "created_s",
                 "deadline_s", "done", "base_offset", "append_ts_ms", "error", "callbacks", "payload",
                 "producer_id", "producer_epoch", "sequence", "sent", "attempts", "maybe_written", "last_error",
                 "aio_watch")

    def __init__(self, topic: str, partition: int, created_s: float, deadline_s: float) -> None:
        self.topic, self.partition = topic, partition
        self.flat: list[Any] = []  # timestamp_ms or None, key, value, headers per record (bus.batch's payload layout)
        self.count = 0
        self.bytes = 0
        self.created_s, self.deadline_s = created_s, deadline_s
        self.done = threading.Event()
        self.base_offset = -1
        self.append_ts_ms = -1  # the node's append time: the timestamp of records sent without one
        self.error: BaseException | None = None
        # [(index, fn)] run by the sender thread on completion
        self.callbacks: list[tuple[int, SendCallback]] | None = None
        self.payload: bytes | None = None  # the packed batch, made once by the sender
        self.producer_id = self.producer_epoch = self.sequence = -1
        self.sent = False  # ever handed to a socket
        self.attempts = 0
        # Whether an attempt ended without a definite answer (a timeout, a lost connection, an append that
        # was not committed): only then may the batch be stored although it failed.
        self.maybe_written = False
        self.last_error: BusError | None = None  # the last retriable error an attempt met
        # bus.aio: the event loop's tasks awaiting this batch's records (bus/aio.py)
        self.aio_watch: _BatchWatch | None = None

    def complete(self, base_offset: int, error: BaseException | None, append_ts_ms: int = -1) -> None:
        self.base_offset, self.error, self.append_ts_ms = base_offset, error, append_ts_ms
        self.done.set()
        # Taken under the lock add_callback() holds while it checks ``done``: a callback added just before
        # ``done`` was set is in the list taken here, and one added after runs at once in add_callback().
        with _callback_lock:
            callbacks, self.callbacks = self.callbacks, None
        for index, fn in callbacks or ():
            try:
                fn(self.metadata(index) if error is None else None, error)
            except Exception:  # a user callback must not kill the sender thread
                import logging

                logging.getLogger("bus.producer").exception("send callback raised")

    def metadata(self, index: int) -> RecordMetadata:
        offset = -1 if self.base_offset < 0 else self.base_offset + index
        timestamp_ms: int | None = self.flat[4 * index]
        return RecordMetadata(self.topic, self.partition, offset,
                              self.append_ts_ms if timestamp_ms is None else timestamp_ms)


class RecordFuture(tuple[ProducerBatch, int]):
    """The outcome of one ``send()``: ``get(timeout)`` returns RecordMetadata or raises the typed error.

    A (batch, index) pair: a tuple subclass with tuple's own constructor, ``RecordFuture((batch, index))``,
    so that ``send()`` makes one with a single C call rather than running a Python ``__init__`` per record.
    """

    __slots__ = ()

    @property
    def _batch(self) -> ProducerBatch:
        return self[0]

    @property
    def _index(self) -> int:
        return self[1]

    def done(self) -> bool:
        return self._batch.done.is_set()

    def get(self, timeout: float | None = None) -> RecordMetadata:
        if not self._batch.done.wait(timeout):
            raise Timeout(f"record not acknowledged within {timeout} s (it may still be delivered)")
        if self._batch.error is not None:
            raise self._batch.error
        return self._batch.metadata(self._index)

    result = get

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._batch.done.wait(timeout):
            raise Timeout(f"record not completed within {timeout} s")
        return self._batch.error

    def __await__(self) -> Generator[Any, None, RecordMetadata]:
        """bus.aio: ``await`` a record a ``bus.aio.Producer`` sent, in its event loop, for its RecordMetadata or
        its error. The loop futures that wait are the batch's (``ProducerBatch.aio_watch``, settled in the loop
        by the batch's one completion callback): one is made only if the batch is not done yet, and its
        cancellation touches no other record's."""
        batch = self[0]
        if not batch.done.is_set():
            watch = batch.aio_watch
            if watch is None:
                raise TypeError("only records sent by a bus.aio.Producer can be awaited; use get() with bus.Producer")
            waiter: asyncio.Future[None] = watch.loop.create_future()
            watch.waiters.append(waiter)
            yield from waiter.__await__()
        if batch.error is not None:
            raise batch.error
        return batch.metadata(self[1])

    def add_callback(self, fn: SendCallback) -> None:
        """``fn(metadata, exception)`` once the record is acknowledged or failed (at once if it already is)."""
        batch = self._batch
        with _callback_lock:
            if not batch.done.is_set():
                batch.callbacks = (batch.callbacks or []) + [(self._index, fn)]
                return
        fn(batch.metadata(self._index) if batch.error is None else None, batch.error)


class FutureList(Sequence[RecordFuture]):
    """The futures of one ``send_many()`` call, in the order of its values: a read-only sequence of
    RecordFuture, each made when it is looked at. The records went in runs of consecutive indexes in a few
    batches; keeping the runs instead of a future per record is what makes the call cheap (a million
    RecordFutures are a million tracked objects for the garbage collector to walk)."""

    __slots__ = ("_runs", "_starts", "_len")

    def __init__(self, runs: list[Run]) -> None:
        self._runs = runs  # [(batch, first index in the batch, record count)], in value order
        self._starts = list(_accumulate([0] + [count for _, _, count in runs[:-1]]))
        self._len = sum(count for _, _, count in runs)

    @classmethod
    def of(cls, futures: list[RecordFuture]) -> FutureList:
        """The FutureList of futures made one by one (send_many's per-record path)."""
        return cls([(future[0], future[1], 1) for future in futures])

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, at: int) -> RecordFuture: ...

    @overload
    def __getitem__(self, at: slice) -> list[RecordFuture]: ...

    def __getitem__(self, at: int | slice) -> RecordFuture | list[RecordFuture]:
        if isinstance(at, slice):
            return [self[i] for i in range(*at.indices(self._len))]
        if at < 0:
            at += self._len
        if not 0 <= at < self._len:
            raise IndexError("FutureList index out of range")
        run = _bisect_right(self._starts, at) - 1
        batch, first, _ = self._runs[run]
        return RecordFuture((batch, first + at - self._starts[run]))

    def __iter__(self) -> Iterator[RecordFuture]:
        for batch, first, count in self._runs:
            yield from _map(RecordFuture, zip(_repeat(batch), range(first, first + count)))

    def __add__(self, other: Iterable[RecordFuture]) -> list[RecordFuture]:
        return list(self) + list(other)

    def __radd__(self, other: Iterable[RecordFuture]) -> list[RecordFuture]:
        return list(other) + list(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (list, FutureList)) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<FutureList of {self._len} records in {len(self._runs)} batch run(s)>"


_callback_lock = threading.Lock()
_map, _add = map, operator.add


# -- send() and send_many() as a user's type checker sees them ------------------------------------------------
#
# They take what the producer's serializers take (KeyIn, ValueIn: bytes-like without them). The methods below
# are the serializer-less ones, typed by the bytes they handle; a producer with serializers has them replaced
# by wrappers that serialize first (Producer.__init__). So the checkers are shown these signatures instead:
# the same parameters, the key and value typed by the producer's type parameters. Only the annotations
# differ: _typed_as returns the method itself, nothing is wrapped and nothing runs per call.

def _typed_as(face: Callable[_P, _R]) -> Callable[[Callable[..., _R]], Callable[_P, _R]]:
    """A method decorator: the method unchanged, typed as ``face``."""
    return lambda method: method


def _send_face(self: Producer[KeyIn, ValueIn], topic: str, value: ValueIn | None, key: KeyIn | None = None,
               headers: Headers | None = None, partition: int | None = None, timestamp_ms: int | None = None
               ) -> RecordFuture:
    raise NotImplementedError  # never called: only its signature is used


def _send_many_face(self: Producer[KeyIn, ValueIn], topic: str, values: Iterable[ValueIn | None],
                    keys: Iterable[KeyIn | None] | None = None, partition: int | None = None) -> FutureList:
    raise NotImplementedError  # never called: only its signature is used


class Producer(Generic[KeyIn, ValueIn]):
    """Appends records to topics: ``send()`` queues one and returns a RecordFuture of its RecordMetadata;
    a background sender thread ships batches to each partition's leader. Thread-safe; ``with`` closes it.

    Delivery: ``acks`` ("all", the default: every in-sync replica has the batch on disk; 1: the leader has;
    0: not acknowledged), ``idempotent`` (True: each batch written once, in order, across retries and leader
    changes), ``delivery_timeout_ms`` (a record's whole budget, retries included), ``request_timeout_ms``,
    ``retry_backoff_ms``, ``max_in_flight_per_node`` (produce requests sent to one node and not yet
    answered; with idempotence a partition's batches in flight also stay within the node's window of 16),
    ``metadata_timeout_ms``.

    Batching and memory: ``linger_ms`` (how long an open batch waits for more records), ``batch_bytes``,
    ``buffer_bytes`` (every record held until acknowledged; a ``send()`` finding no room waits up to
    ``max_block_ms``, then raises BufferFull), ``max_record_bytes``, ``compression`` (None, "lz4", "zstd").

    Inputs: ``key_serializer`` / ``value_serializer`` (callables to bytes); without them keys and values are
    bytes, bytearray, memoryview or None, and anything else raises InvalidRecord naming the argument.
    """

    def __init__(self, bootstrap: str | None = None, *, acks: int | str = "all", linger_ms: int = 2,
                 batch_bytes: int = 1 << 20, buffer_bytes: int = 64 << 20, max_block_ms: int = 60_000,
                 request_timeout_ms: int = 30_000, delivery_timeout_ms: int = 120_000, max_record_bytes: int = 1 << 20,
                 max_in_flight_per_node: int = 8, idempotent: bool = True, retry_backoff_ms: int = 50,
                 metadata_timeout_ms: int = 10_000, compression: str | None = None,
                 key_serializer: Serializer[KeyIn] | None = None,
                 value_serializer: Serializer[ValueIn] | None = None) -> None:
        if acks not in (0, 1, -1, "all"):
            raise ConfigError(f"acks must be 0, 1 or 'all', not {acks!r}")
        if compression not in CODECS:
            raise ConfigError(f"compression must be one of {list(CODECS)}, not {compression!r}")
        for name, value, low in (("linger_ms", linger_ms, 0), ("batch_bytes", batch_bytes, 1),
                                 ("buffer_bytes", buffer_bytes, 1), ("max_block_ms", max_block_ms, 0),
                                 ("request_timeout_ms", request_timeout_ms, 1),
                                 ("delivery_timeout_ms", delivery_timeout_ms, 1),
                                 ("max_record_bytes", max_record_bytes, 1),
                                 ("max_in_flight_per_node", max_in_flight_per_node, 1),
                                 ("retry_backoff_ms", retry_backoff_ms, 0)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, not {value!r}")
        if buffer_bytes < batch_bytes:
            raise ConfigError(f"buffer_bytes ({buffer_bytes}) must be at least batch_bytes ({batch_bytes})")
        if compression is not None and batch_bytes + max_record_bytes > UNCOMPRESSED_BYTES_MAX:
            # A batch closes once it reaches batch_bytes, so its last record may take it up to max_record_bytes
            # past that; a larger payload than this no reader decompresses (bus/batch.py).
            raise ConfigError(f"with compression, batch_bytes + max_record_bytes ({batch_bytes + max_record_bytes})"
                              f" must be at most {UNCOMPRESSED_BYTES_MAX} (bus.batch.UNCOMPRESSED_BYTES_MAX)")
        if delivery_timeout_ms < request_timeout_ms + linger_ms:
            raise ConfigError("delivery_timeout_ms must be at least request_timeout_ms + linger_ms")
        if idempotent and acks == 0:
            raise ConfigError("the idempotent producer needs acks=1 or 'all' (or pass idempotent=False)")
        for name, fn in (("key_serializer", key_serializer), ("value_serializer", value_serializer)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"{name} must be a callable (object -> bytes) or None, not {fn!r}")
        self.bootstrap = check_bootstrap(bootstrap)
        # On the wire: 0, 1, or -1 for "all" (every in-sync replica has the batch on disk; Kafka's value).
        self.acks: int = -1 if acks in (-1, "all") else int(acks)
        self.linger_s = linger_ms / 1000
        self.batch_bytes = batch_bytes
        self.buffer_bytes = buffer_bytes
        self.max_block_s = max_block_ms / 1000
        self.delivery_timeout_s = delivery_timeout_ms / 1000
        self.max_record_bytes = max_record_bytes
        self.compression = compression  # the codec name the sender packs every batch with (bus.batch.CODECS)
        self.key_serializer, self.value_serializer = key_serializer, value_serializer
        if key_serializer is not None or value_serializer is not None:
            # These stand in for the class's send and send_many, which stay as they are for a producer
            # without serializers: its hot path never tests for them.
            self.send, self.send_many = (  # type: ignore[method-assign]
                self._send_serialized, self._send_many_serialized)
        self._record_bytes_max = min(max_record_bytes, buffer_bytes)
        self._lock = threading.Lock()
        # Signalled when buffer space is released; bus.aio's producer hooks its loop to it (on_notify).
        self._space = Signal(self._lock)
        self._open: dict[tuple[str, int], ProducerBatch] = {}
        self._ready: deque[ProducerBatch] = deque()
        self._taken: set[ProducerBatch] = set()  # handed to the sender, not yet completed
        self._free_bytes = buffer_bytes  # buffer_bytes less the bytes of records held
        self._sticky: dict[str, int] = {}
        # topic -> the open batch of its sticky partition (``_open[(topic, _sticky[topic])]``), so that a
        # record with neither key nor partition finds its batch with one lookup. Dropped with that batch.
        self._sticky_open: dict[str, ProducerBatch] = {}
        self._rotation: dict[str, int] = {}
        self._closed = False
        self._flush_requested = False
        # Called with each batch as it opens, under _lock: bus.aio's producer gives it the watch its records
        # are awaited through (one per batch, so that send() itself does nothing more per record).
        self._on_new_batch: Callable[[ProducerBatch], None] | None = None
        self._context = zmq.Context()
        self._requester = Requester(self._context, self.bootstrap, metadata_timeout_ms)

        from .sender import Sender

        self._sender: Sender = Sender(self, self._context, request_timeout_ms=request_timeout_ms,
                              max_in_flight_per_node=max_in_flight_per_node, idempotent=idempotent,
                              retry_backoff_ms=retry_backoff_ms, metadata_timeout_ms=metadata_timeout_ms)
        self._wake: Callable[[], None] = self._sender.waker
        gil.acquire()
        self._sender.start()
        self._partition_counts: dict[str, int] = {}
        fork_guard.register(self)  # in a forked child, every call raises ForkedError instead of hanging

    # -- sending -----------------------------------------------------------------------------------

    def _partitions(self, topic: str) -> int:
        _checked_topic(topic)  # the first use of a topic comes here: checked once, not on every send()
        count = self._partition_counts.get(topic)
        if count is None:
            if self._closed:  # its sockets are gone: no metadata request can go out
                raise ClosedError("sending on a closed Producer (nothing was sent)")
            try:
                count = self._requester.metadata([topic], strict=True).partition_count(topic)  # raises UnknownTopic
            except zmq.ZMQError:
                if self._closed:  # closed by another thread meanwhile
                    raise ClosedError("sending on a closed Producer (nothing was sent)") from None
                raise
            self._partition_counts[topic] = count
        return count

    @_typed_as(_send_face)
    def send(self, topic: str, value: Buffer | None, key: Buffer | None = None, headers: Headers | None = None,
             partition: int | None = None, timestamp_ms: int | None = None) -> RecordFuture:
        """Queue one record; returns a future of its RecordMetadata. Thread-safe.

        ``value`` and ``key`` are bytes (or bytearray / memoryview, copied); ``value=None`` is a tombstone and
        ``key=None`` no key; ``headers`` a list of (str, bytes) pairs or a dict of them; ``partition`` and
        ``timestamp_ms`` ints. Anything else raises InvalidRecord (a TypeError) before anything is queued.

        Without ``timestamp_ms`` the record's timestamp is the time its node appends it (as in Kafka's
        LogAppendTime, Redis Streams and NATS JetStream); the future's RecordMetadata carries it.
        """
        # The hot path: every line here runs once per record. Lock by acquire/release rather than ``with``
        # (half the cost on CPython 3.11) and make the future with one C call. No clock read: that was an
        # eighth of the cost of a call (docs/benchmarks.md). The inputs' checks are one ``type() is`` test
        # per argument given; only a value, key or headers that fail it take the slow path.
        if type(value) is bytes and headers is None:
            if key is None:
                size = len(value) + RECORD_OVERHEAD_BYTES
            elif type(key) is bytes:
                size = len(value) + len(key) + RECORD_OVERHEAD_BYTES
            else:
                value, key, headers, size = _checked_record(value, key, headers)
        else:
            value, key, headers, size = _checked_record(value, key, headers)
        if size > self._record_bytes_max:
            # One larger than the buffer could never fit: say so now rather than after max_block_ms.
            limit = "max_record_bytes" if size > self.max_record_bytes else "buffer_bytes"
            raise RecordTooLarge(f"record of {size} bytes exceeds {limit}={getattr(self, limit)}")
        if partition is not None and type(partition) is not int:
            partition = _checked_int("partition", partition, "an int")  # its range: UnknownPartition, below
        if timestamp_ms is not None and not (type(timestamp_ms) is int and 0 <= timestamp_ms <= TIMESTAMP_MS_MAX):
            timestamp_ms = _checked_int("timestamp_ms", timestamp_ms, "an int (milliseconds since the epoch)",
                                        0, TIMESTAMP_MS_MAX)
        if key is not None and partition is None:
            try:
                count = self._partition_counts.get(topic)
            except TypeError:  # an unhashable topic
                raise _wrong_type("topic", topic, "str") from None
            partition = partition_for_key(key, count or self._partitions(topic))
        lock = self._lock
        lock.acquire()
        try:
            # Usually the record's batch (its topic's sticky one, or its partition's) is open and the buffer
            # has room: an open batch means the topic is known and the partition was checked when the batch
            # was made (a topic that is not a str never finds one). No ``_closed`` test here: close() has the
            # sender's last turn close every open batch, so a closed producer has none; a send() racing
            # close() may still join one, and fails through its future.
            try:
                batch = self._sticky_open.get(topic) if partition is None else self._open.get((topic, partition))
            except TypeError:  # an unhashable topic
                raise _wrong_type("topic", topic, "str") from None
            if batch is None or size > self._free_bytes:
                batch = self._batch_with_room(topic, partition, size)
            index = batch.count
            batch.flat += (timestamp_ms, key, value, headers)
            batch.count = index + 1
            self._free_bytes -= size
            batch.bytes += size
            if batch.bytes >= self.batch_bytes:
                self._close_batch(batch)
                self._wake()
            return RecordFuture((batch, index))
        finally:
            lock.release()

    def _send_serialized(self, topic: str, value: Any, key: Any = None, headers: Headers | None = None,
                         partition: int | None = None, timestamp_ms: int | None = None) -> RecordFuture:
        """send() for a producer with serializers: the key and value serialized (None passed through), then
        checked and sent as send() does."""
        if self.value_serializer is not None:
            value = _serialized(self.value_serializer, "value", value)
        if self.key_serializer is not None:
            key = _serialized(self.key_serializer, "key", key)
        return Producer.send(self, topic, value, key, headers, partition, timestamp_ms)

    def _send_many_serialized(self, topic: str, values: Iterable[Any], keys: Iterable[Any] | None = None,
                              partition: int | None = None) -> FutureList:
        """send_many() for a producer with serializers: every value and key serialized before any is sent."""
        if isinstance(values, (bytes, bytearray, memoryview, str)):
            raise _wrong_type("values", values, "a list (or other iterable) of values", ": for one record, call send()")
        if self.value_serializer is not None:
            fn = self.value_serializer
            values = [_serialized(fn, "value", v, f"values[{i}]") for i, v in enumerate(values)]
        if keys is not None and self.key_serializer is not None:
            key_fn = self.key_serializer
            keys = [_serialized(key_fn, "key", k, f"keys[{i}]") for i, k in enumerate(keys)]
        return Producer.send_many(self, topic, values, keys, partition)

    def _batch_with_room(self, topic: str, partition: int | None, size: int) -> ProducerBatch:
        """send()'s slow path, under the lock: check the producer and the partition, wait for buffer space,
        open the record's batch if need be."""
        count = self._partition_counts.get(topic)
        if count is None:
            self._lock.release()  # a metadata request: never under the lock the sender thread takes
            try:
                count = self._partitions(topic)  # raises UnknownTopic
            finally:
                self._lock.acquire()
        if self._closed:
            raise ClosedError("send() on a closed Producer")
        if partition is not None and not 0 <= partition < count:
            raise UnknownPartition(f"topic {topic!r} has no partition {partition} (it has {count})")
        if size > self._free_bytes:
            self._wait_for_space(size)  # waits on self._space, releasing the lock
        return self._batch_for(topic, partition, count)

    @_typed_as(_send_many_face)
    def send_many(self: Producer[Any, Any], topic: str, values: Iterable[Buffer | None],
                  keys: Iterable[Buffer | None] | None = None, partition: int | None = None) -> FutureList:
        """Send many records in one call (cheaper per record than ``send()``). Returns their futures.

        Without keys, the values go in whole runs: one lock round per batch they fill, no Python code per
        record. The outcome is that of ``send(topic, value, partition=...)`` for each value in order (same
        batches, same sticky partitions, same buffer limit). Every value and key is checked as ``send()``
        checks it before any is queued: one of the wrong type raises InvalidRecord naming its index, and
        nothing of the call is sent. A value too large, an unknown topic or partition takes the per-record
        path, which sends the values before it and raises at it; so do keys and tombstones (None values).
        """
        if isinstance(values, (bytes, bytearray, memoryview, str)):
            raise _wrong_type("values", values, "a list (or other iterable) of values", ": for one record, call send()")
        values = values if type(values) is list else list(values)
        if partition is not None and type(partition) is not int:
            partition = _checked_int("partition", partition, "an int")
        one_by_one = keys is not None
        if list(_map(type, values)).count(bytes) != len(values):  # C speed: a few ns a value
            values = [_as_bytes(f"values[{i}]", v, "a tombstone", "value")
                      for i, v in enumerate(values)]
            one_by_one = one_by_one or None in values
        if keys is not None:
            keys = keys if type(keys) is list else list(keys)
            if len(keys) != len(values):
                raise ConfigError(f"send_many() was given {len(values)} values and {len(keys)} keys")
            keys = [k if k is None or type(k) is bytes else _as_bytes(f"keys[{i}]", k, "no key", "key")
                    for i, k in enumerate(keys)]
        if one_by_one:
            send = Producer.send  # the class's: values and keys are serialized already, when they are
            return FutureList.of([send(self, topic, value, key, partition=partition)
                                  for value, key in zip(values, keys or _repeat(None))])
        if not values:
            return FutureList([])
        n = len(values)
        size = sum(_map(len, values)) + RECORD_OVERHEAD_BYTES * n  # buffer bytes, as send() counts them
        if type(topic) is not str:
            _checked_topic(topic)
        count = self._partition_counts.get(topic) or self._partitions(topic)
        if ((partition is not None and not 0 <= partition < count)
                or (size > self._record_bytes_max
                    and max(_map(len, values)) + RECORD_OVERHEAD_BYTES > self._record_bytes_max)):
            return FutureList.of([Producer.send(self, topic, value, partition=partition) for value in values])
        lock = self._lock
        lock.acquire()
        try:
            if not self._closed and size <= self._free_bytes:
                batch = self._batch_for(topic, partition, count)
                if batch.bytes + size < self.batch_bytes:
                    # The usual case: all of them fit in the open batch without filling it. One run, and no
                    # running total to bisect.
                    run = self._append_values(batch, cast("list[bytes]", values), size)
                    return FutureList([run])
            return FutureList(self._send_runs(topic, cast("list[bytes]", values), partition, count))
        finally:
            lock.release()

    def _send_runs(self, topic: str, values: list[bytes], partition: int | None, count: int) -> list[Run]:
        """send_many()'s general case, under the lock: the values go in runs, one per batch they reach,
        waiting for buffer space as send() would. Returns the runs (batch, first index, count)."""
        # total[i]: buffer bytes of values[0..i], as send() counts them (len + RECORD_OVERHEAD_BYTES each).
        total = list(_accumulate(_map(_add, _map(len, values), _repeat(RECORD_OVERHEAD_BYTES))))
        runs: list[Run] = []
        n, pos = len(values), 0
        while pos < n:
            if self._closed:
                raise ClosedError("send_many() on a closed Producer")
            before = total[pos - 1] if pos else 0
            room = self._free_bytes
            if total[pos] - before > room:
                self._wait_for_space(total[pos] - before)  # waits on self._space, releasing the lock
                continue
            batch = self._batch_for(topic, partition, count)
            # Take the values that fit in the buffer, up to and including the one that fills the batch
            # (send() closes a batch once its bytes reach batch_bytes).
            fits = _bisect_right(total, before + room, pos) - pos
            fills = _bisect_left(total, before + self.batch_bytes - batch.bytes, pos) - pos + 1
            k = min(fits, fills, n - pos)
            runs.append(self._append_values(batch, values if k == n else values[pos:pos + k],
                                            total[pos + k - 1] - before))
            pos += k
        return runs

    def _append_values(self, batch: ProducerBatch, values: list[bytes], size: int) -> Run:
        """Append records of ``values`` (no timestamp, key or headers) taking ``size`` buffer bytes; closes
        the batch if that fills it. Returns the run (batch, first index, count). Caller holds the lock."""
        k, index = len(values), batch.count
        flat: list[bytes | None] = [None] * (4 * k)  # timestamp_ms, key, value, headers per record (bus/batch.py)
        flat[2::4] = values
        batch.flat += flat
        batch.count = index + k
        self._free_bytes -= size
        batch.bytes += size
        if batch.bytes >= self.batch_bytes:
            self._close_batch(batch)
            self._wake()
        return batch, index, k

    def _wait_for_space(self, size: int) -> None:
        deadline_s = time.monotonic() + self.max_block_s
        while size > self._free_bytes:
            self._close_open_batches()
            remaining = deadline_s - time.monotonic()
            if remaining <= 0 or self._closed:
                raise BufferFull(f"producer buffer of {self.buffer_bytes} bytes stayed full for "
                                 f"{self.max_block_s * 1000:.0f} ms (max_block_ms); the record was not sent")
            self._space.wait(remaining)

    def _close_open_batches(self) -> None:
        """The buffer is short of room: close every open batch so the sender ships them and frees space.
        Caller holds the lock."""
        for open_batch in list(self._open.values()):
            self._close_batch(open_batch)
        self._wake()

    def _batch_for(self, topic: str, partition: int | None, count: int) -> ProducerBatch:
        """The open batch a record goes to (opened if need be); ``partition=None`` means the topic's sticky
        partition. Caller holds the lock."""
        sticky = partition is None
        if sticky:
            partition = self._sticky.get(topic)
            if partition is None:
                partition = self._sticky[topic] = self._rotation.get(topic, 0) % count
                self._rotation[topic] = partition + 1
        assert partition is not None
        batch = self._open.get((topic, partition))
        if batch is None:
            now_s = time.monotonic()
            batch = self._open[(topic, partition)] = ProducerBatch(
                topic, partition, now_s, now_s + self.delivery_timeout_s)
            if self._on_new_batch is not None:
                self._on_new_batch(batch)
            self._wake()
        if sticky:
            self._sticky_open[topic] = batch
        return batch

    def _close_batch(self, batch: ProducerBatch) -> None:
        """Move an open batch to the ready queue. Caller holds the lock."""
        del self._open[(batch.topic, batch.partition)]
        if self._sticky.get(batch.topic) == batch.partition:
            del self._sticky[batch.topic]
            self._sticky_open.pop(batch.topic, None)
        self._ready.append(batch)

    # -- called by the sender thread ---------------------------------------------------------------

    def _take_ready(self, now_s: float, held: Iterable[tuple[str, int]] = ()
                    ) -> tuple[list[ProducerBatch], float | None]:
        """Batches to ship now, and when the next open batch's linger expires.

        ``held``: (topic, partition)s that already have a closed batch waiting to go. Their open batch stays
        open past its linger and keeps taking records (as Kafka's accumulator does), since closing it could
        not make it leave any sooner; that is what lets ``linger_ms=0`` batch under load instead of queueing
        one request per record. A full batch, a flush and close() still close it at once.
        """
        with self._lock:
            next_s = None
            for batch in list(self._open.values()):
                if self._flush_requested or self._closed:
                    self._close_batch(batch)
                elif batch.created_s + self.linger_s <= now_s:
                    if (batch.topic, batch.partition) not in held:
                        self._close_batch(batch)
                else:
                    expiry = batch.created_s + self.linger_s
                    next_s = expiry if next_s is None else min(next_s, expiry)
            ready = list(self._ready)
            self._ready.clear()
            self._taken.update(ready)
            return ready, next_s

    def _release(self, batch: ProducerBatch) -> None:
        with self._lock:
            self._taken.discard(batch)
            self._free_bytes += batch.bytes
            assert self._free_bytes <= self.buffer_bytes
            self._space.notify_all()

    # -- metrics -----------------------------------------------------------------------------------

    def metrics(self) -> dict[str, int | float]:
        """Counters since the producer was made, as kafka-python's metrics() holds them (snake_case names):
        records and bytes acknowledged (``records_sent``, ``bytes_sent``: buffer bytes, as ``batch_bytes``
        counts them; with acks=0, sent), ``batches_sent``, ``requests_sent``, ``retries`` (batch attempts
        retried), ``record_errors`` / ``batch_errors`` (completed with an error), ``requests_in_flight``,
        ``batches_in_flight``, ``buffer_bytes_used`` and ``buffer_bytes_total``, ``batch_records_avg``.
        Read without stopping the sender, so two counters may be a batch apart."""
        sender = self._sender
        in_flight = list(sender.in_flight.values())
        return {"records_sent": sender.records_acked, "bytes_sent": sender.bytes_acked,
                "batches_sent": sender.batches_acked, "requests_sent": sender.requests_sent,
                "retries": sender.retries, "record_errors": sender.records_failed,
                "batch_errors": sender.batches_failed, "requests_in_flight": len(in_flight),
                "batches_in_flight": sum(len(batches) for _, batches, _ in in_flight),
                "buffer_bytes_used": self.buffer_bytes - self._free_bytes, "buffer_bytes_total": self.buffer_bytes,
                "batch_records_avg": sender.records_acked / sender.batches_acked if sender.batches_acked else 0.0}

    # -- lifecycle ---------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Ship every record sent so far and wait until each is acknowledged or failed."""
        with self._lock:
            pending = list(self._open.values()) + list(self._ready) + list(self._taken)
            self._flush_requested = True
        self._wake()
        try:
            deadline_s = None if timeout is None else time.monotonic() + timeout
            for batch in pending:
                remaining = None if deadline_s is None else max(0.0, deadline_s - time.monotonic())
                if not batch.done.wait(remaining):
                    raise Timeout(f"flush() did not finish within {timeout} s")
        finally:
            with self._lock:
                self._flush_requested = False

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the sender thread and release the sockets."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            with self._lock:
                self._closed = True
                self._space.notify_all()
            try:
                self._sender.stop()
                self._requester.close()
                self._context.term()
            finally:
                gil.release()

    def __enter__(self) -> Producer[KeyIn, ValueIn]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
