"""Several gateway processes on one port: the worker's app factory and the supervisor.

Lives outside `__main__` so that worker processes (started with `spawn`) can import what the
supervisor hands them.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile

import uvicorn
from prometheus_client import multiprocess
from uvicorn.supervisors import Multiprocess

from gateway.app import ByPort, create_apps
from gateway.metrics import MULTIPROCESS_DIR_ENV
from gateway.settings import GatewaySettings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def worker_app(settings: GatewaySettings, log_level: str) -> ByPort:
    """The apps of one worker process, on both ports (uvicorn calls it in the worker: `factory=True`)."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    return create_apps(settings).served()


class GatewayWorkers(Multiprocess):
    """uvicorn's supervisor, which also says when every worker serves, and gives the workers one
    folder for their Prometheus values so that a scrape of any worker reports them all."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], on_ready) -> None:
        super().__init__(config, sockets)
        self.on_ready = on_ready
        self.metrics_dir = tempfile.mkdtemp(prefix="loraplex-gateway-metrics-")

    def run(self) -> None:
        # Inherited by the workers, which read it when they first import prometheus_client.
        os.environ[MULTIPROCESS_DIR_ENV] = self.metrics_dir
        try:
            super().run()
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def init_processes(self) -> None:
        super().init_processes()
        for process in self.processes:
            if not process.wait_until_ready(self.config.timeout_worker_healthcheck * 12, self.should_exit):
                return  # the supervisor's loop reports and replaces (or stops on) a failed start
        self.on_ready()

    def keep_subprocess_alive(self) -> None:
        before = {process.pid for process in self.processes}
        super().keep_subprocess_alive()
        for pid in before - {process.pid for process in self.processes}:
            # A replaced worker's live gauges (in-flight requests, shard health) stop counting;
            # its counters stay in the totals.
            multiprocess.mark_process_dead(pid, self.metrics_dir)
