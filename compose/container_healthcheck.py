#!/usr/bin/env python3
"""Container healthcheck for loraplex services under docker compose.

    loraplex-healthcheck grpc 127.0.0.1:50051 [--service loraplex.shard.v1.Shard]
    loraplex-healthcheck http http://127.0.0.1:8000/readyz

Exit 0 when healthy, 1 when the service answers but is not healthy, 2 when it cannot be reached.
Docker's healthchecks run a command inside the container, and python:3.11-slim has no curl nor
grpc_health_probe; the image already carries grpcio-health-checking, so the shard is asked over
the standard grpc.health.v1 protocol that Kubernetes' `grpc:` probes also use.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import urllib.error
import urllib.request

HEALTHY, UNHEALTHY, UNREACHABLE = 0, 1, 2


def _read(path: str | None) -> bytes | None:
    with open(path, "rb") if path else contextlib.nullcontext() as f:
        return f.read() if f else None


def check_grpc(address: str, service: str, timeout_s: float, tls: argparse.Namespace | None = None) -> tuple[int, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is not None and tls.tls_ca:
        # A TLS shard: its CA, and for mutual TLS a client certificate.
        credentials = grpc.ssl_channel_credentials(_read(tls.tls_ca), _read(tls.tls_key), _read(tls.tls_cert))
        options = (("grpc.ssl_target_name_override", tls.tls_server_name),) if tls.tls_server_name else ()
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as error:
            code = error.code()
            # NOT_FOUND: the server is up but does not know that service name.
            status = UNHEALTHY if code == grpc.StatusCode.NOT_FOUND else UNREACHABLE
            return status, f"{address}: {code.name} {error.details() or ''}".strip()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return (HEALTHY if reply.status == health_pb2.HealthCheckResponse.SERVING else UNHEALTHY), f"{address}: {name}"


def check_http(url: str, timeout_s: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return HEALTHY, f"{url}: {response.status}"
    except urllib.error.HTTPError as error:
        return UNHEALTHY, f"{url}: {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return UNREACHABLE, f"{url}: {error}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex-healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True)
    grpc_parser = kinds.add_parser("grpc", help="grpc.health.v1 Check")
    grpc_parser.add_argument("address", help="host:port")
    grpc_parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    grpc_parser.add_argument("--tls-ca", help="PEM CA: talk TLS, verifying the server against it")
    grpc_parser.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    grpc_parser.add_argument("--tls-key", help="PEM client key (mutual TLS)")
    grpc_parser.add_argument("--tls-server-name", help="the name the server's certificate carries")
    http_parser = kinds.add_parser("http", help="GET, healthy on 2xx")
    http_parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    if args.kind == "grpc":
        status, message = check_grpc(args.address, args.service, args.timeout, args)
    else:
        status, message = check_http(args.url, args.timeout)
    print(message, file=sys.stdout if status == HEALTHY else sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
