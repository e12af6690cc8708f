"""Shared fixtures: real clusters (coordinator and node processes on 127.0.0.1, LMDB under tmp_path).

``wait_for(cond, timeout_s)`` is the only way tests wait: a deadline, never a bare sleep.
"""

from __future__ import annotations

import time

import pytest

from nodes.cluster import LocalCluster


def wait_for(condition, timeout_s: float = 10.0, interval_s: float = 0.02, message: str = "condition"):
    """Poll ``condition()`` until it returns a truthy value (returned) or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout_s} s")
        time.sleep(interval_s)


@pytest.fixture
def make_cluster(tmp_path):
    """Start LocalClusters on demand; every one is stopped (and its children reaped) after the test."""
    clusters = []

    def make(nodes: int = 3, **kwargs) -> LocalCluster:
        cluster = LocalCluster(str(tmp_path / f"cluster-{len(clusters)}"), nodes, **kwargs)
        clusters.append(cluster)
        return cluster.start()

    yield make
    for cluster in clusters:
        cluster.stop()


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> LocalCluster:
    """A running 1-node cluster shared by a module's tests (each uses topics of its own)."""
    cluster = LocalCluster(str(tmp_path_factory.mktemp("one-node") / "cluster"), 1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(make_cluster) -> LocalCluster:
    """A running 3-node cluster."""
    return make_cluster(3)
