"""Faults: clients and the broker killed mid-stream, file descriptors exhausted."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import hostbus
from tests.conftest import HOSTBUSD, Daemon

CHILD_SUBSCRIBER = """
import sys, hostbus
bus = hostbus.connect(sys.argv[1])
sub = bus.subscribe("stream")
print("subscribed", flush=True)
for msg in sub:
    pass
"""


def test_subscriber_killed_mid_stream(daemon: Daemon) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD_SUBSCRIBER, str(daemon.socket)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "subscribed"
    with daemon.connect("watch") as watch, daemon.connect("pub") as pub:
        healthy = watch.subscribe("stream", pending_limit=1_000_000)
        for i in range(20_000):
            pub.publish("stream", b"x" * 100)
            if i == 5_000:
                child.send_signal(signal.SIGKILL)
        pub.flush(timeout=30)
        child.wait(10)
        got = 0
        while got < 20_000:
            healthy.next(timeout=10)
            got += 1
        for _ in range(100):
            if watch.stats()["connections"] == 2:
                break
            time.sleep(0.05)
        st = watch.stats()
        assert st["connections"] == 2  # the killed one was reclaimed
        assert st["subscriptions"] == 1


def test_broker_killed_mid_stream_then_restarted(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon()
    bus = d.connect()
    sub = bus.subscribe("x")
    errors: list[BaseException] = []

    def publish_forever() -> None:
        try:
            while True:
                bus.publish("x", b"y" * 64)
        except hostbus.HostbusError as exc:
            errors.append(exc)

    t = threading.Thread(target=publish_forever)
    t.start()
    sub.next(timeout=10)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    t.join(20)
    assert errors and isinstance(errors[0], hostbus.ConnectionLostError)
    with pytest.raises(hostbus.ConnectionLostError):
        while True:
            sub.next(timeout=10)
    bus.close()
    assert d.socket.exists()  # kill -9 leaves the socket file ...
    again = Daemon(d.workdir, {})  # ... and the next start replaces it
    try:
        with again.connect() as b2:
            b2.flush()
        assert again.stop() == 0
        assert not again.socket.exists()
    finally:
        again.kill()


def test_file_descriptor_exhaustion_does_not_kill_the_broker(workdir: Path) -> None:
    log = (workdir / "log").open("wb")
    proc = subprocess.Popen(["prlimit", "--nofile=40", "--", *HOSTBUSD, "--runtime-dir", str(workdir / "run"),
                             "--state-dir", str(workdir / "state"), "--log-format", "json"],
                            stdout=log, stderr=subprocess.STDOUT)
    sock_path = workdir / "run" / "hostbus.sock"
    try:
        for _ in range(500):
            if sock_path.exists():
                break
            time.sleep(0.02)
        held = []
        for _ in range(80):  # twice the daemon's descriptors
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock_path))
            held.append(s)
        time.sleep(0.5)
        assert proc.poll() is None
        for s in held:
            s.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                with hostbus.connect(sock_path, timeout=2) as bus:
                    bus.flush()
                    break
            except hostbus.HostbusError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        log.close()
    text = (workdir / "log").read_text()
    assert "fd_limit_low" in text  # the daemon said its limit is below max_connections
    assert not sock_path.exists()
    assert not (workdir / "run").exists()
