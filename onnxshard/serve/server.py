"""``onnxshard serve``: start Ray Serve (HTTP and gRPC proxies on the given host and ports), deploy the
application, and serve until interrupted."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

from onnxshard.errors import ClusterError, PlanError
from onnxshard.serve.app import GRPC_SERVICER, ServeArgs, build_app, cpus_needed
from onnxshard.serve.repository import discover

APP_NAME = "onnxshard"


def parse_args(values: dict) -> ServeArgs:
    """``ServeArgs`` from the command line, a pydantic refusal as one line naming the option."""
    from pydantic import ValidationError

    try:
        return ServeArgs.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "arguments"
        raise PlanError(f"{where.replace('_', '-')}: {first['msg']}") from None


def start(args: ServeArgs, *, host: str, port: int, grpc_port: int | None, address: str | None,
          deploy_timeout_s: float) -> tuple[bool, list[str]]:
    """Deploy the app on Serve (starting local Ray with enough logical CPUs when no cluster is given); returns
    whether it started Ray, and the names of the models served. An app not running within ``deploy_timeout_s``
    (a cluster whose CPUs are taken: Serve waits for them forever) is deleted, and a :class:`ClusterError` says
    which deployments wait and why."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from onnxshard.distributed import cluster

    sources = discover(args.source, stages=args.stages)  # every refusal before Ray starts
    application = build_app(args, sources)
    owns = cluster.connect(address, 30.0, num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed(sources, args))))
    grpc = gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]) if grpc_port else None
    try:
        serve.start(http_options={"host": host, "port": port}, grpc_options=grpc)
        deploy(application, deploy_timeout_s)
    except BaseException:
        if owns:
            serve.shutdown()
            ray.shutdown()
        raise
    return owns, [s.name for s in sources]


def deploy(application, timeout_s: float, *, name: str = APP_NAME, route_prefix: str = "/") -> None:
    """``serve.run`` (which waits until the app runs, with no end) bounded by ``timeout_s``, after freeing the
    placement groups of pipelines whose process is gone (their CPUs would keep the replicas waiting)."""
    from ray import serve

    from onnxshard.distributed import groups

    groups.free_abandoned()

    done, failed = threading.Event(), []

    def run():
        try:
            serve.run(application, name=name, route_prefix=route_prefix)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            failed.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="onnxshard-deploy", daemon=True).start()
    if not done.wait(timeout_s):
        waiting = _waiting_deployments(name)
        serve.delete(name)  # its replicas and their pipelines go; the waiting serve.run ends with it
        raise ClusterError(f"the Serve application was not running after deploy_timeout_s={timeout_s:g} "
                           f"(--deploy-timeout); waiting: {waiting or 'its deployments'}")
    if failed:
        raise failed[0]


def _waiting_deployments(name: str) -> str:
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return ""
    return "; ".join(f"{deployment} ({status}: {d.message or 'no message'})"
                     for deployment, d in app.deployments.items()
                     if (status := getattr(d.status, "value", d.status)) != "HEALTHY")


def _stop(*_):
    raise KeyboardInterrupt


def serve_forever(args: ServeArgs, *, host: str, port: int, grpc_port: int | None, address: str | None,
                  deploy_timeout_s: float) -> None:
    import ray
    from ray import serve

    owns, names = start(args, host=host, port=port, grpc_port=grpc_port, address=address,
                        deploy_timeout_s=deploy_timeout_s)
    print(f"serving {', '.join(names)} (KServe v2) on http://{host}:{port}/v2"
          + (f" and gRPC {host}:{grpc_port}" if grpc_port else "")
          + f" (decoders: the OpenAI API on http://{host}:{port}/v1); Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, _stop)  # `kill`, `docker stop`, Kubernetes: shut down cleanly as on Ctrl-C
    try:
        while True:
            time.sleep(1)
    finally:  # a second Ctrl-C must not cut the clean-up short (it would leave the workers running)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if owns:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)  # the cluster stays; this app goes, its pipelines with it
