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


def test_the_package_says_it_is_typed():
    assert os.path.isfile(os.path.join(REPO_ROOT, "bus", "py.typed"))


# A user's module, checked as a user's mypy --strict would: the lazy names are the real classes, a misspelt
# one is an error (not Any), and the public calls take and return what their docs say.
USER_CODE = '''
import bus
import bus.aio
from bus import Consumer, Producer, TopicPartition

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
        'list[tuple[str, bytes | None]] | None, int, fallback=bus.records.Record]]"',
        'note: Revealed type is "tuple[str, int, int, int, fallback=bus.records.RecordMetadata]"',
        'note: Revealed type is "dict[tuple[str, int, fallback=bus.records.TopicPartition], int]"',
        'error: Module has no attribute "Prodcuer"  [attr-defined]',
    ], out.stdout + out.stderr
