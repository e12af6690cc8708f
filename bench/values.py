"""What the bench's records hold: the values every system is given, the same for all of them.

``--values`` names the kind (``VALUE_KINDS``):

- ``random``: pseudo-random bytes, what an opaque payload (encrypted, already compressed, a hash) looks like
  to a compressor: nothing to gain.
- ``json``: JSON-like event records (``json_value``): an event id, a sequence number, a timestamp, an event
  type, a user (id, name, e-mail, plan), a session (id, device, IP address, country and city), a page
  (path, referrer), then line items (SKU, quantity, price, category) as many as fit, and a note of words
  for the bytes left. Keys repeat from record to record and values come from small vocabularies or from
  random numbers, as in a real event log: they compress, but not by the 100x a repeated constant does.

Every value is exactly ``record_bytes`` long (a JSON value is padded with spaces after its closing brace,
which is still valid JSON), so records/s and MB/s mean the same for every kind. A client process makes a
pool of distinct values (``value_pool``) before the start gate and cycles through it: the pool holds at
least one batch's worth of records (``pool_records``), so no batch holds the same value twice and a batch
compressed as a whole (the bus's ``compression=``) gains only what the values themselves allow. Pools are
made from a seeded ``random.Random`` (``VALUES_SEED`` and the client's index): the same for every run and
every system, and different for each producer process.

This module is pure: no processes, no clocks, no I/O.
"""

from __future__ import annotations

import json
import random

VALUE_KINDS = ("random", "json")
JSON_BYTES_MIN = 32  # below this a JSON value has room for little more than its braces: nothing like an event
VALUES_SEED = 15  # issue 15; any fixed number: every run and every system gets the same values
POOL_CHUNK_RECORDS = 1024  # a pool is a whole number of these (the bus's producer hands out 1,024 at a time)

_EVENTS = ("page_view", "click", "search", "add_to_cart", "remove_from_cart", "checkout", "purchase", "login",
           "logout", "signup", "share", "review")
_FIRST = ("ana", "bruno", "chen", "dara", "emeka", "fatima", "giulia", "hiro", "ines", "jonas", "kofi", "lena",
          "mateo", "nadia", "oscar", "priya", "quentin", "rosa", "sven", "tamar", "umar", "vera", "wei", "ximena",
          "yusuf", "zoe")
_LAST = ("silva", "smith", "wang", "garcia", "muller", "okafor", "rossi", "tanaka", "kowalski", "dubois", "novak",
         "haddad", "jensen", "kim", "lopez", "ivanova", "patel", "nguyen", "cohen", "berg")
_PLANS = ("free", "free", "free", "pro", "team")
_OS = ("android 14", "android 13", "ios 17.5", "ios 16.7", "windows 11", "macos 14.4", "ubuntu 24.04")
_BROWSERS = ("chrome", "firefox", "safari", "edge", "app")
_PLACES = (("US", "new york"), ("US", "austin"), ("BR", "sao paulo"), ("DE", "berlin"), ("FR", "lyon"),
           ("IN", "pune"), ("JP", "osaka"), ("NG", "lagos"), ("GB", "leeds"), ("CA", "toronto"))
_PATHS = ("/", "/search", "/cart", "/checkout", "/account", "/products/{}", "/category/{}", "/orders/{}")
_REFERRERS = ("", "https://www.google.com/", "https://news.ycombinator.com/", "https://t.co/x", "email:newsletter")
_CATEGORIES = ("books", "garden", "kitchen", "toys", "audio", "shoes", "grocery", "office", "sports", "beauty")
_WORDS = ("order", "shipped", "delayed", "customer", "asked", "about", "refund", "the", "parcel", "was", "left",
          "at", "door", "retry", "payment", "card", "declined", "gift", "wrap", "note", "please", "call", "before",
          "delivery", "warehouse", "returned", "item", "size", "colour", "swap")


