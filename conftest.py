# Fixtures shared by every part's tests and the end-to-end tests (one instance per session).
pytest_plugins = [
    "tests.support.demo_assets",
    "tests.support.mlflow_server",
    "tests.support.redis_server",
    "tests.support.shard_models",
]
