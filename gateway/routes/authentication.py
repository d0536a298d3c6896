"""Authentication as Litestar middleware: a tenant's Bearer key makes the tenant `request.user`;
on the admin port, only the admin key passes."""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import ASGIApp

from gateway.errors import OpenAIError, unauthorized
from gateway.tenants import TenantDirectory, bearer_key

# Routes that answer without a key set `opt={EXCLUDE_FROM_AUTH: True}`.
EXCLUDE_FROM_AUTH = "exclude_from_auth"
# The OpenAPI schema Litestar serves is public on both ports.
SCHEMA_PATHS = "^/schema"


class _BearerKeyAuthentication(AbstractAuthenticationMiddleware):
    def __init__(self, app: ASGIApp, tenants: TenantDirectory):
        super().__init__(app, exclude=SCHEMA_PATHS, exclude_from_auth_key=EXCLUDE_FROM_AUTH)
        self.tenants = tenants


class TenantAuthentication(_BearerKeyAuthentication):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        key = bearer_key(connection.headers.get("authorization"))
        tenant = self.tenants.authenticate(key)
        if tenant is None:
            raise unauthorized()
        return AuthenticationResult(user=tenant, auth=key)


class AdminAuthentication(_BearerKeyAuthentication):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        key = bearer_key(connection.headers.get("authorization"))
        if self.tenants.is_admin(key):
            return AuthenticationResult(user="admin", auth=key)
        if self.tenants.authenticate(key) is not None:
            raise OpenAIError(403, "This key is not the admin key.", "permission_error", "admin_only")
        raise unauthorized()
