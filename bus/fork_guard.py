"""What a client does in a process forked from the one that made it: every public call raises ForkedError
instead of hanging on threads that did not survive the fork; ``close()`` does nothing (the sockets and
threads are the parent's). And ``run_consumers``, the documented way to run one consumer per process.

How a client is disarmed: each client registers itself when it is made (a weak reference); in the child,
``os.register_at_fork(after_in_child=...)`` replaces every public method of each one still alive with one
that raises. So the parent pays nothing per call (no ``os.getpid()`` on ``send()``'s path, a system call
since glibc stopped caching it), and the child cannot reach the old threads by any public method.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, NoReturn, cast

from .errors import ForkedError

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess

CHILD_STOP_TIMEOUT_S = 10.0  # run_consumers: after SIGTERM, how long a child has before SIGKILL

_clients: weakref.WeakSet[object] = weakref.WeakSet()


def register(client: object) -> None:
    """Called by each client's constructor: disarm it in any process forked from this one."""
    client._created_pid = os.getpid()  # type: ignore[attr-defined]  # any client class: its own attribute
    _clients.add(client)


def _forked_error(client: Any, name: str) -> ForkedError:
    kind = f"{type(client).__module__}.{type(client).__name__}"
    return ForkedError(
        f"{kind}.{name}() in process {os.getpid()}, a child made by os.fork() of process {client._created_pid} that "
        f"made this {type(client).__name__}: its threads did not survive the fork and its sockets are the "
        "parent's. Make the client in the child (bus.run_consumers(n, target) runs one consumer per process, "
        "started with multiprocessing's spawn)")


def _disarm(client: object) -> None:
    cls = type(client)
    for name, member in inspect.getmembers(cls, callable):
        if name.startswith("_") or isinstance(member, type):
            continue
        replacement: Callable[..., object]
        if name == "close":
            replacement = _no_op_async if inspect.iscoroutinefunction(member) else _no_op
        else:
            error = _forked_error(client, name)

            def replacement(*args: object, _error: ForkedError = error, **kwargs: object) -> NoReturn:
                raise _error
        object.__setattr__(client, name, replacement)


def _no_op(*args: object, **kwargs: object) -> None:
    """close() in a forked child: the threads and sockets are the parent's to close."""


async def _no_op_async(*args: object, **kwargs: object) -> None:
    """bus.aio's close() in a forked child (awaited by ``async with``)."""


def _after_fork_in_child() -> None:
    for client in list(_clients):
        _disarm(client)
    _clients.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def run_consumers(n: int, target: Callable[..., object], args: tuple[Any, ...] = (), *,
                  stop_timeout_s: float = CHILD_STOP_TIMEOUT_S) -> list[int]:
    """Run ``target(index, *args)`` in ``n`` child processes (index 0..n-1), each making its own Consumer, and
    wait for all of them; returns their exit codes (0 for each that returned).

    The children start with multiprocessing's "spawn" (a fresh interpreter: no client, thread or socket of
    this process in them), so ``target`` and ``args`` must be picklable (a module-level function). Every
    child is reaped: if this call is interrupted (Ctrl-C) or fails, each child still running gets SIGTERM,
    then SIGKILL after ``stop_timeout_s``, before the exception goes on.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, not {n!r}")
    if not callable(target):
        raise TypeError(f"target must be callable, not {target!r}")
    context = multiprocessing.get_context("spawn")
    children: list[SpawnProcess] = []
    try:
        for index in range(n):
            child = context.Process(target=target, args=(index, *args), name=f"bus-consumer-{index}")
            child.start()
            children.append(child)
        for child in children:
            child.join()
        return cast("list[int]", [child.exitcode for child in children])  # joined: none is None
    finally:
        _reap(children, stop_timeout_s)


def _reap(children: Sequence[BaseProcess], stop_timeout_s: float) -> None:
    for child in children:
        if child.is_alive():
            child.terminate()
    for child in children:
        child.join(stop_timeout_s)
        if child.is_alive():
            child.kill()
            child.join()
