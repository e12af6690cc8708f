"""What each wire error code tells a client to do next: retry, refresh its metadata, or neither.

The error classes (bus/errors.py) are the one place this is decided; the producer's sender, the consumer's
fetcher and the group member read it from there. This pins the table, so a change to it is deliberate.
"""

from __future__ import annotations

import pytest

from bus import errors
from bus.errors import BusError, error_class, error_for

# Every error a producer retries: the same batch, with the same sequence, may be written if sent again.
RETRIABLE = {"NOT_LEADER", "FENCED_LEADER_EPOCH", "UNKNOWN_LEADER_EPOCH", "NOT_ENOUGH_REPLICAS",
             "NOT_COMMITTED", "OFFSET_NOT_AVAILABLE", "OUT_OF_ORDER_SEQUENCE",
             "UNKNOWN_TOPIC", "UNKNOWN_PARTITION", "NODE_UNAVAILABLE", "TIMEOUT", "NO_NODES_AVAILABLE"}
# The errors that mean the client's view of the cluster may be stale: leadership moved, or a node went quiet.
REFRESH_METADATA = {"NOT_LEADER", "FENCED_LEADER_EPOCH", "NOT_COMMITTED", "UNKNOWN_TOPIC", "UNKNOWN_PARTITION",
                    "NODE_UNAVAILABLE", "TIMEOUT"}


def _codes() -> set[str]:
    found, todo = set(), [BusError]
    while todo:
        cls = todo.pop()
        found.add(cls.code)
        todo.extend(cls.__subclasses__())
    return found


def test_every_code_is_retriable_and_refreshes_metadata_as_pinned():
    codes = _codes()
    assert RETRIABLE | REFRESH_METADATA <= codes
    assert {code for code in codes if error_class(code).retriable} == RETRIABLE
    assert {code for code in codes if error_class(code).refresh_metadata} == REFRESH_METADATA
    assert REFRESH_METADATA <= RETRIABLE  # a producer retries after refreshing, never gives up on stale metadata


@pytest.mark.parametrize("code", sorted(_codes()))
def test_the_class_and_the_instance_of_a_code_agree(code):
    cls, exc = error_class(code), error_for(code, "m")
    assert type(exc) is cls and exc.code == code and exc.message == "m"
    assert (exc.retriable, exc.refresh_metadata) == (cls.retriable, cls.refresh_metadata)


def test_buffer_full_is_a_timeout_that_is_not_retried():
    # send()'s caller decides what to do when the buffer stayed full; a Timeout is otherwise retriable.
    assert issubclass(errors.BufferFull, errors.Timeout)
    assert errors.Timeout.retriable and not errors.BufferFull.retriable
    assert errors.BufferFull.outcome == errors.DEFINITE


def test_an_unknown_code_is_neither_retried_nor_a_reason_to_refresh():
    assert error_class("NO_SUCH_CODE_YET") is BusError
    exc = error_for("NO_SUCH_CODE_YET", "from a newer server")
    assert type(exc) is BusError and exc.code == "NO_SUCH_CODE_YET"
    assert not exc.retriable and not exc.refresh_metadata


def test_fenced_errors_are_never_retried():
    for code in _codes():
        cls = error_class(code)
        if cls.outcome == errors.FENCED:
            assert not cls.retriable and not cls.refresh_metadata, code
