"""nodes/server.py's RouterServer on a real socket: the requests of a turn are dispatched in arrival order,
and those of the ops a turn defers are dispatched first by the next turn (the node reads what arrived during
a commit without taking its produces until the next one)."""

from __future__ import annotations

import zmq

from bus import wire
from nodes.server import RouterServer


def test_a_deferred_op_is_dispatched_first_by_the_next_turn_and_the_others_at_once():
    context = zmq.Context()
    # inproc: a message sent is in the server's queue when send returns, so one turn takes all four.
    server = RouterServer(context, "inproc://server-defer", role="node")
    client = context.socket(zmq.DEALER)
    try:
        client.connect(server.bind)
        handled: list = []
        handlers = {op: (lambda request, op=op: handled.append((op, request.args["n"])) or {"ok": True})
                    for op in ("produce", "fetch")}
        for n, op in enumerate(["produce", "fetch", "produce", "fetch"]):
            client.send_multipart(wire.encode_request(op, n, {"n": n}))
        assert server.socket.poll(10_000)
        assert server.serve_turn(handlers, defer=frozenset({"produce"})) == 4
        assert handled == [("fetch", 1), ("fetch", 3)]
        assert [r.args["n"] for r in server.deferred] == [0, 2]
        server.serve_turn(handlers)
        assert handled == [("fetch", 1), ("fetch", 3), ("produce", 0), ("produce", 2)]
        assert server.deferred == []
        replies = [wire.decode_reply(client.recv_multipart())[0] for _ in range(4)]
        assert sorted(replies) == [0, 1, 2, 3]  # every one answered
    finally:
        client.close(0)
        server.close()
        context.term()
