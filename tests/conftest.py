"""Shared fixtures: where the real corpora live, and a session-wide reaper of child processes."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"real corpus not found at {path} (CI checks out ../shared beside the repo)")
    return path


@pytest.fixture(scope="session", autouse=True)
def reap_children():
    """Whatever a test leaves behind (a node, its p2pd) is killed by PID at the end of the session."""
    yield
    me = psutil.Process(os.getpid())
    leftovers = me.children(recursive=True)
    for p in leftovers:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=10)


def assert_all_gone(pids: set[int], timeout: float = 30.0) -> None:
    """Every PID we started (nodes and their p2pd daemons) has exited."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes still running: {[(p.pid, p.name()) for p in alive]}"
