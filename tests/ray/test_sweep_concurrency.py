"""Sweep concurrency on a real Ray cluster: the maximum size an autoscaler publishes in
the GCS is what a sweep sizes itself from, not the nodes up at start."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_configured_maximum_is_read_from_the_cluster_config(ray_cluster):
    import ray._raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from llamaray.sweep.driver import configured_maximum

    namespace = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
    assert configured_maximum() is None  # the session cluster has no autoscaler
    # What an autoscaler publishes: a CPU group of up to 5 nodes of 8 CPUs, a GPU group of 2.
    config = autoscaler_pb2.ClusterConfig()
    cpu = config.node_group_configs.add(name="cpu", max_count=5)
    cpu.resources["CPU"] = 8
    gpu = config.node_group_configs.add(name="gpu", max_count=2)
    gpu.resources["CPU"] = 16
    gpu.resources["GPU"] = 4
    internal_kv._internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    try:
        assert configured_maximum() == {"CPU": 72.0, "GPU": 8.0}
    finally:
        internal_kv._internal_kv_del(key, namespace=namespace)
    assert configured_maximum() is None
