"""The gateway's two Litestar apps over one set of parts: the public API (OpenAI-compatible routes
and health) and the admin port (Prometheus metrics, the admin API, health).

Each app is configured by `GatewayWiring.on_app_init` in named steps; `python -m gateway` serves
both, each on its own port.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.middleware import AbstractAuthenticationMiddleware, DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.plugins import InitPluginProtocol
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from litestar.types import ASGIApp, ControllerRouterHandler, Receive, Scope, Send

from gateway.draining import SigtermDrain
from gateway.parts import GatewayParts, build_parts
from gateway.routes import admin, health, openai_api
from gateway.routes.authentication import AdminAuthentication, TenantAuthentication
from gateway.routes.responses import openai_error_response
from gateway.routes.telemetry import RequestTelemetry
from gateway.settings import GatewaySettings

API_DESCRIPTION = (
    "OpenAI-compatible API over many LoRA adapters of one base model. Errors use OpenAI's shape "
    '`{"error": {"message", "type", "param", "code"}}`; validation errors are 400.'
)
ADMIN_DESCRIPTION = "The gateway's admin port: Prometheus metrics, and the admin API (admin key)."


class GatewayWiring(InitPluginProtocol):
    """One gateway app: its routes, its dependencies, its middleware, its errors, its lifecycle, its schema."""

    def __init__(
        self,
        parts: GatewayParts,
        route_handlers: Sequence[ControllerRouterHandler],
        authentication: type[AbstractAuthenticationMiddleware],
        title: str,
        description: str,
        runs_parts: bool,
    ):
        self.parts = parts
        self.route_handlers = route_handlers
        self.authentication = authentication
        self.title, self.description = title, description
        self.runs_parts = runs_parts

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        self._routes(app_config)
        self._dependencies(app_config)
        self._middleware(app_config)
        self._errors(app_config)
        self._lifecycle(app_config)
        self._openapi(app_config)
        return app_config

    def _routes(self, app_config: AppConfig) -> None:
        app_config.route_handlers.extend(self.route_handlers)

    def _dependencies(self, app_config: AppConfig) -> None:
        parts = self.parts
        app_config.dependencies["parts"] = Provide(lambda: parts, use_cache=True, sync_to_thread=False)

    def _middleware(self, app_config: AppConfig) -> None:
        # Outermost first: the request id and the latency timer cover authentication too.
        app_config.middleware.extend(
            [RequestTelemetry(self.parts.metrics), DefineMiddleware(self.authentication, tenants=self.parts.tenants)]
        )

    def _errors(self, app_config: AppConfig) -> None:
        app_config.exception_handlers[Exception] = openai_error_response

    def _lifecycle(self, app_config: AppConfig) -> None:
        if self.runs_parts:
            app_config.on_startup.append(self.parts.start)
            app_config.on_shutdown.append(self.parts.stop)

    def _openapi(self, app_config: AppConfig) -> None:
        app_config.openapi_config = OpenAPIConfig(title=self.title, version="0.1.0", description=self.description)


# The body size limit goes to the constructor: Litestar 2.25 ignores it when set in `on_app_init`.


def create_api_app(parts: GatewayParts) -> Litestar:
    """The public port: the API and health. Its lifespan starts and stops the parts."""
    wiring = GatewayWiring(
        parts, [*openai_api.ROUTES, *health.ROUTES], TenantAuthentication, "loraplex gateway", API_DESCRIPTION, runs_parts=True
    )
    plugins: list = [wiring]
    if parts.tracing is not None:
        plugins.append(OpenTelemetryPlugin(OpenTelemetryConfig(tracer_provider=parts.tracing, exclude=["/healthz", "/readyz"])))
    return Litestar(plugins=plugins, request_max_body_size=parts.settings.max_body_bytes)


def create_admin_app(parts: GatewayParts) -> Litestar:
    """The admin port: metrics, the admin API and health, over the parts the API app runs."""
    wiring = GatewayWiring(
        parts, [*admin.routes(parts.settings), *health.ROUTES], AdminAuthentication, "loraplex gateway admin", ADMIN_DESCRIPTION, runs_parts=False
    )
    return Litestar(plugins=[wiring], request_max_body_size=parts.settings.max_body_bytes)


@dataclass
class GatewayApps:
    parts: GatewayParts
    api: Litestar
    admin: Litestar

    def by_port(self) -> ByPort:
        """Both apps as one ASGI app, told apart by the port a request came in on."""
        return ByPort(self.api, self.admin, self.parts.settings.admin_port)

    def served(self) -> ByPort:
        """`by_port` as `python -m gateway` serves it (one process or each worker): a SIGTERM drains
        this process before uvicorn's graceful shutdown (gateway/draining.py)."""
        self.api.on_startup.append(SigtermDrain(self.parts.drain, self.parts.settings.drain_delay_s).install)
        return self.by_port()


def create_apps(settings: GatewaySettings, **parts_overrides) -> GatewayApps:
    """Both apps over one set of parts; `parts_overrides` go to `build_parts` (tests hand in parts)."""
    parts = build_parts(settings, **parts_overrides)
    return GatewayApps(parts, create_api_app(parts), create_admin_app(parts))


class ByPort:
    """One ASGI app serving each port's app: the admin app on `admin_port`, the API app elsewhere.
    Lifespan events go to the API app, which runs the parts both share."""

    def __init__(self, api: ASGIApp, admin: ASGIApp, admin_port: int):
        self.api, self.admin, self.admin_port = api, admin, admin_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        app = self.admin if scope["type"] != "lifespan" and server is not None and server[1] == self.admin_port else self.api
        await app(scope, receive, send)
