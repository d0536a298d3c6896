"""Session fixture: the demo base model and adapters (built once, then read from the cache).

The first session on a machine builds them (a few minutes on 2 CPU cores); later sessions, and
concurrent ones, share the same cache under $LORAPLEX_DEMO_DIR or ~/.cache/loraplex/demo.
"""

import pytest

from loraplex.demo import DemoAssets, ensure_demo_assets


@pytest.fixture(scope="session")
def demo_assets() -> DemoAssets:
    return ensure_demo_assets(progress=False)
