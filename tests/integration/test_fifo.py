"""Named pipes against a real daemon: shell writers, formats, bad input, access, sinks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

import hostbus
from hostbus import wire
from tests.conftest import HOSTBUSD, Daemon, ensure_user, run_as
from tests.helpers.subs import drain

NO_ID = 0xFFFFFFFF


def write(path: Path, data: bytes) -> None:
    """One writer process's worth: open, write, close (what `echo ... > fifo` does)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def fifo_stats(bus: hostbus.Bus, path: Path) -> dict[str, object]:
    return bus.stats()["fifos"][str(path)]  # type: ignore[no-any-return]


def test_default_publish_fifo_with_echo(daemon: Daemon, bus: hostbus.Bus) -> None:
    fifo = daemon.runtime_dir / "publish.fifo"
    assert fifo.is_fifo()
    assert (fifo.stat().st_mode & 0o777) == 0o600
    sub = bus.subscribe("alerts.>")
    subprocess.run(["sh", "-c", f'echo "alerts.disk full" > {fifo}'], check=True)
    msg = sub.next(timeout=5)
    assert (msg.topic, msg.data) == ("alerts.disk", b"full")
    assert msg.sender == hostbus.Sender(NO_ID, NO_ID, 0, f"fifo:{fifo}")


def test_eight_concurrent_shell_writers_arrive_complete_and_unmangled(daemon: Daemon, bus: hostbus.Bus) -> None:
    fifo = daemon.runtime_dir / "publish.fifo"
    sub = bus.subscribe("load.>", pending_limit=100_000)
    writers = [subprocess.Popen(["sh", "-c", f'i=1; while [ $i -le 5000 ]; do echo "load.w{k} {k}:$i:'
                                 f'abcdefghijklmnopqrstuvwxyz0123456789"; i=$((i+1)); done > {fifo}'])
               for k in range(8)]
    for w in writers:
        assert w.wait(60) == 0
    seen: dict[int, list[int]] = defaultdict(list)
    for _ in range(40_000):
        msg = sub.next(timeout=10)
        k, i, tail = msg.data.decode().split(":")
        assert msg.topic == f"load.w{k}" and tail == "abcdefghijklmnopqrstuvwxyz0123456789"
        seen[int(k)].append(int(i))
    assert {k: v for k, v in seen.items()} == {k: list(range(1, 5001)) for k in range(8)}  # complete, in order
    assert fifo_stats(bus, fifo)["errors"] == {}


