"""Regressions for defects found in review of the FIFO and reload code (each test names its bug)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hostbus import wire
from tests.conftest import HOSTBUSD, Daemon, toml_dump
from tests.helpers.subs import drain
from tests.integration.test_fifo import fifo_stats, write


def reload(d: Daemon, config: dict[str, object], expect: str) -> None:
    d.config_path.write_text(toml_dump(config))
    mark = d.log().count(f'"event": "{expect}"')
    d.proc.send_signal(signal.SIGHUP)
    for _ in range(300):
        if d.log().count(f'"event": "{expect}"') > mark:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {expect} after SIGHUP: {d.log()}")


def test_json_data_with_a_lone_surrogate_does_not_kill_the_daemon(daemon: Daemon) -> None:
    fifo = daemon.runtime_dir / "publish.fifo"
    with daemon.connect() as bus:
        sub = bus.subscribe("a.>")
        write(fifo, b'{"topic": "a.b", "data": "\\ud800"}\na.ok fine\n')
        assert [m.data for m in drain(sub)] == [b"fine"]
        assert fifo_stats(bus, fifo)["errors"] == {"invalid_json": 1}
    assert daemon.proc.poll() is None


def test_reloads_that_fail_keep_the_daemon_and_its_configuration(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"fifo": {"ingress": [{"path": "alerts.fifo"}]}})
    d.config_path.write_bytes(b"# caf\xe9\n[limits]\nmax_connections = 5\n")  # not UTF-8
    mark = d.log().count("reload_failed")
    d.proc.send_signal(signal.SIGHUP)
    for _ in range(300):
        if d.log().count("reload_failed") > mark:
            break
        time.sleep(0.02)
    assert "is not UTF-8 text" in d.log()
    reload(d, {"fifo": {"ingress": [{"path": "alerts.fifo", "group": "no-such-group"}]}}, "reload_failed")
    reload(d, {"fifo": {"sink": [{"path": "s.fifo", "subjects": ["_INBOX.>"]}]}}, "reload_failed")
    assert "names reply inboxes" in d.log()
    assert not (d.runtime_dir / "s.fifo").exists()  # nothing of a failed reload stays
    with d.connect() as bus:
        bus.flush()
        sub = bus.subscribe("x")
        write(d.runtime_dir / "alerts.fifo", b"x still-read\n")  # the running FIFO still works
        assert [m.data for m in drain(sub)] == [b"still-read"]
    assert d.proc.poll() is None


def test_broken_frames_after_the_path_is_gone_do_not_kill_the_daemon(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"fifo": {"ingress": [{"path": "frames.fifo", "format": "frames"}]}})
    path = d.runtime_dir / "frames.fifo"
    w = os.open(path, os.O_WRONLY)
    try:
        path.unlink()
        os.write(w, b"\xff" * 16)
        time.sleep(0.3)
        os.write(w, wire.encode_pub(b"f.after", b"ok"))
        with d.connect() as bus:
            time.sleep(0.3)
            assert bus.stats()["topics"] == {"f.after": 1}
    finally:
        os.close(w)
    assert d.stop() == 0
    assert '"event": "stopped"' in d.log_path.read_text()


def test_a_sink_and_an_ingress_on_the_same_file_are_refused(workdir: Path) -> None:
    cfg = workdir / "c.toml"
    cfg.write_text(toml_dump({"fifo": {"ingress": [{"path": "loop.fifo"}],
                                       "sink": [{"path": "../run/loop.fifo", "subjects": [">"]}]}}))
    r = subprocess.run([*HOSTBUSD, "--config", str(cfg), "--runtime-dir", str(workdir / "run"), "--state-dir",
                        str(workdir / "st"), "--log-format", "json"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert "is used twice in the configuration" in r.stderr


def test_a_slow_writer_streaming_a_long_line_is_not_cut(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"fifo": {"partial_line_timeout": 0.5}})
    line = b"logs.app " + b"word " * 300 + b"\n"
    with d.connect() as bus:
        sub = bus.subscribe("logs.>")
        w = os.open(d.runtime_dir / "publish.fifo", os.O_WRONLY)
        try:
            for i in range(0, len(line), 100):  # 16 pieces, 0.1 s apart: 1.6 s for one line
                os.write(w, line[i:i + 100])
                time.sleep(0.1)
        finally:
            os.close(w)
        got = drain(sub, 1)
        assert [(m.topic, len(m.data)) for m in got] == [("logs.app", len(line) - 10)]
        assert fifo_stats(bus, d.runtime_dir / "publish.fifo")["errors"] == {}


def test_a_mode_change_by_reload_cuts_off_writers_of_the_old_fifo(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"fifo": {"ingress": [{"path": "team.fifo", "mode": 0o622}]}})
    path = d.runtime_dir / "team.fifo"
    w = os.open(path, os.O_WRONLY)
    try:
        reload(d, {"fifo": {"ingress": [{"path": "team.fifo", "mode": 0o600}]}}, "reloaded")
        assert path.stat().st_mode & 0o777 == 0o600
        with pytest.raises(BrokenPipeError):  # the old pipe has no reader any more
            os.write(w, b"x from the old descriptor\n")
    finally:
        os.close(w)


def test_sink_subjects_that_overlap_write_each_message_once(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"fifo": {"sink": [{"path": "s.fifo", "subjects": ["sensors.>", "sensors.*.temp"]}]}})
    r = os.open(d.runtime_dir / "s.fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with d.connect() as bus:
            bus.publish("sensors.kitchen.temp", b"21.5")
            bus.flush()
            time.sleep(0.2)
            assert os.read(r, 4096) == b"sensors.kitchen.temp 21.5\n"
            st = bus.stats()
        assert st["fifos"][str(d.runtime_dir / "s.fifo")]["messages"] == 1
        assert st["messages"]["out"] >= 1  # sinks count in the totals
    finally:
        os.close(r)


def test_the_next_sink_reader_does_not_get_the_last_ones_leftovers(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"fifo": {"sink": [{"path": "s.fifo", "subjects": ["ev.>"]}]}})
    path = d.runtime_dir / "s.fifo"
    with d.connect() as bus:
        a = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        for i in range(3):
            bus.publish("ev.x", f"for reader A {i}")
        bus.flush()
        time.sleep(0.2)
        assert os.read(a, 10) == b"ev.x for r"
        os.close(a)  # leaves the rest unread
        time.sleep(0.6)  # the broker notices within its housekeeping interval
        b = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            bus.publish("ev.x", b"for reader B")
            bus.flush()
            time.sleep(0.2)
            assert os.read(b, 4096) == b"ev.x for reader B\n"
        finally:
            os.close(b)


def test_a_sink_never_writes_through_a_symlink(start_daemon: Callable[..., Daemon], workdir: Path) -> None:
    d = start_daemon({"fifo": {"sink": [{"path": "s.fifo", "subjects": ["ev.>"]}]}})
    victim = workdir / "victim"
    victim.write_text("important=1\n")
    (d.runtime_dir / "s.fifo").unlink()
    (d.runtime_dir / "s.fifo").symlink_to(victim)
    with d.connect() as bus:
        bus.publish("ev.x", b"hello")
        bus.flush()
        time.sleep(0.2)
        assert fifo_stats(bus, d.runtime_dir / "s.fifo")["dropped"] == {"no_reader": 1}
    assert victim.read_text() == "important=1\n"
    (d.runtime_dir / "s.fifo").unlink()


def test_sighup_while_draining_is_ignored(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"shutdown": {"drain_timeout": 2}})
    from tests.integration.test_flow_control import stalled_subscriber

    stalled = stalled_subscriber(d, "t", "drop-oldest")
    with d.connect() as pub:
        for _ in range(2000):
            pub.publish("t", b"\0" * 1024)
        pub.flush()
    d.config_path.write_text(toml_dump({"fifo": {"ingress": [{"path": "late.fifo"}]}}))
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    d.proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    assert not (d.runtime_dir / "late.fifo").exists()
    assert d.proc.wait(20) == 0
    stalled.close()
    assert "reloaded" not in d.log()


def test_reload_applies_the_log_settings(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({})
    reload(d, {"log": {"level": "error"}}, "reloaded")
    write(d.runtime_dir / "publish.fifo", b"nospace\n")
    time.sleep(0.3)
    assert "fifo_bad_input" not in d.log()  # a warning, below the new level


def test_a_hand_made_fifo_outside_the_runtime_dir_is_not_removed(start_daemon: Callable[..., Daemon],
                                                                   workdir: Path) -> None:
    mine = workdir / "mine.fifo"
    os.mkfifo(mine, 0o600)
    d = start_daemon({"fifo": {"ingress": [{"path": str(mine)}]}})
    assert d.stop() == 0
    assert mine.is_fifo()


def test_frames_fifo_applies_the_socket_checks(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"fifo": {"ingress": [{"path": "frames.fifo", "format": "frames"}]}})
    path = d.runtime_dir / "frames.fifo"
    with d.connect() as bus:
        sub = bus.subscribe("t.>")
        big_headers = wire.frames.U16.pack(2) + b"".join(
            wire.frames.HEADER_ITEM.pack(1, 35_000) + k + b"v" * 35_000 for k in (b"a", b"b"))
        write(path, wire.encode_pub(b"t.x", b"1", reply=b"$SYS.evil") + wire.encode_pub(b"t.y", b"2", big_headers)
              + wire.encode_pub(b"t.ok", b"3"))
        assert [(m.topic, m.data) for m in drain(sub)] == [("t.ok", b"3")]
        assert json.dumps(fifo_stats(bus, path)["errors"]) == '{"invalid_topic": 1, "malformed": 1}'
