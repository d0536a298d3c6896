"""`python -m gateway --config FILE`: serve the gateway with uvicorn, in `workers` processes, the API
on `port` and metrics and the admin API on `admin_port` (each worker serves both).

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

from gateway.app import create_apps
from gateway.settings import GatewaySettings, SettingsError
from gateway.tenants import TenantDirectory, TenantsFileError
from gateway.workers import LOG_FORMAT, GatewayWorkers, worker_app


def announce_ready(settings: GatewaySettings, workers: int) -> None:
    # One write: print() writes the text and the newline separately, and a log line from another
    # thread can land between them, breaking readers that look for these lines.
    suffix = f" ({workers} workers)" if workers > 1 else ""
    sys.stdout.write(
        f"gateway admin on http://{settings.host}:{settings.admin_port}\n"
        f"gateway ready on http://{settings.host}:{settings.port}{suffix}\n"
    )
    sys.stdout.flush()


def bind(host: str, port: int, send_buffer_bytes: int = 0) -> socket.socket:
    """Bound before any worker starts, so that port 0 works and every worker serves the same port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer_bytes:
        # Accepted connections inherit it: the kernel's share of what a stalled client holds.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    # Accepted connections inherit it: without it a response whose headers and body go out in
    # two writes waits ~40 ms for the client's delayed ACK (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="loraplex HTTP gateway")
    parser.add_argument("--config", help="YAML or TOML settings file (env LORAPLEX_GATEWAY_* override it)")
    parser.add_argument("--port", type=int, help="override the port (0 = any free port)")
    parser.add_argument("--admin-port", type=int, help="override the admin port (0 = any free port)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        settings = GatewaySettings.load(args.config)
        overrides = {name: value for name, value in (("port", args.port), ("admin_port", args.admin_port)) if value is not None}
        if overrides:
            settings = GatewaySettings.from_mapping({**settings.__dict__, **overrides})
        sockets = [bind(settings.host, settings.port, settings.socket_send_buffer_bytes), bind(settings.host, settings.admin_port)]
        # The ports bound (port 0 = any free one) are the ports the apps tell apart.
        bound = {"port": sockets[0].getsockname()[1], "admin_port": sockets[1].getsockname()[1]}
        settings = GatewaySettings.from_mapping({**settings.__dict__, **bound})
        workers = settings.worker_count()
        if workers == 1:
            app = create_apps(settings).served()
        else:
            # Workers build their apps themselves; what would fail them all is caught here.
            if not settings.tenants_file:
                raise SettingsError("tenants_file is required")
            TenantDirectory.from_file(settings.tenants_file)
            app = functools.partial(worker_app, settings, args.log_level)
    except (SettingsError, TenantsFileError, OSError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        factory=workers > 1,
        workers=workers,
        log_level=args.log_level,
        access_log=False,
        # In-flight requests (streams included) get this long once the port closes (gateway/draining.py).
        timeout_graceful_shutdown=settings.drain_grace(),
    )
    if workers > 1:
        GatewayWorkers(config, sockets, on_ready=lambda: announce_ready(settings, workers)).run()
        return 0
    server = uvicorn.Server(config)
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        if server.started:
            announce_ready(settings, 1)

    server.startup = startup
    server.run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
