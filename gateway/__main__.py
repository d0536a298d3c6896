"""`python -m gateway --config FILE`: serve the gateway with uvicorn, in `workers` processes on one port.

With one worker the app runs in this process. With several, this process binds the port and
supervises the workers (uvicorn's `Multiprocess`: a worker that dies is replaced); each worker
builds its own app - its own shard channels, routing-table watcher and shadow sampler - and shares
tenant limits and shadow aggregates with the others through `redis_url`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import socket
import sys

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings, SettingsError
from gateway.tenants import TenantDirectory, TenantsFileError
from gateway.workers import LOG_FORMAT, GatewayWorkers, worker_app


def announce_ready(settings: GatewaySettings, port: int, workers: int) -> None:
    # One write: print() writes the text and the newline separately, and a log line from another
    # thread can land between them, breaking readers that look for this line.
    suffix = f" ({workers} workers)" if workers > 1 else ""
    sys.stdout.write(f"gateway ready on http://{settings.host}:{port}{suffix}\n")
    sys.stdout.flush()


def bind(settings: GatewaySettings) -> socket.socket:
    """Bound before any worker starts, so that port 0 works and every worker serves the same port."""
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it a response whose headers and body go out in
    # two writes waits ~40 ms for the client's delayed ACK (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((settings.host, settings.port))
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="loraplex HTTP gateway")
    parser.add_argument("--config", help="YAML or TOML settings file (env LORAPLEX_GATEWAY_* override it)")
    parser.add_argument("--port", type=int, help="override the port (0 = any free port)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        settings = GatewaySettings.load(args.config)
        if args.port is not None:
            settings = GatewaySettings.from_mapping({**settings.__dict__, "port": args.port})
        workers = settings.worker_count()
        if workers == 1:
            app = create_app(settings)
        else:
            # Workers build their apps themselves; what would fail them all is caught here.
            if not settings.tenants_file:
                raise SettingsError("tenants_file is required")
            TenantDirectory.from_file(settings.tenants_file)
            app = functools.partial(worker_app, settings, args.log_level)
    except (SettingsError, TenantsFileError, OSError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    sock = bind(settings)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, factory=workers > 1, workers=workers, log_level=args.log_level, access_log=False, timeout_graceful_shutdown=5
    )
    if workers > 1:
        GatewayWorkers(config, [sock], on_ready=lambda: announce_ready(settings, port, workers)).run()
        return 0
    server = uvicorn.Server(config)
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        if server.started:
            announce_ready(settings, port, 1)

    server.startup = startup
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
