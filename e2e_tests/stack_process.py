"""Runs `loraplex up` as a user would, and reads what it prints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class StackHandle:
    process: subprocess.Popen
    output_path: Path
    state_dir: Path
    gateway_url: str
    gateway_admin_url: str
    mlflow_url: str
    api_key: str
    admin_key: str
    curl_line: str

    @property
    def tenant_keys(self) -> dict[str, str]:
        return json.loads((self.state_dir / "demo-keys.json").read_text())["tenant_keys"]

    def process_groups(self) -> dict[str, int]:
        return json.loads((self.state_dir / "process-groups.json").read_text())

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")


def start_stack(state_dir: Path, timeout_s: float = 600) -> StackHandle:
    output_path = state_dir / "loraplex-up.out"
    state_dir.mkdir(parents=True, exist_ok=True)
    out = open(output_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "loraplex.cli", "up", "--state-dir", str(state_dir), "--free-ports"],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out.close()
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = output_path.read_text(errors="replace")
        if "Ctrl-C stops everything" in text:
            break
        if process.poll() is not None:
            raise RuntimeError(f"loraplex up exited with {process.returncode}:\n{text[-4000:]}")
        time.sleep(0.5)
    else:
        stop_stack_process(process)
        raise RuntimeError(f"loraplex up not ready after {timeout_s}s:\n{text[-4000:]}")

    def field(pattern: str) -> str:
        match = re.search(pattern, text)
        if not match:
            raise RuntimeError(f"`{pattern}` not in loraplex up output:\n{text}")
        return match.group(1)

    return StackHandle(
        process=process,
        output_path=output_path,
        state_dir=state_dir,
        gateway_url=field(r"gateway\s+(http://\S+)"),
        gateway_admin_url=field(r"admin\s+(http://\S+)"),
        mlflow_url=field(r"MLflow\s+(http://\S+)"),
        api_key=field(r"API key\s+(\S+)"),
        admin_key=field(r"admin key\s+(\S+)"),
        curl_line=field(r"\n(curl .+)\n"),
    )


def stop_stack_process(process: subprocess.Popen, timeout_s: float = 60) -> int:
    """Ctrl-C, as a user would; the group is killed only if that did not work."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    return process.returncode


def group_is_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader still "exists" for kill(0): look at the state of the group's processes.
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            return True
    return False
