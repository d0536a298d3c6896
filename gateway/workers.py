"""Several gateway processes on one port: the worker's app factory and the supervisor.

Lives outside `__main__` so that worker processes (started with `spawn`) can import what the
supervisor hands them.
"""

from __future__ import annotations

import logging
import socket

import uvicorn
from litestar import Litestar
from uvicorn.supervisors import Multiprocess

from gateway.app import create_app
from gateway.settings import GatewaySettings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def worker_app(settings: GatewaySettings, log_level: str) -> Litestar:
    """The app of one worker process (uvicorn calls it in the worker: `factory=True`)."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    return create_app(settings)


class GatewayWorkers(Multiprocess):
    """uvicorn's supervisor, which also says when every worker serves."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], on_ready) -> None:
        super().__init__(config, sockets)
        self.on_ready = on_ready

    def init_processes(self) -> None:
        super().init_processes()
        for process in self.processes:
            if not process.wait_until_ready(self.config.timeout_worker_healthcheck * 12, self.should_exit):
                return  # the supervisor's loop reports and replaces (or stops on) a failed start
        self.on_ready()
