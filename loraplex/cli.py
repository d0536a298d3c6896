"""The `loraplex` console script.

    loraplex up                 start MLflow, two shards and the gateway on loopback
    loraplex adapters …         publish, list and promote adapters in the MLflow registry
    loraplex demo build         build (or find cached) the demo base model and adapters
    loraplex bench-serve …      serving benchmark against any deployment (latency, throughput, errors)
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
from pathlib import Path


def curl_line(gateway_url: str, api_key: str, model: str, prompt: str) -> str:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 40, "temperature": 0})
    return (
        f"curl -s {gateway_url}/v1/completions -H {shlex.quote('Authorization: Bearer ' + api_key)} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def run_up(args: argparse.Namespace) -> int:
    from loraplex.stack.local_stack import LocalStack, LocalStackConfig
    from loraplex.stack.processes import ProcessFailedToStart

    stack = LocalStack(
        LocalStackConfig(
            state_dir=Path(args.state_dir),
            num_shards=args.shards,
            gateway_port=args.port,
            gateway_admin_port=args.admin_port,
            mlflow_port=args.mlflow_port,
            quantization=args.quantization,
            always_free_ports=args.free_ports,
            gateway_workers=args.gateway_workers,
        )
    )
    stopping = threading.Event()

    def request_stop(signum, frame):  # SIGTERM behaves like Ctrl-C
        stopping.set()
        raise KeyboardInterrupt

    # SIGINT too: a shell that starts a command in the background hands it SIGINT ignored, and
    # Python then keeps ignoring it, so Ctrl-C (or `kill -INT`) would leave the stack running.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    try:
        running = stack.start()
    except ProcessFailedToStart as error:
        print(f"loraplex: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped before the stack was up; every process it started is stopped.")
        return 130
    acme_key = running.keys.tenant_keys["acme"]
    workers = args.gateway_workers or "one per core"
    valkey_line = f"  valkey    {running.redis_url}   (tenant limits shared by {workers} gateway workers)\n" if running.redis_url else ""
    print(
        f"\nloraplex is up in {stack.timings_s['total']:.1f}s\n"
        f"  gateway   {running.gateway_url}   (OpenAPI: {running.gateway_url}/schema)\n"
        f"  admin     {running.gateway_admin_url}   (metrics: {running.gateway_admin_url}/metrics, admin API: /admin/…)\n"
        f"  MLflow    {running.mlflow_url}   (move the 'champion' alias to promote a version)\n"
        f"  shards    {', '.join(f'{k}={v}' for k, v in running.shard_addresses.items())}\n"
        f"  metrics   {', '.join(f'{k}={v}' for k, v in running.shard_metrics_urls.items())}\n"
        f"{valkey_line}"
        f"  API key   {acme_key}   (tenant acme: legal, clinical, sql, base)\n"
        f"  admin key {running.keys.admin_key}\n"
        f"  logs      {running.state_dir / 'logs'}\n\n"
        f"Try it:\n{curl_line(running.gateway_url, acme_key, 'legal', running.demo_prompt)}\n\n"
        "Ctrl-C stops everything.",
        flush=True,
    )
    try:
        while not stopping.is_set():
            stopping.wait(1.0)
            watched = [*stack.shards.values(), stack.gateway, stack.redis.process if stack.redis else None]
            dead = [p.name for p in watched if p and not p.is_running()]
            if dead:
                print(f"loraplex: {', '.join(dead)} exited; see {running.state_dir / 'logs'}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping…", flush=True)
        stack.stop()
        print("stopped.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the local stack on loopback")
    up.add_argument("--state-dir", default=".state", help="where MLflow data, keys and logs live")
    up.add_argument("--shards", type=int, default=2)
    up.add_argument("--port", type=int, default=8000, help="gateway port (a free one if taken)")
    up.add_argument("--admin-port", type=int, default=8001, help="gateway admin port: metrics, admin API (a free one if taken)")
    up.add_argument("--mlflow-port", type=int, default=5000)
    up.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "bf16", "fp32"])
    up.add_argument("--free-ports", action="store_true", help="pick free ports for everything")
    up.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        help="gateway processes on its port (0 = one per core); more than one starts a Valkey server for their shared tenant limits",
    )
    up.set_defaults(handler=run_up)

    from registry.cli import add_adapter_commands

    add_adapter_commands(commands)

    from loraplex.demo.cli import add_demo_commands

    add_demo_commands(commands)

    from loraplex.serving_bench.cli import add_bench_serve_command

    add_bench_serve_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
