"""The sender's per-partition decisions (bus/sender.py, PartitionQueue), pure, on a fake clock: the in-flight
window of PARTITION_IN_FLIGHT_BATCHES_MAX from the oldest unsettled batch, resends within it, retries held
until every in-flight batch is back and sent again in sequence order after the back-off, renumbering after a
definite failure and a fresh producer id after an unknown one, delivery timeouts. The end-to-end pair is
tests/test_faults.py's idempotent producer under kills, pauses, lost and duplicated messages."""

from __future__ import annotations

from bus.errors import INDETERMINATE, NodeUnavailable, StorageFull, Timeout
from bus.producer import ProducerBatch
from bus.sender import PARTITION_IN_FLIGHT_BATCHES_MAX, PartitionQueue

RECORDS = 10  # per batch


def queued(count: int, deadline_s: float = 100.0) -> tuple[PartitionQueue, list]:
    queue = PartitionQueue(producer_id=7, producer_epoch=0)
    batches = []
    for i in range(count):
        batch = ProducerBatch("t", 0, 0.0, deadline_s + i)
        batch.sequence, batch.count = i * RECORDS, RECORDS
        batches.append(batch)
    queue.queue = list(batches)
    queue.next_sequence = count * RECORDS
    return queue, batches


def test_the_window_holds_at_most_its_batches_from_the_oldest_unsettled_one():
    queue, batches = queued(PARTITION_IN_FLIGHT_BATCHES_MAX + 2)
    sent = [queue.take_if_in_window(True) for _ in range(PARTITION_IN_FLIGHT_BATCHES_MAX)]
    assert sent == batches[:PARTITION_IN_FLIGHT_BATCHES_MAX] and queue.in_flight == PARTITION_IN_FLIGHT_BATCHES_MAX
    assert queue.take_if_in_window(True) is None  # the window is full
    sent[1].done.set()  # a later one settled: the oldest still holds the window
    queue.acknowledged(sent[1])
    assert queue.take_if_in_window(True) is None
    sent[0].done.set()
    queue.acknowledged(sent[0])  # the oldest settled: the window moves on by two
    assert queue.take_if_in_window(True) is batches[-2] and queue.take_if_in_window(True) is batches[-1]
    assert queue.acked_sequence == 2 * RECORDS


def test_a_retry_waits_for_every_in_flight_batch_and_the_back_off_then_goes_in_sequence_order():
    queue, batches = queued(3)
    first, second, third = (queue.take_if_in_window(True) for _ in range(3))
    queue.in_flight -= 1  # the shell counts an answered batch out, then decides
    queue.retry(second, NodeUnavailable("lost"), now_s=10.0, backoff_s=0.05, in_flight=False)
    assert second.maybe_written and second.last_error.code == NodeUnavailable.code
    assert not queue.sendable(10.1)  # two still in flight: nothing goes before they are back
    queue.in_flight -= 1
    queue.retry(first, Timeout("no reply"), now_s=10.2, backoff_s=0.05, in_flight=False)
    queue.acknowledged(third)
    assert queue.queue == [first, second]  # in sequence order
    assert not queue.sendable(10.24) and queue.sendable(10.25)  # after the back-off from the last retry
    assert not queue.renumber_needed() and not queue.retrying  # a plain retry keeps its sequences
    # both resends are within the window already (their sequences are below its newest): they go at once
    assert queue.take_if_in_window(True) is first and queue.take_if_in_window(True) is second


def test_a_definite_failure_renumbers_and_an_unknown_one_takes_a_new_producer_id():
    queue, batches = queued(2)
    queue.take_if_in_window(True)
    queue.in_flight -= 1
    queue.failed(StorageFull("disk full"))  # definitely not written
    assert queue.sendable(0.0) and queue.renumber_needed() and queue.renumber and not queue.new_producer_id
    queue, batches = queued(2)
    queue.take_if_in_window(True)
    queue.in_flight -= 1
    unknown = Timeout("no reply")
    unknown.outcome = INDETERMINATE
    queue.failed(unknown)
    assert queue.renumber_needed() and queue.new_producer_id


def test_expired_takes_the_batches_past_their_delivery_timeout_oldest_first():
    queue, batches = queued(3, deadline_s=5.0)  # deadlines 5, 6, 7
    assert queue.expired(4.9) == []
    assert queue.expired(6.0) == batches[:2] and queue.queue == batches[2:]


def test_without_idempotence_the_limit_is_batches_in_flight():
    queue, batches = queued(PARTITION_IN_FLIGHT_BATCHES_MAX + 1)
    for _ in range(PARTITION_IN_FLIGHT_BATCHES_MAX):
        assert queue.take_if_in_window(False) is not None
    assert queue.take_if_in_window(False) is None
    queue.in_flight -= 1
    assert queue.take_if_in_window(False) is batches[-1]
