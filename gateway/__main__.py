"""`python -m gateway --config FILE`: serve the gateway with uvicorn."""

from __future__ import annotations

import argparse
import logging
import socket
import sys

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings, SettingsError
from gateway.tenants import TenantsFileError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="loraplex HTTP gateway")
    parser.add_argument("--config", help="YAML or TOML settings file (env LORAPLEX_GATEWAY_* override it)")
    parser.add_argument("--port", type=int, help="override the port (0 = any free port)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = GatewaySettings.load(args.config)
        if args.port is not None:
            settings = GatewaySettings.from_mapping({**settings.__dict__, "port": args.port})
        app = create_app(settings)
    except (SettingsError, TenantsFileError, OSError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    # Bind first so that port 0 works and the printed port is the real one.
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it a response whose headers and body go out in
    # two writes waits ~40 ms for the client's delayed ACK (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((settings.host, settings.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        if server.started:
            # One write: print() writes the text and the newline separately, and a log line from
            # another thread can land between them, breaking readers that look for this line.
            sys.stdout.write(f"gateway ready on http://{settings.host}:{port}\n")
            sys.stdout.flush()

    server.startup = startup
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
