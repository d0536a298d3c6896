"""The parts one gateway app is made of, handed to route handlers through Litestar DI."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.di import NamedDependency

from gateway.completions import CompletionService
from gateway.metrics import GatewayMetrics
from gateway.routing import Router, RoutingSource
from gateway.settings import GatewaySettings
from gateway.shadow import ShadowMode, ShadowRecorder
from gateway.shards import ShardPool
from gateway.tenants import TenantDirectory


@dataclass
class GatewayParts:
    settings: GatewaySettings
    tenants: TenantDirectory
    routing_source: RoutingSource
    router: Router
    pool: ShardPool
    service: CompletionService
    metrics: GatewayMetrics
    shadow: ShadowMode
    shadow_recorder: ShadowRecorder


Parts = NamedDependency[GatewayParts]
