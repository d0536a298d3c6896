# Fixtures shared by every part's tests and the end-to-end tests.
pytest_plugins = [
    "loraplex.testing.demo_assets",
    "loraplex.testing.mlflow_server",
]
