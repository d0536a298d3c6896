# Fixtures shared by every part's tests and the end-to-end tests (one instance per session).
pytest_plugins = [
    "loraplex.testing.demo_assets",
    "loraplex.testing.mlflow_server",
    "loraplex.testing.redis_server",
    "loraplex.testing.shard_models",
]
