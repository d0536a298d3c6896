"""Shared pytest fixture: one real Redis-compatible server (Valkey) per test session, on loopback.

The root conftest registers it with `pytest_plugins`. Tests that use it must leave
no keys behind that another test could read: each names its tenants (and so its keys) uniquely.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loraplex.stack.redis_server import RedisServer, RedisServerNotFound, redis_server_binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        redis_server_binary()
    except RedisServerNotFound as exc:
        pytest.skip(f"no Redis-compatible server to test against: {exc}")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()