def pool_records(record_bytes: int, batch_bytes: int) -> int:
    """Distinct values in a client's pool: at least one batch's worth of records, and a whole number of
    ``POOL_CHUNK_RECORDS``."""
    if record_bytes < 1 or batch_bytes < 1:
        raise ValueError("record_bytes and batch_bytes must be >= 1")
    need = max(POOL_CHUNK_RECORDS, -(-batch_bytes // record_bytes))
    return -(-need // POOL_CHUNK_RECORDS) * POOL_CHUNK_RECORDS


def value_pool(kind: str, record_bytes: int, count: int, seed: int) -> list[bytes]:
    """``count`` distinct values of exactly ``record_bytes`` each, of ``kind`` (``VALUE_KINDS``), the same
    for the same arguments."""
    if kind not in VALUE_KINDS:
        raise ValueError(f"values must be one of {', '.join(VALUE_KINDS)}, not {kind!r}")
    rng = random.Random(seed)
    if kind == "random":
        return [rng.randbytes(record_bytes) for _ in range(count)]
    return [json_value(rng, seq, record_bytes) for seq in range(count)]


def client_values(kind: str, record_bytes: int, batch_bytes: int, client_index: int) -> list[bytes]:
    """The pool a client process cycles through (``pool_records`` values), its seed its own."""
    return value_pool(kind, record_bytes, pool_records(record_bytes, batch_bytes), VALUES_SEED * 1000 + client_index)


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def _event_fields(rng: random.Random, seq: int) -> list[tuple[str, object]]:
    """One event's fields in order, drawn from ``rng`` whether or not they will fit (so the draws, and the
    values that follow, do not depend on ``record_bytes``)."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    country, city = rng.choice(_PLACES)
    path = rng.choice(_PATHS).format(rng.randint(1, 99_999))
    return [
        ("ts", 1_764_000_000_000 + seq * 7 + rng.randint(0, 6)),  # ms, rising as a log's do
        ("type", rng.choice(_EVENTS)),
        ("seq", seq),
        ("event_id", f"{rng.getrandbits(128):032x}"),
        ("user", {"id": rng.randint(1, 5_000_000), "name": f"{first} {last}",
                  "email": f"{first}.{last}{rng.randint(1, 99)}@example.com", "plan": rng.choice(_PLANS)}),
        ("session", {"id": f"{rng.getrandbits(64):016x}",
                     "device": {"os": rng.choice(_OS), "browser": rng.choice(_BROWSERS),
                                "app_version": f"{rng.randint(3, 5)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"},
                     "ip": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                     "geo": {"country": country, "city": city}}),
        ("page", {"path": path, "referrer": rng.choice(_REFERRERS)}),
    ]


def _item(rng: random.Random) -> dict:
    return {"sku": f"SKU-{rng.randint(10_000, 99_999)}", "qty": rng.randint(1, 5),
            "price_cents": rng.randint(199, 99_999), "category": rng.choice(_CATEGORIES)}


def json_value(rng: random.Random, seq: int, size: int) -> bytes:
    """One JSON-like event record of exactly ``size`` bytes (ASCII): the event's fields that fit, in order
    (a field that does not fit is left out, a later smaller one may still go in), then ``items`` while the
    next one fits, then a ``note`` of words cut to fill what is left, and spaces for the last few bytes."""
    if size < 2:
        raise ValueError("a JSON value takes at least 2 bytes")  # the bench asks for JSON_BYTES_MIN
    pieces: list[str] = []  # '"key":value', in order
    used = 2  # the braces

    def cost(piece: str) -> int:
        return len(piece) + (1 if pieces else 0)  # and its comma

    for key, value in _event_fields(rng, seq):
        piece = f'"{key}":{_dumps(value)}'
        if used + cost(piece) <= size:
            pieces.append(piece)
            used += cost(piece)
    items: list[str] = []
    items_bytes = 0  # of the items and the commas between them
    comma = 1 if pieces else 0  # before '"items":[...]'
    while True:
        item = _dumps(_item(rng))
        grown = items_bytes + len(item) + (1 if items else 0)
        if used + comma + len('"items":[]') + grown > size:
            break
        items.append(item)
        items_bytes = grown
    if items:
        pieces.append(f'"items":[{",".join(items)}]')
        used += comma + len('"items":[]') + items_bytes
    left = size - used
    note_overhead = len('"note":""') + (1 if pieces else 0)
    if left > note_overhead:
        words = []
        length = -1
        while length < left - note_overhead:
            word = rng.choice(_WORDS)
            words.append(word)
            length += len(word) + 1
        pieces.append(f'"note":"{" ".join(words)[:left - note_overhead]}"')
    text = "{" + ",".join(pieces) + "}"
    text += " " * (size - len(text))
    out = text.encode("ascii")
    assert len(out) == size, (len(out), size)
    return out
