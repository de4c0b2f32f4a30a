"""The pure cluster rules, without Ray: when a placement can never be granted, and when a cluster autoscales."""

from onnxshard.distributed.cluster import infeasible, probe, read_only_cluster


def test_a_shortfall_in_all_is_named_with_the_numbers():
    nodes = [{"CPU": 2.0, "memory": 1e9}]
    assert infeasible([{"CPU": 1.0}] * 2, nodes, "PACK") is None
    assert infeasible([{"CPU": 1.0}] * 3, nodes, "PACK") == "CPU: need 3, cluster has 2"
    assert infeasible([{"CPU": 0.5, "GPU": 1.0}] * 2, nodes, "PACK") == "GPU: need 2, cluster has 0"
    # more nodes make room: the answer moves with the cluster
    assert infeasible([{"CPU": 1.0}] * 3, nodes * 2, "PACK") is None


def test_a_bundle_that_fits_no_single_node():
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert infeasible([{"CPU": 2.0}] * 2, nodes, "PACK") is None
    assert "no single node" in infeasible([{"CPU": 3.0}], nodes, "PACK")
    assert "STRICT_PACK" in infeasible([{"CPU": 1.5}] * 2, nodes, "STRICT_PACK")
    assert infeasible([{"CPU": 1.0}] * 2, nodes, "STRICT_PACK") is None
    assert "STRICT_SPREAD" in infeasible([{"CPU": 0.5}] * 3, nodes, "STRICT_SPREAD")
    assert infeasible([{"CPU": 0.5}] * 2, nodes, "STRICT_SPREAD") is None


def test_custom_resources_count_like_cpus():
    nodes = [{"CPU": 8.0, "shard_slot": 1.0}, {"CPU": 8.0}]
    assert infeasible([{"CPU": 1.0, "shard_slot": 1.0}], nodes, "PACK") is None
    assert infeasible([{"CPU": 1.0, "shard_slot": 1.0}] * 2, nodes, "PACK") == "shard_slot: need 2, cluster has 1"


def test_a_fixed_size_cluster_is_told_from_one_that_scales():
    fixed = {"autoscaler_report": {"node_type_mapping": {"abc": "node_abc", "def": "node_def"}, "legacy": True}}
    scaling = {"autoscaler_report": {"node_type_mapping": {"abc": "head-group", "def": "gpu-workers"}}}
    assert read_only_cluster(fixed) is True
    assert read_only_cluster(scaling) is False
    assert read_only_cluster(None) is False  # no report: it may scale, so the pipeline waits as before
    assert read_only_cluster({"autoscaler_report": {}}) is False


def test_probe_refuses_a_closed_port_and_a_malformed_address():
    import socket

    import pytest

    from onnxshard.errors import ClusterError

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClusterError, match=f"127.0.0.1:{port}"):
        probe(f"127.0.0.1:{port}", 5)
    with pytest.raises(ClusterError, match="HOST:PORT"):
        probe("127.0.0.1:http", 5)
    with socket.socket() as server:  # something listening passes
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        probe(f"127.0.0.1:{server.getsockname()[1]}", 5)
        probe(f"ray://127.0.0.1:{server.getsockname()[1]}", 5)
    probe("auto", 5)  # Ray's to resolve
