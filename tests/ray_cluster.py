"""A simulated two-node Ray cluster on loopback for the slow Ray tests (docs/research/ray.md)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import pytest

# Before anything imports ray (importing this module is enough): a loopback-only cluster needs it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextlib.contextmanager
def two_node_cluster() -> Iterator[object]:
    """Start a head and a worker node (1 CPU each) on 127.0.0.1, connect to it, and tear it all down after."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'galr[ray]')")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()
