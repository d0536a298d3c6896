import os
import signal
from pathlib import Path

import httpx
import pytest

from e2e_tests.stack_process import StackHandle, group_is_alive, start_stack, stop_stack_process


@pytest.fixture(scope="session")
def stack(tmp_path_factory, demo_assets) -> StackHandle:
    """The whole product, started by `loraplex up` exactly as README says, on free ports."""
    state_dir: Path = tmp_path_factory.mktemp("stack")
    handle = start_stack(state_dir)
    groups = handle.process_groups()
    yield handle
    code = stop_stack_process(handle.process)
    leftover = [name for name, pgid in groups.items() if group_is_alive(pgid)]
    for name in leftover:  # never leave processes behind, even when the assertion below fails
        os.killpg(groups[name], signal.SIGKILL)
    assert code == 0, handle.output()[-3000:]
    assert leftover == [], f"processes left running after Ctrl-C: {leftover}"


@pytest.fixture()
def client(stack) -> httpx.Client:
    with httpx.Client(base_url=stack.gateway_url, timeout=120) as http:
        yield http


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# A stack started in-process whose parts the fault tests break (e2e_tests/fault_stack.py).
from e2e_tests.fault_stack import fault_stack  # noqa: E402,F401
