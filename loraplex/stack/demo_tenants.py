"""API keys and the tenants file for the local demo stack.

The tenants file holds only sha256 hashes of keys. The plain demo keys are kept in the stack's
state folder (mode 0600) so that restarting the stack keeps the keys a user already copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

# Which demo tenant may use what: `acme` gets every demo adapter and the base model, `globex`
# only `legal`, so a request from globex for `sql` shows the 403 path.
DEMO_GRANTS: dict[str, list[str]] = {
    "acme": ["legal", "clinical", "sql", "base"],
    "globex": ["legal"],
}
DEMO_LIMITS = {"concurrent_requests": 16, "tokens_per_minute": 200_000}


@dataclass(frozen=True)
class DemoKeys:
    tenant_keys: dict[str, str]
    admin_key: str


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_or_create_demo_keys(path: Path) -> DemoKeys:
    if path.exists():
        stored = json.loads(path.read_text())
        if set(stored.get("tenant_keys", {})) == set(DEMO_GRANTS):
            return DemoKeys(tenant_keys=stored["tenant_keys"], admin_key=stored["admin_key"])
    keys = DemoKeys(
        tenant_keys={tenant: f"lpx-{tenant}-{secrets.token_hex(12)}" for tenant in DEMO_GRANTS},
        admin_key=f"lpx-admin-{secrets.token_hex(12)}",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"tenant_keys": keys.tenant_keys, "admin_key": keys.admin_key}, out, indent=2)
    return keys


def write_tenants_file(path: Path, keys: DemoKeys) -> None:
    document = {
        "admin_key_sha256": sha256_hex(keys.admin_key),
        "tenants": [
            {
                "name": tenant,
                "key_sha256": [sha256_hex(keys.tenant_keys[tenant])],
                "adapters": adapters,
                "default_adapter": adapters[0],
                "limits": dict(DEMO_LIMITS),
            }
            for tenant, adapters in DEMO_GRANTS.items()
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(document, sort_keys=False))
    tmp.replace(path)
