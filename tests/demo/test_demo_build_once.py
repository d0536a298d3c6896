"""The build-once machinery (lock + temp dir + rename), driven with a cheap build function."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loraplex.demo.cache import build_once, is_built

MARKER = "done.json"


def write_build(content: str):
    def build(tmp_dir: Path) -> None:
        (tmp_dir / "payload.txt").write_text(content)
        (tmp_dir / MARKER).write_text("{}")

    return build


def test_builds_once_then_reuses(tmp_path):
    final = tmp_path / "assets"
    assert build_once(final, MARKER, write_build("first")) is True
    assert build_once(final, MARKER, write_build("second")) is False
    assert (final / "payload.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".assets.building")] == []


def test_force_replaces_a_finished_build(tmp_path):
    final = tmp_path / "assets"
    build_once(final, MARKER, write_build("first"))
    assert build_once(final, MARKER, write_build("second"), force=True) is True
    assert (final / "payload.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets", "assets.lock"]


def test_failed_build_leaves_no_cache_and_keeps_the_old_one(tmp_path):
    final = tmp_path / "assets"

    def failing(tmp_dir: Path) -> None:
        (tmp_dir / "payload.txt").write_text("half")
        raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError, match="training diverged"):
        build_once(final, MARKER, failing)
    assert not final.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets.lock"]

    build_once(final, MARKER, write_build("good"))
    with pytest.raises(RuntimeError, match="training diverged"):
        build_once(final, MARKER, failing, force=True)
    assert (final / "payload.txt").read_text() == "good"


def test_build_without_marker_is_refused(tmp_path):
    final = tmp_path / "assets"
    with pytest.raises(RuntimeError, match="without writing"):
        build_once(final, MARKER, lambda tmp_dir: (tmp_dir / "payload.txt").write_text("x"))
    assert not is_built(final, MARKER) and not final.exists()


# A child process that builds `final` with a build that waits for the test's go-ahead, so the
# test controls exactly when a build is in progress.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from loraplex.demo.cache import build_once

    final, control, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def build(tmp_dir):
        with open(control / "builds.log", "a") as log:
            log.write(name + "\\n")
        (control / f"{name}.building").write_text("")
        deadline = time.monotonic() + 60
        while not (control / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (tmp_dir / "payload.txt").write_text(name)
        (tmp_dir / "done.json").write_text("{}")

    (control / f"{name}.calling").write_text("")
    built = build_once(final, "done.json", build)
    print("built" if built else "reused", flush=True)
    """
)


def start_child(final: Path, control: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(final), str(control), name],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None, "child exited early"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_two_processes_build_once(tmp_path):
    final, control = tmp_path / "cache" / "assets", tmp_path / "control"
    control.mkdir()
    first = start_child(final, control, "first")
    second = None
    try:
        wait_for(control / "first.building", first)
        second = start_child(final, control, "second")
        wait_for(control / "second.calling", second)
        (control / "release").write_text("")
        assert first.communicate(timeout=60)[0].strip() == "built"
        assert second.communicate(timeout=60)[0].strip() == "reused"
    finally:
        stop(first)
        if second is not None:
            stop(second)
    assert (control / "builds.log").read_text().split() == ["first"]
    assert (final / "payload.txt").read_text() == "first"


def test_killed_build_leaves_no_cache_and_the_next_build_cleans_up(tmp_path):
    final, control = tmp_path / "cache" / "assets", tmp_path / "control"
    control.mkdir()
    child = start_child(final, control, "killed")
    try:
        wait_for(control / "killed.building", child)
    finally:
        stop(child)
    assert not final.exists()
    assert any(p.name.startswith(".assets.building-") for p in final.parent.iterdir())

    assert build_once(final, MARKER, write_build("after")) is True
    assert (final / "payload.txt").read_text() == "after"
    assert not any(p.name.startswith(".assets.building-") for p in final.parent.iterdir())
