"""Fork safety (bus/fork_guard.py) on a real cluster: a client used in a child made by os.fork() raises
ForkedError naming os.fork and run_consumers instead of hanging, while the parent's clients carry on; and
``bus.run_consumers`` runs one consumer per spawned process, every child reaped, also on Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

import bus
import bus.aio
from bus.errors import ForkedError
from nodes.cluster import REPO_ROOT
from tests.conftest import wait_for

TOPIC = "forked"


@pytest.fixture(scope="module")
def served(one_node):
    with bus.Admin(one_node.bootstrap) as admin:
        admin.create_topic(TOPIC, 3)
    return one_node


def _in_child(calls) -> dict:
    """Fork; in the child run each (name, fn) and report what it raised; the parent gets the report (or fails
    after a deadline: a hang is what this guards against)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_fd)
            outcome = {}
            for name, fn in calls:
                try:
                    fn()
                    outcome[name] = None
                except Exception as exc:
                    outcome[name] = [type(exc).__name__, str(exc)]
            os.write(write_fd, json.dumps(outcome).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    deadline_s = time.monotonic() + 20
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline_s:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung")
        time.sleep(0.02)
    with os.fdopen(read_fd, "rb") as f:
        return json.loads(f.read() or b"{}")


def test_clients_used_in_a_forked_child_raise_forked_error_and_the_parent_carries_on(served):
    producer = bus.Producer(served.bootstrap)
    consumer = bus.Consumer(served.bootstrap, auto_offset_reset="earliest")
    admin = bus.Admin(served.bootstrap)
    aio_producer = bus.aio.Producer(served.bootstrap)
    try:
        producer.send(TOPIC, b"before", partition=0).get(timeout=10)
        consumer.assign([(TOPIC, 0)])
        outcome = _in_child([
            ("send", lambda: producer.send(TOPIC, b"in the child")),
            ("flush", lambda: producer.flush(timeout=5)),
            ("poll", lambda: consumer.poll(timeout_ms=1000)),
            ("commit", lambda: consumer.commit()),
            ("list_topics", lambda: admin.list_topics()),
            ("aio send", lambda: aio_producer.send(TOPIC, b"in the child")),
            ("aio flush", lambda: asyncio.run(aio_producer.flush())),
            ("close", lambda: (producer.close(), consumer.close(), admin.close())),  # does nothing in the child
            ("aio close", lambda: asyncio.run(aio_producer.close())),
        ])
        for name in ("send", "flush", "poll", "commit", "list_topics", "aio send", "aio flush"):
            kind, message = outcome[name]
            assert kind == "ForkedError", (name, outcome[name])
            assert "os.fork()" in message and "bus.run_consumers" in message, message
        assert outcome["close"] is None and outcome["aio close"] is None
        # The parent's clients were never touched by the child.
        assert producer.send(TOPIC, b"after", partition=0).get(timeout=10).offset == 1
        # Polled until both are in: "before" may be buffered (and returned) before "after" reaches the fetcher.
        got: list = []
        wait_for(lambda: got.extend(consumer.poll(timeout_ms=200)) or len(got) >= 2, 10,
                 message="the parent's records")
        assert [r.value for r in got] == [b"before", b"after"]
        assert TOPIC in admin.list_topics()
    finally:
        producer.close()
        consumer.close()
        admin.close()
        asyncio.run(aio_producer.close())
    assert issubclass(ForkedError, bus.BusError) and ForkedError.code == "FORKED"


def read_partition(index: int, bootstrap: str, out_dir: str) -> None:
    """run_consumers' target in the test below: a Consumer of its own reads partition ``index``."""
    with bus.Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([(TOPIC + "-each", index)])
        got: list = []
        deadline_s = time.monotonic() + 20
        while len(got) < 10 and time.monotonic() < deadline_s:
            got += consumer.poll(timeout_ms=200)
    with open(os.path.join(out_dir, f"{index}.json"), "w") as f:
        json.dump([r.value.decode() for r in got], f)


def sleep_long(index: int) -> None:
    time.sleep(600)


def test_run_consumers_runs_one_consumer_per_spawned_process(served, tmp_path):
    with bus.Admin(served.bootstrap) as admin:
        admin.create_topic(TOPIC + "-each", 3)
    with bus.Producer(served.bootstrap) as producer:
        for i in range(30):
            producer.send(TOPIC + "-each", b"%d" % i, partition=i % 3)
        producer.flush()
    assert bus.run_consumers(3, read_partition, (served.bootstrap, str(tmp_path))) == [0, 0, 0]
    for index in range(3):
        with open(tmp_path / f"{index}.json") as f:
            assert json.load(f) == [str(i) for i in range(index, 30, 3)]
    with pytest.raises(ValueError):
        bus.run_consumers(0, read_partition)


def test_run_consumers_reaps_every_child_on_ctrl_c():
    script = ("import bus, tests.test_fork as t\n"
              "try:\n    bus.run_consumers(2, t.sleep_long, stop_timeout_s=5)\n"
              "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": REPO_ROOT})
    try:
        process = psutil.Process(parent.pid)
        def consumers():  # its children but spawn's resource tracker
            found = [c for c in process.children() if "resource_tracker" not in " ".join(c.cmdline())]
            return found if len(found) == 2 else None

        children = wait_for(consumers, 20, message="two consumer processes")
        parent.send_signal(signal.SIGINT)  # as Ctrl-C sends to the parent alone
        out, _ = parent.communicate(timeout=20)
        assert "interrupted" in out
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
