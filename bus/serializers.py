"""Ready serializers for ``Producer(key_serializer=, value_serializer=)`` and deserializers for
``Consumer(key_deserializer=, value_deserializer=)``: JSON and msgpack.

A serializer takes one object and returns bytes; a deserializer takes the bytes and returns the object. The
clients never call either for None (a tombstone, or a record without a key), as kafka-python does; one that
raises becomes ``bus.errors.SerializationError`` naming the argument (and, on the consumer, the record).
Any callable of that shape works as well: ``key_serializer=str.encode``, ``key_deserializer=bytes.decode``.

Nothing here imports ZeroMQ or the client; ``import bus.serializers`` loads only json and msgpack.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

__all__ = ["json_deserializer", "json_serializer", "msgpack_deserializer", "msgpack_serializer"]

_json_encode = json.JSONEncoder(separators=(",", ":")).encode  # compact: no spaces after , and :


def json_serializer(obj: Any) -> bytes:
    """``obj`` as compact JSON in UTF-8 (ASCII, non-ASCII characters escaped: any str encodes)."""
    return _json_encode(obj).encode()


def json_deserializer(data: bytes) -> Any:
    return json.loads(data)


def msgpack_serializer(obj: Any) -> bytes:
    """``obj`` as msgpack: bytes and str stay apart (bin and str types); a tuple comes back as a list.

    A Packer per call: one shared between threads could interleave two objects whose packing runs Python
    code (a dict or list subclass), as send() may be called from any thread."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def msgpack_deserializer(data: bytes) -> Any:
    """What msgpack_serializer wrote, maps with any keys it wrote (int keys too) included."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
