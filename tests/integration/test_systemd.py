"""systemd integration without PID 1: units verified, socket activation, the notify protocol, reload."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import hostbus
from hostbus import wire
from tests.conftest import HOSTBUSD, toml_dump
from tests.helpers.raw import RawClient
from tests.helpers.subs import drain

ROOT = Path(__file__).parents[2]
ACTIVATE = str(ROOT / "tests" / "helpers" / "activate.py")
HOSTBUSD_BIN = str(Path(sys.executable).parent / "hostbusd")

needs_systemd_tools = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                         reason="systemd-analyze (Debian package systemd) is not installed")


@needs_systemd_tools
@pytest.mark.parametrize("scope", ["system", "user"])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, scope: str) -> None:
    src = ROOT / "systemd" / ("user" if scope == "user" else "")
    units = []
    for name in ("hostbus.socket", "hostbus.service"):
        text = (src / name).read_text()
        assert "/usr/local/bin/hostbusd" in text or name.endswith(".socket")
        unit = tmp_path / name
        # The installed path is /usr/local/bin/hostbusd (make install-systemd); verify checks that
        # ExecStart exists, so point it at this checkout's build of the same program.
        unit.write_text(text.replace("/usr/local/bin/hostbusd", HOSTBUSD_BIN))
        units.append(str(unit))
    env = dict(os.environ)
    cmd = ["systemd-analyze"]
    if scope == "user":
        (tmp_path / "run").mkdir()
        env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
        cmd.append("--user")
    r = subprocess.run([*cmd, "verify", *units], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""  # not even a warning (unknown keys are warnings)


class NotifyListener:
    """A NOTIFY_SOCKET: records every datagram with the time it came."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, after: int = 0, timeout: float = 15) -> int:
        """Index of the first message from ``after`` on that has ``key`` (= ``value``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, (_, fields) in enumerate(self.messages[after:], start=after):
                if key in fields and (value is None or fields[key] == value):
                    return i
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value} after message {after}: {self.messages}")

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def launch(fds: list[int], names: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, ACTIVATE, ",".join(map(str, fds)), names, "--", *HOSTBUSD, *args],
                                pass_fds=fds, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_activation_notify_watchdog_reload_and_stop(workdir: Path) -> None:
    run = workdir / "run"
    run.mkdir(mode=0o755)
    sock_path, fifo_path = run / "hostbus.sock", run / "publish.fifo"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen()
    os.mkfifo(fifo_path, 0o620)
    fifo_fd = os.open(fifo_path, os.O_RDWR | os.O_NONBLOCK)
    config = workdir / "hostbus.toml"
    config.write_text("")
    notify = NotifyListener(workdir / "notify.sock")
    # A client that connects and says HELLO before the daemon even runs: the kernel queues it.
    early = RawClient(sock_path, hello=False)
    early.send(wire.encode_hello("early", "test", wire.PROTOCOL_VERSION))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    proc = launch([listener.fileno(), fifo_fd], "hostbus:hostbus",
                  ["--config", str(config), "--runtime-dir", str(run), "--state-dir", str(workdir / "state"),
                   "--log-format", "json"], env, workdir / "log")
    listener.close()
    os.close(fifo_fd)
    try:
        ready = notify.wait_for("READY", "1")
        assert "STATUS" in notify.messages[ready][1]
        assert early.read_until(wire.FrameType.WELCOME) is not None  # served once it was ready
        early.close()

        # Watchdog pings from the event loop at half of WATCHDOG_USEC (1 s).
        first = notify.wait_for("WATCHDOG", "1", after=ready)
        time.sleep(2.2)
        pings = [t for t, f in notify.messages[first:] if f.get("WATCHDOG") == "1"]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 4 and all(0.3 < g < 0.8 for g in gaps), gaps
        assert all("connections" in f["STATUS"] for _, f in notify.messages[first:] if "WATCHDOG" in f)

        with hostbus.connect(sock_path) as bus:
            sub = bus.subscribe("act.>")
            with open(fifo_path, "wb") as w:  # the FIFO systemd passed in
                w.write(b"act.fifo through the passed FIFO\n")
            assert [m.data for m in drain(sub)] == [b"through the passed FIFO"]

            # A broken file: RELOADING, then READY again with a STATUS that says why; still serving.
            config.write_text("[limits]\nmax_connections = -1\n")
            mark = len(notify.messages)
            proc.send_signal(signal.SIGHUP)
            reloading = notify.wait_for("RELOADING", "1", after=mark)
            back = notify.wait_for("READY", "1", after=reloading)
            assert "reload failed, running configuration kept" in notify.messages[back][1]["STATUS"]
            assert "limits.max_connections = -1" in notify.messages[back][1]["STATUS"]
            bus.flush()

            # A good file: a limit changes for existing connections, a FIFO is added.
            config.write_text(toml_dump({"limits": {"max_subscriptions_per_connection": 2},
                                         "fifo": {"ingress": [{"path": "extra.fifo", "format": "json"}]}}))
            mark = len(notify.messages)
            proc.send_signal(signal.SIGHUP)
            notify.wait_for("READY", "1", after=notify.wait_for("RELOADING", "1", after=mark))
            bus.subscribe("act.two")
            with pytest.raises(hostbus.LimitExceededError):
                bus.subscribe("act.three")
            assert (run / "extra.fifo").is_fifo()
            with open(run / "extra.fifo", "wb") as w:
                w.write(b'{"topic": "act.json", "data": "added live"}\n')
            assert [m.data for m in drain(sub)] == [b"added live"]

            # Removed again: the daemon's own FIFO goes away.
            config.write_text("")
            mark = len(notify.messages)
            proc.send_signal(signal.SIGHUP)
            notify.wait_for("READY", "1", after=notify.wait_for("RELOADING", "1", after=mark))
            assert not (run / "extra.fifo").exists()

        mark = len(notify.messages)
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1", after=mark)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    # What systemd owns stays: the socket and the FIFO it passed in.
    assert sock_path.exists() and fifo_path.is_fifo()
    events = [json.loads(line)["event"] for line in (workdir / "log").read_text().splitlines()]
    assert events[0] == "started" and events[-1] == "stopped"
    assert "reload_failed" in events and events.count("reloaded") == 2


@needs_systemd_tools
def test_started_by_systemd_socket_activate(workdir: Path) -> None:
    run = workdir / "run"
    run.mkdir(mode=0o700)
    sock_path, fifo_path = run / "hostbus.sock", run / "publish.fifo"
    os.mkfifo(fifo_path, 0o600)
    fifo_fd = os.open(fifo_path, os.O_RDWR | os.O_NONBLOCK)
    log = (workdir / "log").open("wb")
    # systemd-socket-activate passes descriptors it was itself given (here the FIFO, as a service
    # manager would) on to the daemon, followed by its own listening socket.
    proc = subprocess.Popen([sys.executable, ACTIVATE, str(fifo_fd), "publish", "--",
                             "systemd-socket-activate", "-l", str(sock_path), "--fdname=publish:hostbus",
                             HOSTBUSD_BIN, "--runtime-dir", str(run), "--state-dir", str(workdir / "state"),
                             "--log-format", "json"], pass_fds=[fifo_fd], stdout=log, stderr=subprocess.STDOUT)
    os.close(fifo_fd)
    try:
        # systemd-socket-activate binds, then listens: a connect in between is refused, so retry.
        deadline = time.monotonic() + 10
        while True:
            try:
                # This connection makes systemd-socket-activate start the daemon, which then serves it.
                bus = hostbus.connect(sock_path, timeout=30)
                break
            except hostbus.ConnectionLostError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        with bus:
            sub = bus.subscribe("sa.>")
            bus.publish("sa.sock", b"activated")
            assert sub.next(timeout=10).data == b"activated"
            with open(fifo_path, "wb") as w:
                w.write(b"sa.fifo passed through\n")
            assert sub.next(timeout=10).data == b"passed through"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert sock_path.exists() and fifo_path.is_fifo()  # handed to us: not ours to unlink
    lines = (workdir / "log").read_text().splitlines()  # systemd-socket-activate's own lines first
    started = json.loads(next(line for line in lines if line.startswith("{")))
    assert started["event"] == "started" and started["socket_activated"] is True


@pytest.mark.parametrize("case", ["socket_elsewhere", "stray_fifo"])
def test_mismatched_descriptors_are_refused(workdir: Path, case: str) -> None:
    run = workdir / "run"
    run.mkdir(mode=0o700)
    if case == "socket_elsewhere":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(workdir / "other.sock"))
        s.listen()
        fd, expected = s.fileno(), f"is the socket '{workdir / 'other.sock'}', but the configured socket is"
    else:
        os.mkfifo(workdir / "stray.fifo")
        fd = os.open(workdir / "stray.fifo", os.O_RDWR | os.O_NONBLOCK)
        expected = "1 passed FIFO(s) match no configured FIFO"
    proc = launch([fd], "hostbus", ["--runtime-dir", str(run), "--state-dir", str(workdir / "state"),
                                    "--log-format", "json"], dict(os.environ), workdir / "log")
    assert proc.wait(20) == 1
    assert expected in (workdir / "log").read_text()
    assert sorted(os.listdir(run)) == []  # nothing left behind


def test_journal_format_when_stderr_is_the_journal(workdir: Path) -> None:
    log_path = workdir / "log"
    with log_path.open("wb") as out:
        st = os.fstat(out.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen([*HOSTBUSD, "--runtime-dir", str(workdir / "run"), "--state-dir",
                                 str(workdir / "state")], stdout=out, stderr=out, env=env)
        for _ in range(300):
            if (workdir / "run" / "hostbus.sock").exists():
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    lines = log_path.read_text().splitlines()
    assert lines and all(line.startswith("<6>{") for line in lines), lines
    assert json.loads(lines[0][3:])["event"] == "started"


def test_a_passed_fifo_stays_systemds_through_reloads(workdir: Path) -> None:
    # Regression: a reload that changed a passed FIFO's settings chmodded it and removed it at exit.
    run = workdir / "run"
    run.mkdir(mode=0o755)
    fifo_path = run / "publish.fifo"
    os.mkfifo(fifo_path)
    fifo_path.chmod(0o660)
    held = os.open(fifo_path, os.O_RDWR | os.O_NONBLOCK)  # what systemd keeps
    config = workdir / "c.toml"
    config.write_text(toml_dump({"access": {"default": "allow"}, "fifo": {"default_ingress": False,
                                          "ingress": [{"path": "publish.fifo", "format": "lines"}]}}))
    proc = launch([held], "hostbus", ["--config", str(config), "--runtime-dir", str(run), "--state-dir",
                                      str(workdir / "st"), "--log-format", "json"], dict(os.environ), workdir / "log")
    try:
        for _ in range(300):
            if (run / "hostbus.sock").exists():
                break
            time.sleep(0.02)
        config.write_text(toml_dump({"access": {"default": "allow"}, "fifo": {"default_ingress": False,
                                              "ingress": [{"path": "publish.fifo", "format": "json"}]}}))
        proc.send_signal(signal.SIGHUP)
        for _ in range(300):
            if '"reloaded"' in (workdir / "log").read_text():
                break
            time.sleep(0.02)
        assert fifo_path.stat().st_mode & 0o777 == 0o660
        with hostbus.connect(run / "hostbus.sock") as bus:
            sub = bus.subscribe("j")
            with open(fifo_path, "wb") as w:
                w.write(b'{"topic": "j", "data": "json now"}\n')
            assert [m.data for m in drain(sub)] == [b"json now"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(held)
    assert fifo_path.is_fifo() and fifo_path.stat().st_mode & 0o777 == 0o660


def test_a_passed_fifo_cannot_be_a_sink(workdir: Path) -> None:
    run = workdir / "run"
    run.mkdir(mode=0o700)
    os.mkfifo(run / "events.fifo")
    held = os.open(run / "events.fifo", os.O_RDWR | os.O_NONBLOCK)
    config = workdir / "c.toml"
    config.write_text(toml_dump({"fifo": {"sink": [{"path": "events.fifo", "subjects": ["ev.>"]}]}}))
    proc = launch([held], "hostbus", ["--config", str(config), "--runtime-dir", str(run), "--state-dir",
                                      str(workdir / "st"), "--log-format", "json"], dict(os.environ), workdir / "log")
    assert proc.wait(20) == 1
    os.close(held)
    assert "it cannot be a sink" in (workdir / "log").read_text()
    assert sorted(os.listdir(run)) == ["events.fifo"]  # systemd's file stays, nothing else was left
