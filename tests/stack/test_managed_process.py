"""ManagedProcess pauses and resumes its whole process group, and stops a paused group."""

from __future__ import annotations

import sys
import time

from loraplex.stack.processes import ManagedProcess

# Prints a counter every 20 ms: the log grows only while the process runs.
TICKER = "import time\nn = 0\nwhile True:\n    n += 1\n    print(n, flush=True)\n    time.sleep(0.02)\n"


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_a_paused_group_makes_no_progress_resumes_and_still_stops(tmp_path):
    process = ManagedProcess("ticker", [sys.executable, "-c", TICKER], log_path=tmp_path / "ticker.log")
    process.start()
    try:
        process.wait_until(lambda: process.log_path.read_text().count("\n") >= 3, timeout_s=30, poll_s=0.02)
        process.pause()
        process.wait_until(lambda: _state(process.pid) == "T", timeout_s=10, poll_s=0.01)
        paused_at = process.log_path.read_text()
        time.sleep(0.3)
        assert process.log_path.read_text() == paused_at
        process.resume()
        process.wait_until(lambda: len(process.log_path.read_text()) > len(paused_at), timeout_s=10, poll_s=0.02)
        process.pause()
    finally:
        started = time.monotonic()
        process.stop(grace_s=10)  # paused: stop must continue it for SIGTERM to act
    assert process.returncode is not None
    assert time.monotonic() - started < 5  # ended by SIGTERM, not by the SIGKILL after the grace
