from gateway_fixtures import (  # noqa: F401
    admin_client,
    client,
    gateway_apps,
    gateway_process,
    gateway_settings,
    parts,
    shard_servers,
    tenants_file,
)
