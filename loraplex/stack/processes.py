"""Child processes that the local stack starts and must be able to stop completely.

Every child runs in its own session (process group), so stopping it stops whatever it spawned
too (MLflow's server leaves workers behind on a plain SIGTERM). Stopping is by process group id,
never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class ProcessFailedToStart(RuntimeError):
    pass


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self._popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            log.close()

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, poll_s: float = 0.2) -> None:
        """Polls `ready` until it returns True; fails early if the process dies."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_running():
                raise ProcessFailedToStart(
                    f"{self.name} exited with code {self._popen.returncode if self._popen else '?'}; "
                    f"last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                if ready():
                    return
            except Exception:  # a not-yet-listening server raises; keep polling
                pass
            time.sleep(poll_s)
        raise ProcessFailedToStart(
            f"{self.name} not ready after {timeout_s:.0f}s; last log lines ({self.log_path}):\n"
            f"{self.log_tail()}"
        )

    def signal_group(self, sig: int) -> None:
        if self._popen is None:
            return
        try:
            os.killpg(self._popen.pid, sig)
        except ProcessLookupError:
            pass

    def pause(self) -> None:
        """SIGSTOP the whole group: it keeps its memory and uses no CPU until `resume`."""
        self.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal_group(signal.SIGCONT)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the whole group, SIGKILL after `grace_s`; always reaps the child."""
        if self._popen is None:
            return
        self.resume()  # a paused group would not act on SIGTERM until continued
        self.signal_group(signal.SIGTERM)
        try:
            self._popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        # The group may outlive its leader (e.g. MLflow workers): kill what is left.
        self.signal_group(signal.SIGKILL)
        try:
            self._popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        """SIGKILL the group at once, as a crash would."""
        self.signal_group(signal.SIGKILL)
        if self._popen is not None:
            self._popen.wait(timeout=10)
