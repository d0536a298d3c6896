"""Shadow-comparison aggregates as MLflow metrics on the run behind the shadow version.

Whoever promotes in the MLflow UI then sees, on the candidate version's run, how often it agreed
with the champion and how its latency compared - the evidence beside the button.

The gateway calls `ShadowMetricsLogger.submit` from its event loop, so submitting never does I/O:
it keeps the newest aggregate per (adapter, version) (later ones supersede earlier ones) and a
background thread sends them. Each send is bounded: one REST call with a short timeout and no
retry loop, at most `max_pending` distinct versions waiting (further new ones are dropped and
counted). An unreachable MLflow costs lost metric points, never a stalled gateway.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from registry.errors import AdapterNotFound, RegistryError
from registry.mlflow_rest import MlflowRest, RestPolicy

logger = logging.getLogger(__name__)

# The gateway's aggregate keys -> metric names on the run.
METRIC_NAMES = {
    "shadow_pairs": "shadow_pairs",
    "shadow_exact_match_rate": "shadow_exact_match_rate",
    "shadow_token_agreement": "shadow_token_agreement",
    "shadow_primary_latency_ms": "shadow_primary_latency_ms",
    "shadow_latency_ms": "shadow_latency_ms",
}
LATENCY_RATIO = "shadow_latency_ratio"  # shadow mean latency / primary mean latency


def mlflow_metrics(aggregate: dict[str, float], timestamp_ms: int) -> list[dict]:
    """The aggregate as MLflow `log-batch` metrics; `step` is the number of pairs behind it - counted
    over every gateway process when they share a store, so each step is logged by one process only."""
    step = int(aggregate.get("shadow_pairs", 0))
    values = {METRIC_NAMES[k]: float(v) for k, v in aggregate.items() if k in METRIC_NAMES}
    primary = aggregate.get("shadow_primary_latency_ms") or 0.0
    if primary > 0 and "shadow_latency_ms" in aggregate:
        values[LATENCY_RATIO] = float(aggregate["shadow_latency_ms"]) / primary
    return [{"key": k, "value": v, "timestamp": timestamp_ms, "step": step} for k, v in sorted(values.items())]


@dataclass
class _Pending:
    adapter: str
    version: str
    aggregate: dict[str, float]


class ShadowMetricsLogger:
    def __init__(self, tracking_uri: str, *, timeout_s: float = 5.0, max_pending: int = 256, flush_interval_s: float = 0.5):
        self.rest = MlflowRest(tracking_uri, RestPolicy(timeout_s=timeout_s, max_retries=0))
        self.max_pending = max_pending
        self.flush_interval_s = flush_interval_s
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._run_ids: dict[tuple[str, str], str | None] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.logged = 0
        self.dropped = 0
        self.failed = 0

    # ---- called from the gateway's event loop: no I/O ----------------------------------------
    def submit(self, adapter: str, version: str, aggregate: dict[str, float]) -> None:
        key = (adapter, str(version))
        with self._lock:
            pending = self._pending.get(key)
            if pending is None and len(self._pending) >= self.max_pending:
                self.dropped += 1
                return
            if pending is not None and pending.aggregate.get("shadow_pairs", 0) > aggregate.get("shadow_pairs", 0):
                return  # an older aggregate that arrived late: the newer one stands
            self._pending[key] = _Pending(adapter, str(version), dict(aggregate))
        self._wake.set()

    __call__ = submit

    # ---- the sender thread -------------------------------------------------------------------
    def start(self) -> ShadowMetricsLogger:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="shadow-metrics", daemon=True)
            self._thread.start()
        return self

    def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Sends what is pending (bounded by `flush_timeout_s`), then ends the thread."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=flush_timeout_s)
        self._thread = None

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()
            if self._stop.is_set():
                return

    def flush(self) -> int:
        """Sends every pending aggregate once; returns how many were logged."""
        with self._lock:
            batch = list(self._pending.values())
            self._pending.clear()
        sent = 0
        for item in batch:
            if self._send(item):
                sent += 1
        return sent

    def _run_id(self, adapter: str, version: str) -> str | None:
        key = (adapter, version)
        if key not in self._run_ids:
            reply = self.rest.get("model-versions/get", {"name": adapter, "version": version})
            self._run_ids[key] = reply["model_version"].get("run_id") or None
        return self._run_ids[key]

    def _send(self, item: _Pending) -> bool:
        try:
            run_id = self._run_id(item.adapter, item.version)
            if run_id is None:
                logger.info("shadow metrics: %s v%s has no run to log on", item.adapter, item.version)
                return False
            metrics = mlflow_metrics(item.aggregate, int(time.time() * 1000))
            self.rest.post("runs/log-batch", {"run_id": run_id, "metrics": metrics})
        except (AdapterNotFound, RegistryError) as error:
            self.failed += 1
            logger.warning("shadow metrics for %s v%s not logged: %s", item.adapter, item.version, error)
            return False
        self.logged += 1
        return True
