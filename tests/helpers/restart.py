"""Daemons that keep their state directory across restarts (topic-queue tests)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

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
