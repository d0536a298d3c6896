"""loraplex gateway: an OpenAI-compatible Litestar app in front of the shards.

Core (plain classes, tested without a network):
  settings.GatewaySettings     one settings object (defaults < --config YAML/TOML < env LORAPLEX_GATEWAY_*)
  tenants.TenantDirectory      Bearer key -> Tenant (sha256, constant-time), grants, admin key, reload on change
  tenant_limits.TenantLimiter  concurrent requests / tokens per minute -> 429 + Retry-After; leases with
                               reserved tokens; LocalTenantLimiter (one process) or
                               shared_limits.SharedTenantLimiter (Redis/Valkey, every worker and replica)
  routing.Router               model id -> RouteDecision(adapter, version, route=champion|canary|pinned|base)
  placement.PlacementRing      consistent hashing with bounded loads, keyed by adapter@version
  shards.ShardPool             grpc.aio channels, grpc.health.v1 polling + passive failure detection
  dispatch.Dispatcher          Generate with failover (retry before the first token; RESOURCE_EXHAUSTED moves on)
  shadow.ShadowMode            sampled copies to the `shadow` version, compared and logged (JSON lines)
  completions.CompletionService  OpenAI request -> shard -> OpenAI response / SSE events
Transport: app.create_app(settings) wires them into Litestar; routes/ holds the thin handlers;
`python -m gateway --config FILE` serves it with uvicorn, in `workers` processes on one port.
"""
