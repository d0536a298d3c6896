"""`python -m loraplex.demo build` finds the cached assets and says where they are."""

import json
import subprocess
import sys


def test_build_command_prints_where_the_cached_assets_are(demo_assets):
    result = subprocess.run(
        [sys.executable, "-m", "loraplex.demo", "build", "--json", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["base_dir"] == str(demo_assets.base_dir)
    assert printed["adapters"] == {name: str(path) for name, path in demo_assets.adapters.items()}


def test_build_command_rejects_unknown_options():
    result = subprocess.run(
        [sys.executable, "-m", "loraplex.demo", "build", "--no-such-option"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr
