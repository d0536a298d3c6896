"""Tenants: API keys (as sha256 hashes) -> tenant, grants and limits; reloaded when the file changes.

File (YAML):
    admin_key_sha256: <hex>
    tenants:
      - name: acme
        key_sha256: [<hex>, ...]
        adapters: [legal, base]      # "*" = every adapter (and base)
        default_adapter: legal
        limits: {concurrent_requests: 8, tokens_per_minute: 20000}   # 0 / absent = unlimited
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from loraplex.routing_table import AdapterRoute, may_use

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class TenantsFileError(ValueError):
    """The tenants file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class TenantLimits:
    concurrent_requests: int = 0
    tokens_per_minute: int = 0


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: tuple[str, ...]
    adapters: frozenset[str]
    default_adapter: str | None
    limits: TenantLimits

    def may_use(self, model_name: str, route: AdapterRoute | None = None) -> bool:
        return may_use(self.name, self.adapters, model_name, route)


@dataclass(frozen=True)
class TenantsConfig:
    admin_key_sha256: str | None
    tenants: tuple[Tenant, ...]


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_tenants(text: str, source: str = "tenants file") -> TenantsConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TenantsFileError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise TenantsFileError(f"{source}: must be a mapping with 'tenants'")
    unknown = set(data) - {"admin_key_sha256", "tenants"}
    if unknown:
        raise TenantsFileError(f"{source}: unknown keys {sorted(unknown)}")
    admin = data.get("admin_key_sha256")
    if admin is not None:
        admin = _hash_field(admin, f"{source}: admin_key_sha256")
    raw_tenants = data.get("tenants") or []
    if not isinstance(raw_tenants, list):
        raise TenantsFileError(f"{source}: 'tenants' must be a list")
    tenants: list[Tenant] = []
    seen_names: set[str] = set()
    seen_keys: dict[str, str] = {}
    for i, raw in enumerate(raw_tenants):
        where = f"{source}: tenants[{i}]"
        if not isinstance(raw, dict):
            raise TenantsFileError(f"{where}: must be a mapping")
        unknown = set(raw) - {"name", "key_sha256", "adapters", "default_adapter", "limits"}
        if unknown:
            raise TenantsFileError(f"{where}: unknown keys {sorted(unknown)}")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise TenantsFileError(f"{where}: 'name' must be a non-empty string")
        if name in seen_names:
            raise TenantsFileError(f"{where}: duplicate tenant name {name!r}")
        seen_names.add(name)
        keys = raw.get("key_sha256")
        keys = [keys] if isinstance(keys, str) else keys
        if not isinstance(keys, list) or not keys:
            raise TenantsFileError(f"{where}: 'key_sha256' must list at least one sha256 hex digest")
        hashes = tuple(_hash_field(k, f"{where}.key_sha256") for k in keys)
        for h in hashes:
            if h in seen_keys or h == admin:
                raise TenantsFileError(f"{where}: a key hash is used twice (also by {seen_keys.get(h, 'admin')})")
            seen_keys[h] = name
        adapters = raw.get("adapters") or []
        if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
            raise TenantsFileError(f"{where}: 'adapters' must be a list of names")
        default = raw.get("default_adapter")
        if default is not None and (not isinstance(default, str) or not ("*" in adapters or default in adapters)):
            raise TenantsFileError(f"{where}: default_adapter {default!r} is not among its adapters")
        limits_raw = raw.get("limits") or {}
        if not isinstance(limits_raw, dict) or set(limits_raw) - {"concurrent_requests", "tokens_per_minute"}:
            raise TenantsFileError(f"{where}: 'limits' takes concurrent_requests and tokens_per_minute")
        limits = {}
        for k, v in limits_raw.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise TenantsFileError(f"{where}: limits.{k} must be a non-negative integer")
            limits[k] = v
        tenants.append(Tenant(name, hashes, frozenset(adapters), default, TenantLimits(**limits)))
    return TenantsConfig(admin, tuple(tenants))


def _hash_field(value: object, where: str) -> str:
    if not isinstance(value, str) or not _HEX64.match(value.strip().lower()):
        raise TenantsFileError(f"{where}: must be a sha256 hex digest (64 hex characters), never a plain key")
    return value.strip().lower()


class TenantDirectory:
    """Looks API keys up; `refresh()` re-reads the file when its mtime or size changes.

    A malformed new file leaves the tenants in force and logs an error (and `last_error` says why).
    """

    def __init__(self, config: TenantsConfig, path: Path | None = None):
        self._config = config
        self._path = path
        self._stamp = self._file_stamp() if path else None
        self.last_error: str | None = None
        self._index(config)

    @classmethod
    def from_file(cls, path: str | Path) -> TenantDirectory:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise TenantsFileError(f"cannot read tenants file {path}: {exc}") from exc
        return cls(parse_tenants(text, str(path)), path)

    def _index(self, config: TenantsConfig) -> None:
        self._by_hash = {h: t for t in config.tenants for h in t.key_sha256}

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    @property
    def tenants(self) -> tuple[Tenant, ...]:
        return self._config.tenants

    def refresh(self) -> bool:
        """Reload if the file changed; True when new tenants took effect."""
        if self._path is None:
            return False
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            config = parse_tenants(self._path.read_text(), str(self._path))
        except (OSError, TenantsFileError) as exc:
            self.last_error = str(exc)
            log.error("tenants file not reloaded, previous tenants stay in force: %s", exc)
            return False
        self._config = config
        self._index(config)
        self.last_error = None
        log.info("tenants reloaded from %s: %d tenants", self._path, len(config.tenants))
        return True

    def authenticate(self, api_key: str | None) -> Tenant | None:
        if not api_key:
            return None
        digest = sha256_hex(api_key)
        # Dict lookup by the digest is safe: the attacker controls the key, not its hash, and
        # the final comparison is constant-time.
        tenant = self._by_hash.get(digest)
        if tenant is None:
            return None
        return tenant if any(hmac.compare_digest(digest, h) for h in tenant.key_sha256) else None

    def is_admin(self, api_key: str | None) -> bool:
        admin = self._config.admin_key_sha256
        if not api_key or not admin:
            return False
        return hmac.compare_digest(sha256_hex(api_key), admin)


def tenants_file_text(admin_key: str | None, tenants: list[dict]) -> str:
    """A tenants file for plain keys (e.g. a freshly generated demo key): only their hashes are written.

    Each tenant is a dict like the file's, with `keys: [plain, ...]` instead of `key_sha256`.
    """
    data: dict = {}
    if admin_key:
        data["admin_key_sha256"] = sha256_hex(admin_key)
    data["tenants"] = [
        {**{k: v for k, v in t.items() if k != "keys"}, "key_sha256": [sha256_hex(k) for k in t["keys"]]} for t in tenants
    ]
    text = yaml.safe_dump(data, sort_keys=False)
    parse_tenants(text)  # never write a file the gateway would refuse
    return text


def bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()
