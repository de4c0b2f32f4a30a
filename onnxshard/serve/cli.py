"""The ``onnxshard serve`` command line (argparse only: Ray and Serve load when it runs)."""

from __future__ import annotations


def add_parser(sub, *, positive_int, positive_float, non_negative_float) -> None:
    p = sub.add_parser("serve", help="serve a plan, a model or a repository of them (KServe v2 over HTTP and "
                       "gRPC; decoders: the OpenAI API) on Ray Serve")
    p.add_argument("target", help="a plan folder, an .onnx file, or a repository folder (one model per subfolder, "
                   "served under its name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=positive_int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=9000, help="gRPC port (default 9000; 0: no gRPC)")
    p.add_argument("--replicas", type=positive_int, default=1, help="Serve replicas per model, each a whole pipeline")
    p.add_argument("--max-batch-size", type=positive_int, default=32,
                   help="dynamic batching: join concurrent requests up to this many samples (default 32; 1: never)")
    p.add_argument("--max-queue-delay-ms", type=non_negative_float, default=0.0,
                   help="how long an idle model waits for more requests to join (default 0)")
    p.add_argument("--max-queue-size", type=positive_int, default=256,
                   help="requests waiting per replica; past it a request gets 503 at once (default 256)")
    p.add_argument("--api-key-env", metavar="VAR", help="require 'Authorization: Bearer <key>' (gRPC: the same "
                   "metadata) on every route but the health checks, the key read from $VAR")
    p.add_argument("--max-body-size", default="64MiB", metavar="SIZE", help="largest request (default 64MiB)")
    p.add_argument("--stages", type=positive_int, help="stages a bare ONNX model is split into (default 2)")
    p.add_argument("--cpus-per-stage", type=positive_float, default=1.0, help="CPUs per stage worker")
    p.add_argument("--gpus-per-stage", type=non_negative_float, default=0.0, help="GPUs per stage worker")
    p.add_argument("--transport", choices=["auto", "direct", "ray"], default="auto",
                   help="how micro-batches travel between stages (default auto)")
    p.add_argument("--call-timeout", type=positive_float, metavar="S",
                   help="a stage call longer than S seconds counts as a hung worker (default: from measured times)")
    p.add_argument("--run-timeout", type=positive_float, metavar="S", help="a request not done after S seconds "
                   "fails with 504")
    p.add_argument("--kv-cache-memory", metavar="SIZE", help="decoders: KV cache each stage worker may hold, e.g. "
                   "2GB (sequences that would not fit wait)")
    p.add_argument("--max-model-len", type=positive_int, metavar="N", help="decoders: the longest sequence, prompt "
                   "and generated together (a longer prompt gets 400)")
    p.add_argument("--deploy-timeout", type=positive_float, default=600.0, metavar="S", help="give up when the "
                   "app is not running after S seconds (a cluster without room for its workers), naming what waits "
                   "(default 600)")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from onnxshard.errors import InputError
    from onnxshard.serve.server import parse_args, serve_forever

    if args.grpc_port and not 0 < args.grpc_port < 65536 or args.port >= 65536:
        raise InputError("--port and --grpc-port must be port numbers (1-65535; --grpc-port 0 turns gRPC off)")
    from pathlib import Path

    from onnxshard.plans import is_plan_dir

    target = Path(args.target)
    kind = "plan_dir" if is_plan_dir(target) else "model" if target.is_file() else "repository"
    serve_args = parse_args(dict(
        **{kind: args.target}, stages=args.stages, replicas=args.replicas, max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms, max_queue_size=args.max_queue_size,
        cpus_per_stage=args.cpus_per_stage, gpus_per_stage=args.gpus_per_stage, transport=args.transport,
        call_timeout_s=args.call_timeout, run_timeout_s=args.run_timeout, api_key_env=args.api_key_env,
        max_body_size=args.max_body_size, kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len))
    serve_forever(serve_args, host=args.host, port=args.port, grpc_port=args.grpc_port or None,
                  address=args.address, deploy_timeout_s=args.deploy_timeout)
    return 0
