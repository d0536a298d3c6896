"""A streaming completion over a raw socket, for tests of clients that stop reading or vanish:
an HTTP client library would read (and buffer) on its own."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse


def open_raw_stream(base_url: str, api_key: str, body: dict, receive_buffer: int = 4096) -> socket.socket:
    """POSTs `body` (a streaming /v1/completions request) and returns the socket once the answer's
    first bytes (at most 1 KiB) arrived with status 200. A small receive buffer makes a client that
    stops reading stall its stream quickly."""
    address = urlparse(base_url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((address.hostname, address.port))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {api_key}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    sock.settimeout(60)
    head = sock.recv(1024)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock
