"""loraplex gateway: an OpenAI-compatible Litestar app in front of the shards.

Core (plain classes, tested without a network):
  settings.GatewaySettings       one settings object (defaults < --config YAML/TOML < env LORAPLEX_GATEWAY_*)
  tenants.TenantDirectory        Bearer key -> Tenant (sha256, constant-time), grants, admin key, reload on change
  tenant_limits.TenantLimiter    concurrent requests / tokens per minute -> 429 + Retry-After; leases with
                                 reserved tokens; LocalTenantLimiter (one process) or
                                 shared_limits.SharedTenantLimiter (Redis/Valkey, every worker and replica)
  routing_source.RoutingSource   where the routing table (loraplex.routing_table) comes from: MLflow or static
  routing.VersionRouter          model id -> VersionChoice(adapter, version, assignment=champion|canary|pinned|base)
  placement.PlacementRing        consistent hashing with bounded loads, keyed by adapter@version
  shards.ShardPool               grpc.aio channels, grpc.health.v1 polling + passive failure detection
  dispatch.Dispatcher            Generate with failover; typed failures (errors.ShardCallFailed, VersionRefused)
  version_fallback.LastGoodVersions  a refused promotion falls back to the version that served before
  shadow.ShadowMode              sampled copies to the `shadow` version, compared and logged (JSON lines)
  completions.CompletionService  OpenAI request -> shard -> OpenAI response structs / SSE events
  parts.build_parts              every part from the settings; their start and stop
Transport: app.create_apps(settings) wires the parts into two Litestar apps (the public API and the
admin port); routes/ holds the thin handlers, the authentication and telemetry middleware and the
one error-to-HTTP mapping; `python -m gateway --config FILE` serves both with uvicorn, in `workers`
processes.
"""
