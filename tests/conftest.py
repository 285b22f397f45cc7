"""Shared fixtures: a real hostbusd subprocess on a private runtime directory, and clients of it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import hostbus

HOSTBUSD = [sys.executable, "-m", "hostbusd"]

# Hypothesis, for every test that uses it: modest, deterministic (derandomize: a failure
# reproduces on the next run), no example database, no deadline (timing would depend on the
# machine's load). HYPOTHESIS_PROFILE=thorough runs a longer, randomised search.
settings.register_profile(
    "hostbus",
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=5000,
    derandomize=False,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "hostbus"))


def toml_dump(config: dict[str, Any]) -> str:
    """Enough TOML for test configs: scalars, lists of scalars, tables and arrays of tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(v)

    def is_tables(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def table(prefix: str, d: dict[str, Any], header: str | None) -> list[str]:
        lines = [header] if header else []
        lines += [f"{k} = {value(v)}" for k, v in d.items() if not isinstance(v, dict) and not is_tables(v)]
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                lines += table(name + ".", v, f"[{name}]")
            elif is_tables(v):
                for item in v:
                    lines += table(name + ".", item, f"[[{name}]]")
        return lines

    return "\n".join(table("", config, None)) + "\n"


class Daemon:
    """A hostbusd subprocess. ``stop()`` sends SIGTERM and checks it exits 0 and cleans up."""

    def __init__(self, workdir: Path, config: dict[str, Any], extra_args: list[str] | None = None) -> None:
        self.workdir = workdir
        self.runtime_dir = workdir / "run"
        self.state_dir = workdir / "state"
        self.socket = self.runtime_dir / "hostbus.sock"
        self.config_path = workdir / "hostbus.toml"
        if "access" not in config:  # as root the socket is shared, whose default is deny: tests of rules say so
            config = {"access": {"default": "allow"}, **config}
        self.config_path.write_text(toml_dump(config))
        self.log_path = workdir / "hostbusd.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*HOSTBUSD, "--config", str(self.config_path), "--runtime-dir", str(self.runtime_dir),
             "--state-dir", str(self.state_dir), "--log-format", "json", *(extra_args or [])],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        self._wait_ready()

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hostbusd exited with {self.proc.returncode}: {self.log()}")
            if self.socket.exists() and '"event": "started"' in self.log():  # signal handlers are in place
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    try:
                        s.connect(str(self.socket))
                        return
                    except OSError:
                        pass
            time.sleep(0.02)
        raise RuntimeError(f"hostbusd did not start within {timeout} s: {self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def connect(self, name: str | None = None, **kw: Any) -> hostbus.Bus:
        return hostbus.connect(self.socket, name=name, **kw)

    def status(self) -> dict[str, int]:
        """Memory figures of the daemon process from /proc (kB): VmRSS, VmHWM."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
        return out

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths: a Unix socket path must fit in 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="hb-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_daemon(workdir: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def start(config: dict[str, Any] | None = None, extra_args: list[str] | None = None,
              subdir: str = "d") -> Daemon:
        d = workdir / f"{subdir}{len(started)}"
        d.mkdir()
        daemon = Daemon(d, config or {}, extra_args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        with contextlib.suppress(Exception):
            daemon.kill()


@pytest.fixture
def daemon(start_daemon: Any) -> Daemon:
    d: Daemon = start_daemon()
    return d


@pytest.fixture
def bus(daemon: Daemon) -> Iterator[hostbus.Bus]:
    b = daemon.connect("test")
    try:
        yield b
    finally:
        b.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.getuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root to create users and switch uid")
    for item in items:
        if "needs_root" in item.keywords:
            item.add_marker(skip)


def ensure_user(name: str) -> tuple[int, int]:
    """uid and gid of system user ``name``, creating it (as root) if missing."""
    import pwd

    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True)
        pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def ensure_group(name: str) -> int:
    """gid of system group ``name``, creating it (as root) if missing."""
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True)
        return grp.getgrnam(name).gr_gid


def run_as(uid: int, gid: int, fn: Any, timeout: float = 20.0, groups: list[int] | None = None) -> int:
    """Run ``fn()`` in a forked child with ``uid``/``gid`` and supplementary ``groups`` (default
    none); its exit code.

    The child keeps the modules already imported, so it needs no access to this checkout.
    """
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.setgroups(groups or [])
            os.setgid(gid)
            os.setuid(uid)
            fn()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError("child did not finish")


@pytest.fixture
def shared_daemon(start_daemon: Any, workdir: Path) -> Daemon:
    """A daemon whose socket other users can reach (directories 0755, socket 0666)."""
    workdir.chmod(0o755)
    d: Daemon = start_daemon({"socket": {"dir_mode": 0o755, "mode": 0o666}})
    d.workdir.chmod(0o755)
    return d


@pytest.fixture
def node(workdir: Path) -> Iterator[Any]:
    """A daemon that can be restarted (or killed and started again) on the same state directory."""
    from tests.helpers.restart import Restartable

    r = Restartable(workdir)
    try:
        yield r
    finally:
        r.close()
