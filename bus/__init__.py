"""The bus: a durable, partitioned event log on ZeroMQ and LMDB. This package is what a service imports.

Its public names load on first use (PEP 562), so that importing one of the formats this package holds
(``bus.wire``, ``bus.batch``, ``bus.errors``, ``bus.records``, ``bus.clock``: the leaf modules the nodes and
the store share with the clients) does not load the client, and with it ZeroMQ. ``from bus import Producer``
and ``bus.Producer`` work as ever; ``docs/architecture.md`` says which package may import what, and
``tests/test_layout.py`` holds every package to it.

Why lazy names rather than a separate top-level package for the formats: a user catching
``bus.errors.NotLeader`` catches the very class a node raises, from the one module that defines it, with no
re-exporting copy of the errors or value types to keep in step.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module (within this package) that defines it
_PUBLIC = {
    "Admin": "admin",
    "BusError": "errors",
    "Consumer": "consumer",
    "FutureList": "producer",
    "Producer": "producer",
    "Record": "records",
    "RecordFuture": "producer",
    "RecordMetadata": "records",
    "TopicPartition": "records",
    "run_consumers": "fork_guard",
}

# public submodules, loaded on first use like the names above (``bus.serializers.json_serializer``,
# ``bus.aio.Producer``: the asyncio clients)
_SUBMODULES = ("aio", "errors", "serializers")

__all__ = sorted([*_PUBLIC, *_SUBMODULES])

if TYPE_CHECKING:
    # What type checkers see instead of the lazy names: the real classes, re-exported explicitly (``X as X``:
    # mypy's strict mode takes no implicit re-export, and cannot read the computed ``__all__``).
    from . import aio as aio, errors as errors, serializers as serializers
    from .admin import Admin as Admin
    from .consumer import Consumer as Consumer
    from .errors import BusError as BusError
    from .fork_guard import run_consumers as run_consumers
    from .producer import FutureList as FutureList, Producer as Producer, RecordFuture as RecordFuture
    from .records import Record as Record, RecordMetadata as RecordMetadata, TopicPartition as TopicPartition
else:
    # Out of the type checkers' sight, so that a misspelt name (``bus.Prodcuer``) is their error, not Any.
    def __getattr__(name: str) -> Any:
        module = _PUBLIC.get(name)
        if module is None:
            if name in _SUBMODULES:
                return importlib.import_module(f".{name}", __name__)
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})
