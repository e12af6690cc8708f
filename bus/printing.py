"""How ``bus consume`` prints a record: as text, as one lossless JSON object, or through a kcat-style format.

Pure: a Record in, a str out. JSON keeps every byte: a key, value or header value that is valid UTF-8 is a
string, anything else base64, and ``key_encoding`` / ``value_encoding`` / a header's ``encoding`` say which,
so a program reading the JSON gets the exact bytes back (a header without a value, as Kafka's producers may
send, has value and encoding null). The format string takes kcat's ``-f`` tokens.
"""

from __future__ import annotations

import base64
import json

from .records import Record

# kcat's -f tokens that the bus has: a token -> what it prints
FORMAT_TOKENS = {
    "t": "topic",
    "p": "partition",
    "o": "offset",
    "k": "key",
    "K": "key length in bytes (-1 for none)",
    "s": "value",
    "S": "value length in bytes (-1 for none)",
    "T": "timestamp in ms",
    "h": "headers, as name=value,...",
    "%": "a percent sign",
}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _text(data: bytes | None) -> str:
    return "" if data is None else data.decode(errors="replace")


def _lossless(data: bytes) -> tuple[str, str]:
    """(text, encoding): the bytes as UTF-8 if they are, else as base64."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def _lossless_or_none(data: bytes | None) -> tuple[str | None, str | None]:
    return (None, None) if data is None else _lossless(data)


def record_json(record: Record) -> str:
    value, value_encoding = _lossless_or_none(record.value)
    key, key_encoding = _lossless_or_none(record.key)
    headers = None
    if record.headers is not None:
        headers = []
        for name, raw in record.headers:
            text, encoding = _lossless_or_none(raw)
            headers.append({"name": name, "value": text, "encoding": encoding})
    return json.dumps({"topic": record.topic, "partition": record.partition, "offset": record.offset,
                       "timestamp_ms": record.timestamp_ms, "key": key, "key_encoding": key_encoding,
                       "value": value, "value_encoding": value_encoding, "headers": headers})


def check_format(template: str) -> None:
    """ValueError naming the first unknown ``%`` token of ``template``, or for a template with none (it
    would print the same text for every record: a mistyped ``text`` or ``json``, most likely)."""
    if "%" not in template:
        raise ValueError(f"{template!r} is neither text, json nor a format string with % tokens (say %s)")
    at = 0
    while True:
        at = template.find("%", at)
        if at < 0:
            return
        token = template[at + 1:at + 2]
        if token not in FORMAT_TOKENS:
            known = " ".join(f"%{t}" for t in FORMAT_TOKENS)
            raise ValueError(f"unknown format token %{token or ' (at the end)'}; known: {known}")
        at += 2


def record_formatted(record: Record, template: str) -> str:
    """``template`` with its tokens replaced (``check_format`` first) and its backslash escapes applied."""
    out: list[str] = []
    at = 0
    while at < len(template):
        char = template[at]
        if char == "%" and at + 1 < len(template):
            out.append(_token(record, template[at + 1]))
            at += 2
        elif char == "\\" and at + 1 < len(template) and template[at + 1] in _ESCAPES:
            out.append(_ESCAPES[template[at + 1]])
            at += 2
        else:
            out.append(char)
            at += 1
    return "".join(out)


def _token(record: Record, token: str) -> str:
    if token == "t":
        return record.topic
    if token == "p":
        return str(record.partition)
    if token == "o":
        return str(record.offset)
    if token == "k":
        return _text(record.key)
    if token == "K":
        return str(-1 if record.key is None else len(record.key))
    if token == "s":
        return _text(record.value)
    if token == "S":
        return str(-1 if record.value is None else len(record.value))
    if token == "T":
        return str(record.timestamp_ms)
    if token == "h":
        return ",".join(f"{name}={_text(value)}" for name, value in record.headers or ())
    assert token == "%", token
    return "%"
