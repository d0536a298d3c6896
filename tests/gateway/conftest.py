from gateway_fixtures import client, gateway_process, gateway_settings, shard_servers, tenants_file  # noqa: F401
