"""The producer's parts that need no cluster: the lazy futures of send_many(), the GIL switch-interval
holder, and the background I/O thread's hold on its sockets."""

from __future__ import annotations

import logging
import sys
import threading

import pytest
import zmq

from bus import gil
from bus.background import BackgroundIO
from bus.clock import LOOP_WAIT_MS_MAX
from bus.producer import FutureList, ProducerBatch, RecordFuture
from tests.conftest import wait_for


def _batch(partition: int, count: int) -> ProducerBatch:
    batch = ProducerBatch("t", partition, 0.0, 60.0)
    batch.flat = [None, None, b"v", None] * count
    batch.count = count
    return batch


def test_future_list_is_the_sequence_of_its_runs():
    a, b = _batch(0, 10), _batch(1, 5)
    futures = FutureList([(a, 7, 3), (b, 0, 5)])  # a's records 7..9, then b's 0..4
    expected = [(a, 7), (a, 8), (a, 9), (b, 0), (b, 1), (b, 2), (b, 3), (b, 4)]
    assert len(futures) == 8
    assert [tuple(f) for f in futures] == expected
    assert [tuple(futures[i]) for i in range(8)] == expected
    assert tuple(futures[-1]) == (b, 4) and tuple(futures[-8]) == (a, 7)
    assert [tuple(f) for f in futures[2:6:2]] == [(a, 9), (b, 1)]
    assert all(type(f) is RecordFuture for f in futures)
    with pytest.raises(IndexError):
        futures[8]
    with pytest.raises(IndexError):
        futures[-9]
    joined = [RecordFuture((a, 0))] + futures
    assert len(joined) == 9 and isinstance(joined, list)
    assert futures == list(futures) and futures != list(futures)[:-1]
    assert FutureList([]) == [] and len(FutureList([])) == 0
    singles = FutureList.of([RecordFuture((a, 3)), RecordFuture((b, 1))])
    assert [tuple(f) for f in singles] == [(a, 3), (b, 1)] and tuple(singles[-1]) == (b, 1)


def test_future_list_futures_complete_with_their_batch():
    a, b = _batch(0, 4), _batch(3, 2)
    futures = FutureList([(a, 2, 2), (b, 0, 2)])
    a.flat[4 * 3] = 555  # record 3 of a was sent with a timestamp of its own
    assert not any(f.done() for f in futures)
    a.complete(100, None, 1_000)
    b.complete(7, None, 2_000)
    got = [f.get(0) for f in futures]
    assert [(m.partition, m.offset) for m in got] == [(0, 102), (0, 103), (3, 7), (3, 8)]
    assert [m.timestamp_ms for m in got] == [1_000, 555, 2_000, 2_000]  # the append time, unless its own


@pytest.fixture
def default_interval():
    found = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(found)


def test_gil_interval_is_lowered_while_held_and_restored_by_the_last_release(default_interval):
    gil.acquire()
    gil.acquire()
    assert sys.getswitchinterval() == gil.SWITCH_INTERVAL_S
    gil.release()
    assert sys.getswitchinterval() == gil.SWITCH_INTERVAL_S  # one holder left
    gil.release()
    assert sys.getswitchinterval() == 0.005


def test_gil_interval_never_raised_and_a_later_setting_is_kept(default_interval):
    sys.setswitchinterval(0.0001)  # the user's own, lower than ours: left alone
    gil.acquire()
    assert sys.getswitchinterval() == pytest.approx(0.0001)
    gil.release()
    assert sys.getswitchinterval() == pytest.approx(0.0001)
    sys.setswitchinterval(0.005)
    gil.acquire()
    sys.setswitchinterval(0.002)  # changed while held: not ours to undo
    gil.release()
    assert sys.getswitchinterval() == pytest.approx(0.002)


class _MetadataOnly(BackgroundIO):
    """Asks for metadata every turn from a coordinator that never answers."""

    def _step(self) -> None:
        self._refresh_metadata()
        self._poll(LOOP_WAIT_MS_MAX)


def test_background_thread_closes_the_coordinator_it_replaced():
    context = zmq.Context()
    thread = _MetadataOnly(context, name="bus-test-background", bootstrap="inproc://bus-test-nobody",
                           metadata_timeout_ms=20, retry_backoff_s=0.0, log=logging.getLogger("bus.test"))
    thread.start()
    first = wait_for(lambda: thread.coordinator, message="the thread's first coordinator")
    wait_for(lambda: thread.coordinator is not first, message="a coordinator reset after a failed refresh")
    thread.stop()
    assert thread.metadata is None
    # context.term() waits for every socket of the context: one left open would hang close() for ever.
    terminated = threading.Thread(target=context.term, daemon=True)
    terminated.start()
    terminated.join(5.0)
    assert not terminated.is_alive(), "a socket of the background thread was left open"
