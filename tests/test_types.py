"""The client's public modules type-check in mypy's strict mode (pyproject.toml, [tool.mypy]): the types users
see in their editors and their own mypy runs (the package ships ``py.typed``) hold."""

from __future__ import annotations

import os
import subprocess
import sys

from nodes.cluster import REPO_ROOT


def test_the_public_modules_pass_mypy_strict():
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found" in out.stdout


def test_every_module_of_the_client_is_checked():
    # What a user imports is bus/ (nodes/, store/ and bench/ are the servers' and the bench's): all of it, the
    # `bus` command's modules too, is in the strict list.
    import tomllib

    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        files = set(tomllib.load(f)["tool"]["mypy"]["files"])
    modules = {os.path.relpath(os.path.join(folder, name), REPO_ROOT)
               for folder, _, names in os.walk(os.path.join(REPO_ROOT, "bus")) for name in names if name.endswith(".py")}
    assert len(modules) > 20
    assert modules - files == set(), "bus modules mypy --strict does not check"
    assert files - modules == set(), "listed modules that are not there"


def test_the_package_says_it_is_typed():
    assert os.path.isfile(os.path.join(REPO_ROOT, "bus", "py.typed"))


# A user's module, checked as a user's mypy --strict would: the lazy names are the real classes, a misspelt
# one is an error (not Any), and the public calls take and return what their docs say; a consumer's records
# carry what its deserializers return (bytes without them), a producer's send() takes what its serializers
# take, and bus.aio's constructors take the sync ones' options, typed, and no others.
USER_CODE = '''
import bus
import bus.aio
from bus import Consumer, Producer, Record, TopicPartition
from bus.serializers import json_deserializer, json_serializer

def produce(producer: Producer) -> None:
    future = producer.send("t", bytearray(b"v"), key=b"k", headers=[("h", b"x")])
    reveal_type(future.get(timeout=1.0))
    reveal_type(producer.send_many("t", [b"a", None])[0])

def consume(consumer: Consumer) -> None:
    reveal_type(consumer.poll())
    offsets: dict[TopicPartition, int] = consumer.end_offsets(consumer.assignment())
    consumer.commit(offsets)
    consumer.commit({("t", 0): (5, "metadata")})

async def aio_calls(producer: bus.aio.Producer, admin: bus.aio.Admin) -> None:
    reveal_type(await producer.send("t", b"v"))
    reveal_type(await admin.group_offsets("g"))

bus.Prodcuer

def order(data: bytes) -> dict[str, int]:
    return {"qty": len(data)}

def consume_deserialized(bootstrap: str) -> None:
    reveal_type(Consumer(bootstrap))
    orders = Consumer(bootstrap, value_deserializer=order, key_deserializer=bytes.decode)
    reveal_type(orders)
    reveal_type(orders.poll()[0].value)
    for record in orders:
        reveal_type(record.key)
    reveal_type(Consumer(bootstrap, value_deserializer=json_deserializer).poll()[0].value)

def handle(record: Record) -> None:
    reveal_type(record.value)

def produce_serialized(bootstrap: str) -> None:
    producer = Producer(bootstrap, value_serializer=json_serializer, key_serializer=str.encode)
    producer.send("t", {"item": "book"}, key="alice")
    producer.send_many("t", [{"item": "pens"}, None], keys=["bob", None])
    producer.send("t", b"v", key=b"k")
    Producer(bootstrap).send("t", "text")

async def aio_typed(bootstrap: str, plain: bus.aio.Consumer) -> None:
    reveal_type(plain)
    orders = bus.aio.Consumer(bootstrap, value_deserializer=order)
    async for record in orders:
        reveal_type(record.value)
    reveal_type(await orders.poll())
    bus.aio.Producer(bootstrap, key_serializer=str.encode).send("t", b"v", key="k")
    bus.aio.Producer(bootstrap, linger_ms="5")
    bus.aio.Consumer(bootstrap, max_poll_interval_ms=1000, typo=1)
'''


def test_a_users_code_sees_the_real_types(tmp_path):
    path = tmp_path / "user_code.py"
    path.write_text(USER_CODE)
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=240)
    lines = [line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith(str(path))]
    assert lines == [
        'note: Revealed type is "tuple[str, int, int, int, fallback=bus.records.RecordMetadata]"',
        'note: Revealed type is "tuple[bus.producer.ProducerBatch, int, fallback=bus.producer.RecordFuture]"',
        'note: Revealed type is "list[tuple[str, int, int, bytes | None, bytes | None, '
        'list[tuple[str, bytes | None]] | None, int, fallback=bus.records.Record[bytes, bytes]]]"',
        'note: Revealed type is "tuple[str, int, int, int, fallback=bus.records.RecordMetadata]"',
        'note: Revealed type is "dict[tuple[str, int, fallback=bus.records.TopicPartition], int]"',
        'error: Module has no attribute "Prodcuer"  [attr-defined]',
        'note: Revealed type is "bus.consumer.Consumer[bytes, bytes]"',
        'note: Revealed type is "bus.consumer.Consumer[str, dict[str, int]]"',
        'note: Revealed type is "dict[str, int] | None"',
        'note: Revealed type is "str | None"',
        'note: Revealed type is "Any | None"',  # json_deserializer returns Any: JSON may be any value
        'note: Revealed type is "bytes | None"',
        'error: Argument "key" to "send" of "Producer" has incompatible type "bytes"; expected "str | None"  '
        '[arg-type]',
        'error: Argument 2 to "send" of "Producer" has incompatible type "str"; '
        'expected "bytes | bytearray | memoryview[int] | None"  [arg-type]',
        'note: Revealed type is "bus.aio.Consumer[bytes, bytes]"',
        'note: Revealed type is "dict[str, int] | None"',
        'note: Revealed type is "list[tuple[str, int, int, bytes | None, dict[str, int] | None, '
        'list[tuple[str, bytes | None]] | None, int, fallback=bus.records.Record[bytes, dict[str, int]]]]"',
        'error: Argument "linger_ms" to "Producer" has incompatible type "str"; expected "int"  [arg-type]',
        'error: Unexpected keyword argument "typo" for "Consumer"  [call-arg]',
        'note: "Consumer" defined in "bus.aio"',
    ], out.stdout + out.stderr
