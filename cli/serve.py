"""serve, device serve: the HTTP service, and the device side of RPC."""

from __future__ import annotations

import sys
from pathlib import Path

from elastilm.cli.common import device_args, engine, serving_process


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP service with latency objectives (loopback by default)")
    p.add_argument(
        "--build", type=Path, default=Path("dist/smollm2-135m/host-cpu"), help="a build with tlm/ and latency.json"
    )
    p.add_argument("--bundle", type=Path, default=None, help="an `elastilm package` folder (instead of --build)")
    p.add_argument("--model", default=None, help="model id inside a bundle with several")
    device_args(p)
    p.add_argument(
        "--latency",
        type=Path,
        default=None,
        help="the latency profile to plan with (default: the build's "
        "latency.json; over RPC give one measured over that link, `elastilm profile --rpc ... --out`)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument(
        "--app-keys",
        type=Path,
        default=None,
        help="a JSON file {app: key}: each app its own key, and a request counts as its key's app in the queue "
        "(instead of --api-key)",
    )
    p.add_argument("--queue", type=int, default=16, help="requests that may wait; more get 429")
    p.add_argument("--app-share", type=float, default=0.5, help="the share of the queue one app may hold")
    p.add_argument("--max-tokens", type=int, default=256, help="cap on max_tokens per request")
    p.add_argument("--lenient", action="store_true", help="ignore unknown request fields instead of answering 400")
    p.set_defaults(run=serve)

    p = sub.add_parser("device", help="the device side of RPC")
    device = p.add_subparsers(dest="action", required=True)
    p = device.add_parser("serve", help="run a TVM RPC server with elastilm's upload cache (until Ctrl-C)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--tracker", default=None, help="host:port of a tracker to register with")
    p.add_argument("--key", default=None, help="device key for the tracker")
    p.add_argument("--cache", type=Path, default=None, help="upload cache folder (default ~/.cache/elastilm-device)")
    p.set_defaults(run=device_serve)


def serve(args) -> None:
    serving_process()
    from elastilm.runtime_py.device import LOOPBACK
    from elastilm.runtime_py.orchestrator import Orchestrator
    from elastilm.runtime_py.serve import serve
    from elastilm.runtime_py.serve.worker import read_app_keys

    if args.host not in LOOPBACK and not (args.api_key or args.app_keys):
        print(f"elastilm: warning: serving on {args.host} without --api-key", file=sys.stderr)
    app_keys = read_app_keys(args.app_keys) if args.app_keys else None
    eng = engine(args)
    orch = Orchestrator(eng.folder, eng, latency=args.latency)
    print(
        f"serving {eng.manifest['model']} ({eng.folder}) on {eng.session.endpoint}; latency profile: "
        f"{orch.latency.device or 'unknown device'}",
        file=sys.stderr,
    )
    serve(
        orch,
        args.host,
        args.port,
        queue=args.queue,
        max_tokens=args.max_tokens,
        api_key=args.api_key,
        app_keys=app_keys,
        app_share=args.app_share,
        strict=not args.lenient,
    )


def device_serve(args) -> None:
    serving_process()
    from elastilm.runtime_py.device import serve

    serve(args.host, args.port, args.tracker, args.key or "", args.cache)
