"""The gateway's one settings object: defaults, then an optional YAML/TOML file, then env vars.

Env vars are `LORAPLEX_GATEWAY_<FIELD>` (upper case); list fields take comma-separated values,
mapping fields (`static_routes`) take JSON.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from loraplex.grpc_tls import check_pair
from loraplex.layered_settings import LayeredSettings, SettingsError
from loraplex.adapter_mix import DEFAULT_MAX_COMPONENTS

__all__ = ["GatewaySettings", "SettingsError"]

# Room on top of the request timeout for a request's last bytes and for stopping the parts.
DRAIN_MARGIN_S = 5.0

@dataclass(frozen=True)
class GatewaySettings(LayeredSettings):
    ENV_PREFIX: ClassVar[str] = "LORAPLEX_GATEWAY_"
    SECTION: ClassVar[str] = "gateway"

    host: str = "127.0.0.1"
    port: int = 8000  # the public API and health
    admin_port: int = 8001  # Prometheus /metrics, /admin/* and health; keep it off the public network
    # Shards: a static list of host:port, or a DNS name whose A records are re-resolved
    # (a Kubernetes headless service) - `shard_dns` wins when set.
    shard_addresses: tuple[str, ...] = ()
    shard_dns: str = ""
    shard_dns_port: int = 50051
    shard_dns_interval_s: float = 5.0
    # TLS to the shards (PEM files): a CA makes every shard channel TLS, health checks included;
    # a client certificate and key are what a mutual-TLS shard asks for. `shard_tls_server_name`:
    # the name the shards' certificate carries when it is not the address dialled (pod IPs).
    shard_tls_ca_file: str = ""
    shard_tls_cert_file: str = ""
    shard_tls_key_file: str = ""
    shard_tls_server_name: str = ""
    health_interval_s: float = 0.5
    health_timeout_s: float = 0.4
    # How often each healthy shard's Stats is read (which adapter it holds merged, for placement).
    shard_stats_interval_s: float = 2.0
    tenants_file: str = ""
    tenants_reload_interval_s: float = 1.0
    # Registry: with a tracking URI the routing table follows MLflow; without one it comes
    # from `static_routes` ({adapter: {champion, canary, shadow, canary_percent}}).
    registry_tracking_uri: str = ""
    registry_cache_dir: str = ""
    registry_poll_interval_s: float = 2.0
    static_routes: Mapping[str, Any] = field(default_factory=dict)
    base_model_id: str = "base"
    # Limits.
    max_body_bytes: int = 1_048_576
    max_prompt_chars: int = 32_768
    max_prompt_tokens: int = 0  # 0 = not checked here (needs `tokenizer_dir`); the shard caps by context
    tokenizer_dir: str = ""
    max_tokens_limit: int = 1024
    # Most adapters a request's ad-hoc mix (`loraplex_mix`) may combine; keep it <= the shards' own.
    max_mix_components: int = DEFAULT_MAX_COMPONENTS
    default_max_tokens: int = 16  # completions without max_tokens, as OpenAI's legacy default
    # Chat without max_tokens answers until it stops, as OpenAI's chat does: 0 = up to
    # max_tokens_limit (the shard also caps by its context).
    default_chat_max_tokens: int = 0
    request_timeout_s: float = 120.0
    # Shutdown (gateway/draining.py). On SIGTERM readiness turns off and new requests get 503 +
    # Retry-After for `drain_delay_s` while the port stays open (load balancers notice); then the
    # port closes and in-flight requests, streams included, have `drain_grace_s` to finish.
    # 0 = request_timeout_s + 5 s; a smaller value would cut answers still within their timeout.
    drain_delay_s: float = 2.0
    drain_grace_s: float = 0.0
    # A streamed answer whose next write waits this long on a client that stopped reading is cut:
    # the shard call is cancelled (its batch row freed) and the connection closed
    # (gateway/routes/streaming.py).
    stream_write_timeout_s: float = 15.0
    # SO_SNDBUF of the API port's connections: what the kernel holds for a client that stops
    # reading, before the write stalls (and the timeout above starts counting). 0 = the kernel's
    # autotuning, up to net.ipv4.tcp_wmem's maximum (4 MiB by default) per connection.
    socket_send_buffer_bytes: int = 0
    # Placement.
    ring_virtual_nodes: int = 128
    ring_load_epsilon: float = 0.25
    hot_adapter_inflight: int = 8  # in-flight requests per replica before an adapter spreads further
    # Shadow mode.
    shadow_sample_share: float = 1.0
    shadow_log_path: str = ""
    # The log rotates past this many bytes and keeps this many rotated files (`.1` newest): at most
    # (backup_count + 1) x max_bytes on disk.
    shadow_log_max_bytes: int = 64 * 1024 * 1024
    shadow_log_backup_count: int = 3
    shadow_max_concurrency: int = 4
    shadow_recent_pairs: int = 100
    shadow_aggregate_every: int = 10  # pairs of one (adapter, shadow version) between MLflow metric logs
    # A version the shards refused (corrupt, wrong base) is not tried again for this long; meanwhile
    # the adapter's last version that served keeps serving.
    refused_version_retry_s: float = 30.0
    # A file where the gateway keeps its last routing table and each adapter's last version that
    # served ("" = none): a gateway restarted while MLflow is down or a champion is refused serves
    # from it (gateway/serving_record.py).
    serving_record_file: str = ""
    # Admin API calls (/admin/*) per admin key and minute, per gateway process; past it 429 + Retry-After.
    admin_rate_per_minute: int = 60
    # Tenant limits shared by every worker and replica through Redis/Valkey (gateway/shared_limits.py);
    # empty = each process counts alone, right only for a single process.
    redis_url: str = ""
    # While the store is unreachable: "open" = each process enforces the limits alone (metric + log),
    # "closed" = limited tenants get 503 + Retry-After.
    redis_failure_policy: str = "open"
    redis_timeout_s: float = 0.5
    redis_retry_s: float = 1.0  # after a failure, the store is tried again this much later
    # A request's concurrency lease; renewed every third of it while the request runs, so a crashed
    # process's requests stop counting this long after it died.
    limits_lease_s: float = 10.0
    # Serving status written onto MLflow model versions (tags loraplex.status, loraplex.status.*)
    # by one process per cluster (a lease in the shared store when redis_url is set): a cycle every
    # interval (0 = never), at most `serving_status_batch` versions read (and changed tags written)
    # per cycle; a writer that stops renewing its lease is replaced after `serving_status_lease_s`.
    serving_status_interval_s: float = 5.0
    serving_status_batch: int = 200
    serving_status_lease_s: float = 20.0
    # Processes serving the port: 0 = one per core when redis_url is set, else 1.
    workers: int = 0
    # Distinct adapters named in metric labels per process; the rest are counted as `_other`
    # (gateway/metrics.py), so a catalogue of 10,000 adapters cannot explode the series.
    metrics_adapter_labels: int = 1000


    def validate(self) -> None:
        for name in ("port", "admin_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise SettingsError(f"{name} must be 0..65535, got {getattr(self, name)}")
        if self.port == self.admin_port != 0:
            raise SettingsError(f"admin_port must differ from port ({self.port})")
        if not 0.0 <= self.shadow_sample_share <= 1.0:
            raise SettingsError("shadow_sample_share must be within [0, 1]")
        for name in ("max_body_bytes", "max_prompt_chars", "max_tokens_limit", "max_mix_components", "default_max_tokens", "shadow_aggregate_every",
                     "shadow_log_max_bytes", "admin_rate_per_minute", "metrics_adapter_labels"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        if self.shadow_log_backup_count < 1:
            # 0 would make the standard handler never roll over: the file would grow without bound.
            raise SettingsError("shadow_log_backup_count must be >= 1")
        if self.default_chat_max_tokens < 0:
            raise SettingsError("default_chat_max_tokens must be >= 0")
        if self.ring_load_epsilon <= 0:
            raise SettingsError("ring_load_epsilon must be positive")
        if self.health_interval_s <= 0 or self.request_timeout_s <= 0 or self.shard_stats_interval_s <= 0:
            raise SettingsError("intervals and timeouts must be positive")
        if self.drain_delay_s < 0 or self.drain_grace_s < 0:
            raise SettingsError("drain_delay_s and drain_grace_s must be >= 0")
        if self.stream_write_timeout_s <= 0 or self.socket_send_buffer_bytes < 0:
            raise SettingsError("stream_write_timeout_s must be positive and socket_send_buffer_bytes >= 0")
        if self.drain_grace_s and self.drain_grace_s < self.request_timeout_s:
            raise SettingsError(
                f"drain_grace_s ({self.drain_grace_s:g}) is shorter than request_timeout_s ({self.request_timeout_s:g}): "
                "a rollout would cut answers still within their timeout; raise it or leave it 0 (= request_timeout_s + 5)"
            )
        if self.redis_failure_policy not in ("open", "closed"):
            raise SettingsError(f"redis_failure_policy must be 'open' or 'closed', got {self.redis_failure_policy!r}")
        if self.redis_timeout_s <= 0 or self.redis_retry_s <= 0 or self.limits_lease_s <= 0:
            raise SettingsError("redis_timeout_s, redis_retry_s and limits_lease_s must be positive")
        check_pair(self.shard_tls_cert_file, self.shard_tls_key_file, "shard_tls_cert_file / shard_tls_key_file")
        if (self.shard_tls_cert_file or self.shard_tls_server_name) and not self.shard_tls_ca_file:
            raise SettingsError("shard_tls_cert_file, shard_tls_key_file and shard_tls_server_name need shard_tls_ca_file")
        if self.serving_status_interval_s < 0 or self.serving_status_batch <= 0:
            raise SettingsError("serving_status_interval_s must be >= 0 (0 = off) and serving_status_batch positive")
        if self.serving_status_interval_s and self.serving_status_lease_s <= self.serving_status_interval_s:
            # The writer renews once per cycle: a shorter lease would lapse between renewals.
            raise SettingsError("serving_status_lease_s must be longer than serving_status_interval_s")
        if self.workers < 0:
            raise SettingsError("workers must be >= 0 (0 = automatic)")
        if self.workers > 1 and not self.redis_url:
            raise SettingsError(
                "workers > 1 needs redis_url: without a shared store each worker would enforce tenant limits on its own"
            )

    def drain_grace(self) -> float:
        """Seconds in-flight requests get to finish after the port closes on shutdown."""
        return self.drain_grace_s or self.request_timeout_s + DRAIN_MARGIN_S

    def shutdown_budget(self) -> float:
        """The longest a SIGTERM'd gateway takes to exit: what a pod's terminationGracePeriodSeconds
        (after its preStop delay) and compose's stop_grace_period must cover."""
        return self.drain_delay_s + self.drain_grace() + DRAIN_MARGIN_S

    def worker_count(self) -> int:
        """`workers`, or when 0: one per core this process may run on with a shared store, else 1."""
        if self.workers:
            return self.workers
        return len(os.sched_getaffinity(0)) if self.redis_url else 1
