"""How the fault harness wires a LocalCluster through fault proxies, so that any one node's links can be cut.

Without proxies, a node's three kinds of link are its ROUTER (clients, and the followers fetching from it),
its DEALER to the coordinator, and its DEALERs to the leaders it follows. Here:

- a **front proxy** per node (proxy.FaultProxy) sits before its ROUTER, and the node advertises the
  proxy's address, so clients and followers alike reach it through the proxy. The proxy tells which node
  a connection comes from by the first message on it (``peer_of``: a replica fetch names its replica);
  anything else is a client;
- a **coordinator proxy** per node (with ``coordinator_links=True``) is the node's ``--coordinator``
  address, relaying to the coordinator; clients reach the coordinator directly.

So every link of node N can be cut on its own: N's coordinator proxy (heartbeats, pushed placement, ISR
changes), N's front proxy for the peers that are nodes (its followers' fetches from it), and every other
node's front proxy for peer N (N's own fetches as a follower). ``isolate(N)`` cuts all three: N is cut off
from the coordinator and from every other node, while its clients still reach it (it keeps believing it
leads, and they keep sending to it until the coordinator names another leader). ``cut_node_links(N)`` and
``cut_coordinator_link(N)`` cut one kind alone; ``rejoin(N)`` heals N's links.

Why proxies and not network namespaces here: the same run then needs no root and no iproute2, runs next to
every other fault of the harness (kills, disk wipes, pauses, proxy loss rates), and can cut the node off
from its peers while its clients still reach it, which a namespace's single link cannot. The real kernel
partition is tests/test_netns.py's, which runs the same property with namespaces (as root).

This module owns the wiring only; the nemesis decides when to cut what (nemesis.py).
"""

from __future__ import annotations


from bus import wire
from nodes.cluster import LocalCluster, free_ports

from .proxy import FaultProxy


def peer_of(frames):
    """The node a connection to a node's ROUTER comes from (its first message is a replica fetch naming its
    replica id), or None for a client."""
    try:
        op, _request_id, args, _bulk = wire.decode_request(frames)
    except Exception:  # not a request: a client's garbage, the node answers it
        return None
    if op == wire.REPLICA_FETCH and isinstance(args, dict):
        return args.get("replica_id")
    return None


class Topology:
    def __init__(self, node_ids, *, seed: int = 0, coordinator_links: bool = False):
        self.node_ids = sorted(node_ids)
        ports = iter(free_ports(len(self.node_ids) * (2 if coordinator_links else 1)))
        self.front = {n: FaultProxy(f"tcp://127.0.0.1:{next(ports)}", "", seed=seed, name=f"node-{n}",
                                    classify=peer_of) for n in self.node_ids}
        self.coordinator = {n: FaultProxy(f"tcp://127.0.0.1:{next(ports)}", "", seed=seed,
                                          name=f"node-{n}-coordinator") for n in self.node_ids} \
            if coordinator_links else {}

    def proxies(self) -> dict:
        """name -> FaultProxy, every proxy of the topology."""
        out = {f"node-{n}": p for n, p in self.front.items()}
        out.update({f"node-{n}-coordinator": p for n, p in self.coordinator.items()})
        return out

    def cluster(self, data_dir: str, nodes: int, **options) -> ProxiedCluster:
        """The cluster wired through these proxies (not started); the proxies learn their upstreams."""
        cluster = LocalCluster(data_dir, nodes, advertise={n: p.listen for n, p in self.front.items()},
                                 coordinator_for={n: p.listen for n, p in self.coordinator.items()}, **options)
        for n, proxy in self.front.items():
            proxy.upstream = cluster.node_address(n)
        for proxy in self.coordinator.values():
            proxy.upstream = cluster.bootstrap
        return cluster

    def start(self) -> None:
        for proxy in self.proxies().values():
            proxy.start()

    def stop(self) -> None:
        for proxy in self.proxies().values():
            if proxy.is_alive():
                proxy.stop()

    def heal(self) -> None:
        """Every proxy transparent again: no cut, no blocked peer, no loss rates."""
        for proxy in self.proxies().values():
            proxy.heal()

    # -- cutting one node's links --------------------------------------------------------------------

    def cut_node_links(self, node_id: int) -> None:
        """Node ``node_id`` and every other node stop hearing each other (both ways); clients still reach it."""
        others = [n for n in self.node_ids if n != node_id]
        self.front[node_id].block(others)
        for n in others:
            self.front[n].block(self.front[n].blocked | {node_id})

    def cut_coordinator_link(self, node_id: int) -> None:
        if node_id not in self.coordinator:
            raise ValueError("cutting a node from the coordinator needs Topology(coordinator_links=True)")
        self.coordinator[node_id].cut()

    def isolate(self, node_id: int) -> None:
        """Cut ``node_id`` off from the coordinator and from every other node; its clients still reach it."""
        self.cut_coordinator_link(node_id)
        self.cut_node_links(node_id)

    def rejoin(self, node_id: int) -> None:
        """Heal every link of ``node_id`` cut by the calls above."""
        for n in self.node_ids:
            if n != node_id:
                self.front[n].block(self.front[n].blocked - {node_id})
        self.front[node_id].unblock()
        if node_id in self.coordinator:
            self.coordinator[node_id].cut_off = False
