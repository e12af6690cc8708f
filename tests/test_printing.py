"""How `bus consume` prints records (bus/printing.py): lossless JSON, kcat-style format strings."""

from __future__ import annotations

import base64
import json

import pytest

from bus.printing import check_format, record_formatted, record_json
from bus.records import Record

BINARY = bytes(range(256))


def record(value=b"v", key=b"k", headers=None):
    return Record("t", 2, 41, key, value, headers, 1_700_000_000_000)


def test_json_is_lossless_for_any_bytes():
    out = json.loads(record_json(record(value=BINARY, key="clé".encode(), headers=[("h", BINARY), ("u", b"x")])))
    assert out["value_encoding"] == "base64" and base64.b64decode(out["value"]) == BINARY
    assert out["key_encoding"] == "utf-8" and out["key"].encode() == "clé".encode()
    assert out["headers"][0] == {"name": "h", "value": base64.b64encode(BINARY).decode(), "encoding": "base64"}
    assert out["headers"][1] == {"name": "u", "value": "x", "encoding": "utf-8"}
    assert (out["topic"], out["partition"], out["offset"], out["timestamp_ms"]) == ("t", 2, 41, 1_700_000_000_000)


def test_json_of_a_record_without_key_headers_or_value():
    out = json.loads(record_json(record(value=None, key=None)))
    assert out["key"] is None and out["key_encoding"] is None and out["headers"] is None
    assert out["value"] is None and out["value_encoding"] is None


def test_json_of_a_header_without_a_value():
    # Kafka's record format lets a header's value be null, and Kafka producers send such records to the bus.
    out = json.loads(record_json(record(headers=[("trace", None), ("u", b"x")])))
    assert out["headers"] == [{"name": "trace", "value": None, "encoding": None},
                              {"name": "u", "value": "x", "encoding": "utf-8"}]
    assert record_formatted(record(headers=[("trace", None)]), "%h") == "trace="


def test_format_tokens_and_escapes():
    line = record_formatted(record(headers=[("a", b"1"), ("b", b"2")]), r"%t/%p@%o %k=%s (%K,%S) %T %h 100%%\n")
    assert line == "t/2@41 k=v (1,1) 1700000000000 a=1,b=2 100%\n"
    assert record_formatted(record(key=None), "[%k] %K\\t.") == "[] -1\t."


@pytest.mark.parametrize("template, message", [("%x", "%x"), ("ends in %", "at the end"), ("xml", "neither")])
def test_an_unknown_token_is_named(template, message):
    with pytest.raises(ValueError, match=message):
        check_format(template)
    check_format("%t %p %o %k %K %s %S %T %h %%")
