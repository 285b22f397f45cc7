"""Daemons that keep their state directory across restarts (topic-queue tests)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon


class Restartable:
    """Daemons that keep their state directory across restarts (the same work directory)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir / "q"
        self.workdir.mkdir()
        self.daemon: Daemon | None = None

    def start(self, config: dict[str, Any] | None = None) -> Daemon:
        self.daemon = Daemon(self.workdir, config or {})
        return self.daemon

    def restart(self, config: dict[str, Any] | None = None, kill: bool = False) -> Daemon:
        assert self.daemon is not None
        if kill:
            self.daemon.kill()
        else:
            assert self.daemon.stop() == 0, self.daemon.log()
        return self.start(config)

    def close(self) -> None:
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                self.daemon.kill()


@contextlib.contextmanager
def small_fs(node: Restartable, options: str) -> Iterator[Path]:
    """The node's state directory on a tmpfs mounted with ``options`` (size, nr_inodes); skips
    where nothing can be mounted. Unmounted afterwards, the daemon killed first."""
    state = node.workdir / "state"
    state.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},mode=0700", "hostbus-test", str(state)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {r.stderr.strip()}")
    try:
        yield state
    finally:
        if node.daemon is not None:
            node.daemon.kill()
        subprocess.run(["umount", "-l", str(state)], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(state)
