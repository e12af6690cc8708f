"""bus.aio's constructors are the sync clients': the same parameters, kinds, defaults and annotations, one for
one, as inspect and help() show them (the sync classes alone hold the options and their defaults: bus/aio.py's
_wrapping gives each aio constructor its sync class's signature; a user's mypy sees the same, which
tests/test_types.py shows), every argument reaches the sync client, and an unknown option is a TypeError at
once."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest

import bus
import bus.aio
from bus.serializers import json_deserializer, json_serializer

PAIRS = [(bus.aio.Producer, bus.Producer), (bus.aio.Consumer, bus.Consumer), (bus.aio.Admin, bus.Admin)]


@pytest.mark.parametrize("aio_class, sync_class", PAIRS, ids=[aio.__name__ for aio, _ in PAIRS])
def test_each_aio_constructor_has_its_sync_constructors_signature(aio_class, sync_class):
    aio_signature, sync_signature = inspect.signature(aio_class), inspect.signature(sync_class)
    assert list(aio_signature.parameters) == list(sync_signature.parameters)
    for name, parameter in sync_signature.parameters.items():
        assert aio_signature.parameters[name] == parameter, name  # kind, default and annotation
    assert aio_signature == sync_signature
    assert len(sync_signature.parameters) > 1  # the options themselves, not **options


@pytest.mark.parametrize("make", [
    lambda: bus.aio.Producer("tcp://127.0.0.1:1", lingerms=5),
    lambda: bus.aio.Consumer("tcp://127.0.0.1:1", max_poll_interval_ms=1000, typo=1),
    lambda: bus.aio.Admin("tcp://127.0.0.1:1", timeout_ms=5),
    lambda: bus.aio.Producer("tcp://127.0.0.1:1", 2),  # the options are keyword-only, as the sync ones
], ids=["producer", "consumer", "admin", "positional"])
def test_an_unknown_option_is_a_type_error_before_anything_starts(make):
    threads_before = threading.active_count()
    with pytest.raises(TypeError):
        make()
    assert threading.active_count() == threads_before


def test_every_argument_reaches_the_sync_client(one_node):
    def on_assign(partitions):
        return None

    async def build_and_close():
        producer = bus.aio.Producer(one_node.bootstrap, linger_ms=7, batch_bytes=4096, max_block_ms=1234,
                                    compression="lz4", key_serializer=str.encode, value_serializer=json_serializer)
        consumer = bus.aio.Consumer(one_node.bootstrap, ["aio-signatures"], "aio-signatures-group",
                                    fetch_max_wait_ms=123, auto_offset_reset="earliest",
                                    value_deserializer=json_deserializer, session_timeout_ms=6000,
                                    heartbeat_interval_ms=500, on_assign=on_assign)
        admin = bus.aio.Admin(one_node.bootstrap, request_timeout_ms=4321)
        try:
            sync_producer, sync_consumer = producer._sync, consumer._sync
            assert (producer.bootstrap, sync_producer.linger_s, sync_producer.batch_bytes,
                    sync_producer.max_block_s, sync_producer.compression) == (one_node.bootstrap, 0.007, 4096,
                                                                              1.234, "lz4")
            assert (sync_producer.key_serializer, sync_producer.value_serializer) == (str.encode, json_serializer)
            assert (sync_consumer.bootstrap, sync_consumer.fetch_max_wait_ms, sync_consumer.auto_offset_reset,
                    sync_consumer.value_deserializer, sync_consumer.key_deserializer) == (
                        one_node.bootstrap, 123, "earliest", json_deserializer, None)
            options = sync_consumer._group_options
            assert (options["session_timeout_ms"], options["heartbeat_interval_ms"], options["on_assign"]) == (
                6000, 500, on_assign)
            assert sync_consumer._group is not None and sync_consumer._group.group_id == "aio-signatures-group"
            assert admin._sync.bootstrap == one_node.bootstrap
            assert admin._sync._requester.timeout_ms == 4321
        finally:
            await asyncio.gather(producer.close(), consumer.close(), admin.close())

    with bus.Admin(one_node.bootstrap) as admin:
        admin.create_topic("aio-signatures", 1, exist_ok=True)
    asyncio.run(asyncio.wait_for(build_and_close(), 60))
