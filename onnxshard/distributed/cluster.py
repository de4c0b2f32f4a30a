"""Reaching a Ray cluster and reserving room in it, each within a bounded time and with an error that says why.

- :func:`connect` probes a given address before ``ray.init`` (which retries an address where nothing listens for
  minutes), and lets a Ctrl-C during start-up finish starting Ray and then shut it down cleanly, so no Ray process
  outlives the interrupted command.
- :func:`infeasible` is the pure rule for a placement the cluster can never grant: some bundle fits no node, or
  the bundles together need more than the nodes hold. Placement groups never fail on their own (they wait), so a
  cluster that does not autoscale is told at once instead of after the placement timeout.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping, Sequence

import ray
from ray.util import placement_group_table

from onnxshard.errors import ClusterError

log = logging.getLogger(__name__)

# For a Ray this pipeline starts itself: activations up to 4 MiB travel inline with the call's reply instead of
# through the shared-memory object store, 8-11% more throughput on the benchmarks (benchmarks/RESULTS.md).
LOCAL_RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": 4 << 20}
# ...and its workers' environment (they inherit it): Ray Data's Parquet reader starts 32 footer-reading actors for
# every read by default, a process each, which on one machine costs more than the read (a 12-row file took 21 s
# on 2 cores, 4 s with 1). The caller's own setting wins.
LOCAL_RAY_WORKER_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}


def use_local_worker_env() -> None:
    """Put ``LOCAL_RAY_WORKER_ENV`` in this process's environment, where it sets nothing yet, for a Ray it starts."""
    for key, value in LOCAL_RAY_WORKER_ENV.items():
        os.environ.setdefault(key, value)


def connect(address: str | None, timeout_s: float, *, num_cpus: int | None = None) -> bool:
    """Connect to Ray unless connected already: ``address``, else ``$RAY_ADDRESS``, else a new local Ray (with
    ``num_cpus`` logical CPUs, if given). Returns whether this call started (and so owns) the connection. A
    host:port where nothing answers within ``timeout_s`` is a :class:`ClusterError` naming it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        probe(address, timeout_s)
    if not address:
        use_local_worker_env()
    with _deferred_interrupt() as interrupted:
        try:
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=True,
                     configure_logging=True, _system_config=None if address else LOCAL_RAY_SYSTEM_CONFIG)
        except ConnectionError as e:
            raise ClusterError(f"cannot connect to Ray at {address or 'a new local instance'}: {e}") from None
    if interrupted():
        ray.shutdown(wait_for_processes=True)
        raise KeyboardInterrupt
    return True


def probe(address: str, timeout_s: float) -> None:
    """Raise :class:`ClusterError` unless something accepts a TCP connection at ``address`` (``host:port`` or
    ``ray://host:port``) within ``timeout_s``; ``auto``/``local`` are Ray's to resolve."""
    hostport = address.removeprefix("ray://")
    if address in ("auto", "local") or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        raise ClusterError(f"Ray address {address!r} must look like HOST:PORT (e.g. 127.0.0.1:6379), auto or "
                           "ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise ClusterError(f"no Ray cluster answers at {address} ({why} within {timeout_s:g} s); start one with "
                           "`ray start --head` or fix --address / RAY_ADDRESS") from None


class _deferred_interrupt:
    """Within the block, SIGINT is remembered instead of raised (main thread only; elsewhere a no-op)."""

    def __enter__(self):
        self._hit = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._remember)
        return lambda: self._hit

    def _remember(self, *_):
        self._hit = True
        log.warning("interrupted: stopping once Ray has started, so none of its processes is left behind")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def infeasible(bundles: Sequence[Mapping[str, float]], nodes: Sequence[Mapping[str, float]], strategy: str) -> str | None:
    """Why ``bundles`` can never be placed on ``nodes`` (each node's total resources) with ``strategy``, or
    ``None`` if they might (given free resources). Pure: no Ray."""
    if not bundles:
        return None
    for key in sorted({k for b in bundles for k in b}):
        need = sum(b.get(key, 0) for b in bundles)
        have = sum(n.get(key, 0) for n in nodes)
        if need > have + 1e-9:
            return f"{key}: need {need:g}, cluster has {have:g}"
    for bundle in bundles:
        if not any(all(n.get(k, 0) + 1e-9 >= v for k, v in bundle.items()) for n in nodes):
            return f"one worker needs {dict(bundle)}, which no single node has"
    if strategy == "STRICT_PACK":
        total = {k: sum(b.get(k, 0) for b in bundles) for k in {k for b in bundles for k in b}}
        if not any(all(n.get(k, 0) + 1e-9 >= v for k, v in total.items()) for n in nodes):
            return f"STRICT_PACK puts every worker on one node, and no node has {total}"
    if strategy == "STRICT_SPREAD" and len(bundles) > len(nodes):
        return f"STRICT_SPREAD puts each worker on its own node: {len(bundles)} workers, {len(nodes)} nodes"
    return None


def node_state(node_id: str, timeout_s: float = 2.0) -> str:
    """``dead`` (Ray says so), ``unreachable`` (Ray still counts it alive, but its raylet accepts no connection
    within ``timeout_s``: a crashed node, which Ray's health check gives up only many seconds later, and only then
    moves its placement-group bundles) or ``alive``."""
    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
    if node is None or not node.get("Alive"):
        return "dead"
    try:
        socket.create_connection((node["NodeManagerAddress"], int(node["NodeManagerPort"])), timeout=timeout_s).close()
    except OSError:
        return "unreachable"
    return "alive"


def node_totals() -> list[dict[str, float]]:
    """Each live node's total resources."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def bundle_nodes(group) -> list[str]:
    """The node each bundle of a ready placement group is on, by bundle index."""
    where = placement_group_table(group)["bundles_to_node_id"]
    return [where[i] for i in range(len(where))]


def autoscales(report_wait_s: float = 10.0) -> bool:
    """Whether this cluster may add nodes, so a shortfall is not final. A fixed-size cluster (``ray start`` or
    ``ray.init`` without an autoscaling config) runs the autoscaler's monitor with Ray's read-only node provider,
    whose node types are the nodes themselves (``node_<id>``); anything else may scale. A cluster just started
    has no report, or one of its monitor's first pass without the autoscaler's part: a report with that part is
    waited for up to ``report_wait_s``; a Ray whose report never comes may scale."""
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        end = time.monotonic() + report_wait_s
        while "autoscaler_report" not in (report := json.loads(_internal_kv_get(DEBUG_AUTOSCALING_STATUS) or b"{}")) \
                and time.monotonic() < end:
            time.sleep(0.2)
        return not read_only_cluster(report)
    except Exception:  # noqa: BLE001 - a Ray whose report we cannot read: assume it may scale, and wait
        return True


def read_only_cluster(status: dict | None) -> bool:
    """Whether an autoscaler status report (GCS key ``__autoscaling_status``) is that of a fixed-size cluster."""
    mapping = ((status or {}).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return bool(mapping) and all(kind == f"node_{node}" for node, kind in mapping.items())