@pytest.fixture
def formats(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon({"fifo": {
        "partial_line_timeout": 0.3, "max_line_bytes": 1024,
        "ingress": [{"path": "lines.fifo", "format": "lines"}, {"path": "json.fifo", "format": "json"},
                    {"path": "frames.fifo", "format": "frames"},
                    {"path": "alerts.fifo", "format": "lines", "topic_prefix": "alerts."}]}})


def test_each_format(formats: Daemon) -> None:
    run = formats.runtime_dir
    with formats.connect() as bus:
        sub = bus.subscribe("f.>")
        write(run / "lines.fifo", b"f.lines a b  c\r\nf.lines-empty \n")
        write(run / "json.fifo", b'{"topic": "f.json", "data": "text", "headers": {"k": "v"}}\n'
                                 b'{"topic": "f.json", "data": {"n": [1, 2]}}\n{"topic": "f.json", "data": 7}\n')
        write(run / "publish.fifo", b'f.auto plain\n{"topic": "f.auto", "data": "from json"}\n')
        write(run / "frames.fifo", wire.encode_pub(b"f.frames", b"\x00binary\xff", wire.encode_headers({"a": "b"}))
              + wire.encode_pub(b"f.frames", b"second", flags=wire.PUB_RETAIN))
        got = [(m.topic, m.data, m.headers) for m in drain(sub)]
    order = {t: [g for g in got if g[0] == t] for t in ("f.lines", "f.lines-empty", "f.json", "f.auto", "f.frames")}
    assert order["f.lines"] == [("f.lines", b"a b  c", {})]
    assert order["f.lines-empty"] == [("f.lines-empty", b"", {})]
    assert order["f.json"] == [("f.json", b"text", {"k": "v"}), ("f.json", b'{"n":[1,2]}', {}), ("f.json", b"7", {})]
    assert order["f.auto"] == [("f.auto", b"plain", {}), ("f.auto", b"from json", {})]
    assert order["f.frames"] == [("f.frames", b"\x00binary\xff", {"a": "b"}), ("f.frames", b"second", {})]
    assert len(got) == 9


BAD_LINES = {
    # kind counted: bytes written (then a good line must still arrive)
    "malformed": b"no-space-here\n",
    "invalid_topic": b"a..b payload\n",
    "too_long": b"f.long " + b"x" * 5000 + b"\n",
    "binary": b"\x00\xff\xfe\x01 garbage\x00\n",
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_lines_are_skipped_counted_and_the_next_goes_through(formats: Daemon, kind: str) -> None:
    fifo = formats.runtime_dir / "lines.fifo"
    with formats.connect() as bus:
        sub = bus.subscribe("f.>")
        write(fifo, BAD_LINES[kind] + b"f.good after\n")
        assert [(m.topic, m.data) for m in drain(sub)] == [("f.good", b"after")]
        errors = fifo_stats(bus, fifo)["errors"]
    expected = "invalid_topic" if kind == "binary" else kind
    assert errors == {expected: 1}
    assert '"event": "fifo_bad_input"' in formats.log()


def test_invalid_json_and_denied_prefix(formats: Daemon) -> None:
    run = formats.runtime_dir
    with formats.connect() as bus:
        sub = bus.subscribe(">")
        write(run / "json.fifo", b'{"topic": \n[1, 2]\n{"topic": "f.x", "headers": {"k": 1}}\n{"topic": "f.ok"}\n')
        write(run / "alerts.fifo", b"other.topic not allowed\nalerts.disk full\n")
        got = [(m.topic, m.data) for m in drain(sub)]
        assert sorted(got) == [("alerts.disk", b"full"), ("f.ok", b"")]  # two FIFOs: no order between them
        assert fifo_stats(bus, run / "json.fifo")["errors"] == {"invalid_json": 3}
        assert fifo_stats(bus, run / "alerts.fifo")["errors"] == {"denied_topic": 1}


def test_a_writer_killed_mid_line_does_not_mangle_the_next(formats: Daemon) -> None:
    fifo = formats.runtime_dir / "lines.fifo"
    with formats.connect() as bus:
        sub = bus.subscribe("f.>")
        writer = subprocess.Popen(["sh", "-c", f"printf 'f.partial never-finish' > {fifo}; kill -9 $$"])
        writer.wait(10)
        time.sleep(0.8)  # past fifo.partial_line_timeout (0.3 s): the fragment is dropped
        subprocess.run(["sh", "-c", f"echo 'f.next intact' > {fifo}"], check=True)
        assert [(m.topic, m.data) for m in drain(sub)] == [("f.next", b"intact")]
        assert fifo_stats(bus, fifo)["errors"] == {"partial": 1}


def test_broken_frame_stream_is_reopened(formats: Daemon) -> None:
    fifo = formats.runtime_dir / "frames.fifo"
    with formats.connect() as bus:
        sub = bus.subscribe("f.>")
        write(fifo, wire.encode_pub(b"f.one", b"1") + b"\xff" * 40)
        time.sleep(0.3)
        write(fifo, wire.encode_pub(b"f.two", b"2"))
        assert [(m.topic, m.data) for m in drain(sub)] == [("f.one", b"1"), ("f.two", b"2")]
        assert fifo_stats(bus, fifo)["errors"] == {"broken_stream": 1}


@pytest.mark.needs_root
def test_the_fifo_mode_and_group_decide_who_may_write(start_daemon: Callable[..., Daemon], workdir: Path) -> None:
    uid, gid = ensure_user("hostbus-test")
    group = subprocess.run(["id", "-gn", "hostbus-test"], capture_output=True, text=True, check=True).stdout.strip()
    workdir.chmod(0o755)
    d = start_daemon({"socket": {"dir_mode": 0o755},
                      "fifo": {"ingress": [{"path": "team.fifo", "mode": 0o620, "group": group}]}})
    d.workdir.chmod(0o755)
    team, default = d.runtime_dir / "team.fifo", d.runtime_dir / "publish.fifo"
    assert team.stat().st_gid == gid and (team.stat().st_mode & 0o777) == 0o620

    def try_write(path: Path) -> None:
        write(path, b"perm.test from-other-user\n")

    with d.connect() as bus:
        sub = bus.subscribe("perm.>")
        assert run_as(uid, gid, lambda: try_write(default)) == 1  # 0600 root-owned: PermissionError
        assert run_as(uid, gid, lambda: try_write(team)) == 0  # the group may write
        assert [m.sender.origin for m in drain(sub)] == [f"fifo:{team}"]


def test_existing_fifo_is_reused_and_a_non_fifo_is_refused(workdir: Path) -> None:
    run = workdir / "run"
    run.mkdir(mode=0o700)
    os.mkfifo(run / "publish.fifo", 0o644)
    d = Daemon(workdir, {})
    try:
        assert (d.runtime_dir / "publish.fifo").stat().st_mode & 0o777 == 0o600  # mode re-applied
        assert d.stop() == 0
        assert not (d.runtime_dir / "publish.fifo").exists()
    finally:
        d.kill()
    assert sorted(os.listdir(run)) == []  # it did not create the directory, so it keeps it, empty
    (run / "publish.fifo").write_text("a regular file left by a script")
    r = subprocess.run([*HOSTBUSD, "--runtime-dir", str(run), "--state-dir", str(workdir / "st"), "--log-format",
                        "json"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert "publish.fifo exists and is not a FIFO" in r.stderr
    assert not (run / "hostbus.sock").exists()  # nothing left behind by the refused start


@pytest.fixture
def sinks(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon({"fifo": {"sink": [
        {"path": "events.fifo", "subjects": ["ev.>"]},
        {"path": "events.json", "subjects": ["ev.>", "other"], "format": "json", "max_queued_msgs": 10}]}})


def test_sink_feeds_a_while_read_loop(sinks: Daemon) -> None:
    sink = sinks.runtime_dir / "events.fifo"
    reader = subprocess.Popen(["sh", "-c", f'while read -r line; do printf "got: %s\\n" "$line"; '
                               f'case "$line" in ev.b*) break;; esac; done < {sink}'],
                              stdout=subprocess.PIPE, text=True)
    with sinks.connect() as bus:
        for _ in range(100):  # the reader's open() completes once the broker opens its end
            bus.publish("ev.probe", b"")
            bus.flush()
            if fifo_stats(bus, sink)["messages"]:
                break
            time.sleep(0.05)
        bus.publish("ev.a", b"line one")
        bus.publish("ev.b", b"two\nlines")
        out, _ = reader.communicate(timeout=10)
    lines = out.splitlines()
    assert lines[-2:] == ["got: ev.a line one", "got: ev.b two\\nlines"]


def test_sink_json_and_drops_without_a_reader(sinks: Daemon) -> None:
    sink = sinks.runtime_dir / "events.json"
    with sinks.connect() as bus:
        for i in range(5):
            bus.publish("ev.lost", str(i))
        bus.flush()
        time.sleep(0.1)
        assert fifo_stats(bus, sink)["dropped"] == {"no_reader": 5}
        fd = os.open(sink, os.O_RDONLY | os.O_NONBLOCK)  # a reader attaches: it gets what comes next
        try:
            bus.publish("other", b"hello", headers={"h": "1"})
            bus.flush()
            time.sleep(0.2)
            line = os.read(fd, 65536).decode()
        finally:
            os.close(fd)
    obj = json.loads(line)
    assert obj["topic"] == "other" and obj["data"] == "hello" and obj["headers"] == {"h": "1"}
    assert obj["sender"]["pid"] > 0 and obj["sender"]["uid"] == os.getuid()


def test_a_reader_that_stops_reading_never_blocks_the_broker(sinks: Daemon) -> None:
    sink = sinks.runtime_dir / "events.json"  # max_queued_msgs = 10
    fd = os.open(sink, os.O_RDONLY | os.O_NONBLOCK)  # a reader that does not read for now
    try:
        with sinks.connect() as bus:
            sub = bus.subscribe("ev.>", pending_limit=100_000)
            big = b"y" * 1000
            for _ in range(5000):  # ~5 MB: far more than the pipe holds
                bus.publish("ev.big", big)
            bus.flush(timeout=30)
            assert len(drain(sub, timeout=1)) == 5000  # everyone else is served meanwhile
            # Now read: the sink writes what it kept (never a torn line); the rest was dropped.
            data = b""
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < 0.5:
                try:
                    chunk = os.read(fd, 1 << 20)
                except BlockingIOError:
                    time.sleep(0.02)
                    continue
                data += chunk
                quiet_since = time.monotonic()
            st = fifo_stats(bus, sink)
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    assert lines[-1] == b""  # ends on a line boundary
    assert all(json.loads(line)["data"] == "y" * 1000 for line in lines[:-1])  # no line torn
    dropped = st["dropped"]
    assert isinstance(dropped, dict) and set(dropped) <= {"pipe_full", "queue_full"} and sum(dropped.values()) > 0
    assert len(lines) - 1 == st["messages"]
    assert st["messages"] + sum(dropped.values()) == 5000  # every message written or counted as dropped


def test_fifos_are_removed_at_exit(sinks: Daemon) -> None:
    names = sorted(p.name for p in sinks.runtime_dir.iterdir())
    assert names == ["events.fifo", "events.json", "hostbus.sock", "publish.fifo"]
    sinks.proc.send_signal(signal.SIGTERM)
    assert sinks.proc.wait(20) == 0
    assert not sinks.runtime_dir.exists()


def test_config_refuses_bad_sink_patterns(workdir: Path) -> None:
    cfg = workdir / "c.toml"
    cfg.write_text('[[fifo.sink]]\npath = "x.fifo"\nsubjects = ["a..b"]\n')
    r = subprocess.run([*HOSTBUSD, "--config", str(cfg), "--check-config"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "fifo.sink.0.subjects" in r.stderr and "empty token" in r.stderr


def test_a_long_lived_pipeline_writer(daemon: Daemon, bus: hostbus.Bus) -> None:
    # journalctl -f | sed ... > fifo, in miniature: one long-lived writer, many lines.
    fifo = daemon.runtime_dir / "publish.fifo"
    sub = bus.subscribe("log.>", pending_limit=10_000)
    t = threading.Thread(target=lambda: subprocess.run(
        ["sh", "-c", f"seq 1 2000 | sed 's/^/log.line /' > {fifo}"], check=True))
    t.start()
    t.join(30)
    assert [int(m.data) for m in drain(sub, 1)] == list(range(1, 2001))


def test_stats_command_shows_fifo_counters(formats: Daemon) -> None:
    from tests.integration.test_cli import cli

    write(formats.runtime_dir / "lines.fifo", b"nospace\nf.ok 1\n")
    time.sleep(0.2)
    out = cli(formats, "stats").stdout
    assert f"fifo ingress {formats.runtime_dir / 'lines.fifo'}: 1 messages (13 bytes), skipped: malformed 1" in out


def test_config_keeps_fifo_lines_within_the_frame_limit(workdir: Path) -> None:
    cfg = workdir / "c.toml"
    cfg.write_text("[fifo]\nmax_line_bytes = 67108864\n")
    r = subprocess.run([*HOSTBUSD, "--config", str(cfg), "--check-config"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "fifo.max_line_bytes (67108864) exceeds limits.max_frame_bytes (8388608)" in r.stderr


def test_bad_lines_are_logged_at_most_once_per_interval(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"log": {"peer_error_interval": 60}})
    fifo = d.runtime_dir / "publish.fifo"
    with d.connect() as bus:
        sub = bus.subscribe("ok")
        write(fifo, b"a..b x\n" * 5 + b"nospace\n" * 5 + b"ok yes\n")
        assert [m.data for m in drain(sub)] == [b"yes"]
        assert fifo_stats(bus, fifo)["errors"] == {"invalid_topic": 5, "malformed": 5}
    assert d.log().count('"event": "fifo_bad_input"') == 1


def test_a_fifo_that_cannot_be_created_refuses_the_start(workdir: Path) -> None:
    cfg = workdir / "c.toml"
    cfg.write_text(f'[[fifo.ingress]]\npath = "{workdir}/no/such/dir/x.fifo"\n')
    r = subprocess.run([*HOSTBUSD, "--config", str(cfg), "--runtime-dir", str(workdir / "run"), "--state-dir",
                        str(workdir / "st"), "--log-format", "json"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert f"cannot create FIFO {workdir}/no/such/dir/x.fifo: No such file or directory" in r.stderr
    assert not (workdir / "run").exists()  # the socket, publish.fifo and the directory were cleaned up
