"""Regressions for defects found in review of the ZeroMQ gateway (each test names its bug)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from tests.conftest import HOSTBUSD, Daemon, toml_dump
from tests.helpers.subs import drain
from tests.integration.test_zmq import ZSub, endpoints, wait_patterns, zmq_pub

SLOW_SUB = """
import json, sys, time, zmq
endpoint, prefixes, count, delay = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = zmq.Context().socket(zmq.SUB)
s.setsockopt(zmq.RCVHWM, 10)
s.connect(endpoint)
for p in prefixes:
    s.setsockopt(zmq.SUBSCRIBE, p.encode())
print("ready", flush=True)
time.sleep(delay)
got = []
while len(got) < count and s.poll(3000):
    got.append(s.recv_multipart()[0].decode())
print(json.dumps(got), flush=True)
"""


def slow_sub(xpub: str, prefixes: list[str], count: int, delay: float) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", SLOW_SUB, xpub, json.dumps(prefixes), str(count), str(delay)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_65536_headers_are_bad_input_not_a_crash(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True}})
    xsub, _ = endpoints(d)
    with d.connect() as bus:
        sub = bus.subscribe("ok")
        zmq_pub(xsub, [["t", "p", json.dumps({f"k{i}": "" for i in range(65536)})], ["ok", "after"]])
        assert [m.data for m in drain(sub, 1)] == [b"after"]
        assert bus.stats()["zmq"]["zmq"]["errors"] == {"invalid_headers": 1}
    assert d.proc.poll() is None


def test_delivery_resumes_completely_after_the_high_water_mark_without_spinning(
        start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True, "hwm": 100}})
    _, xpub = endpoints(d)
    sub = slow_sub(xpub, [""], 10_000, 2.0)  # reads nothing for 2 s, then everything
    with d.connect() as bus:
        wait_patterns(bus, 1)
        for i in range(10_000):
            bus.publish("flood", str(i).encode() + b"x" * 500)
        bus.flush(timeout=30)
        time.sleep(0.3)
        before = cpu_seconds(d.pid)
        time.sleep(1.0)  # the SUB is still stalled and nothing is published
        assert cpu_seconds(d.pid) - before < 0.3  # waiting, not busy-looping
        out, _ = sub.communicate(timeout=60)
        assert len(json.loads(out)) == 10_000  # nothing lost: the bounded queue held them
        z = bus.stats()["zmq"]["zmq"]
    assert (z["out"], z["dropped"]) == (10_000, 0)


def test_disconnect_policy_does_not_end_the_shared_gateway(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True, "hwm": 10},
                      "subscriptions": {"policy": "disconnect", "max_queued_msgs": 100}})
    xsub, xpub = endpoints(d)
    stalled = slow_sub(xpub, [""], 1, 30)
    try:
        with d.connect() as bus:
            wait_patterns(bus, 1)
            for _ in range(2000):
                bus.publish("flood", b"x" * 1000)
            bus.flush()
            time.sleep(0.5)
            z = bus.stats()["zmq"]["zmq"]
            assert z["dropped"] > 0 and z["patterns"] == [">"]
            sub = bus.subscribe("late")
            zmq_pub(xsub, [["late", "still routed"]])
            assert [m.data for m in drain(sub, 1)] == [b"still routed"]
        assert d.proc.poll() is None
    finally:
        stalled.kill()
        stalled.wait()


def test_junk_prefixes_do_not_lock_out_other_subscribers(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True}, "limits": {"max_subscriptions_per_connection": 4}})
    _, xpub = endpoints(d)
    ctx = zmq.Context()
    hostile = ctx.socket(zmq.SUB)
    hostile.connect(xpub)
    for i in range(50):
        hostile.setsockopt(zmq.SUBSCRIBE, b"\xff%d" % i)  # no topic can start so: nothing held
    for p in (b"a.", b"b.", b"c."):
        hostile.setsockopt(zmq.SUBSCRIBE, p)
    time.sleep(0.5)
    legit = ZSub(xpub, ["news.", "more."], 2)  # "more." finds no room (4 patterns held)
    with d.connect() as bus:
        wait_patterns(bus, 4)
        hostile.close(linger=0)  # its patterns are released; "more." gets its turn
        for _ in range(100):
            if "more.>" in bus.stats()["zmq"]["zmq"]["patterns"]:
                break
            time.sleep(0.02)
        bus.publish("news.today", b"1")
        bus.publish("more.news", b"2")
        bus.flush()
        assert [f[0] for f in legit.result()] == ["news.today", "more.news"]
    ctx.term()


def test_one_order_for_all_prefixes_under_backpressure(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True, "hwm": 10}})
    _, xpub = endpoints(d)
    sub = slow_sub(xpub, ["a.", "b."], 400, 1.0)
    with d.connect() as bus:
        wait_patterns(bus, 2)
        order = [f"a.{i}" for i in range(200)] + [f"b.{i}" for i in range(200)]
        for t in order:
            bus.publish(t, b"x" * 10_000)
        bus.flush(timeout=30)
        out, _ = sub.communicate(timeout=60)
    assert json.loads(out) == order


def test_prefixes_at_the_topic_limit_and_inside_a_character(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True}})
    _, xpub = endpoints(d)
    long_topic = "l." + "x" * 505  # 507 bytes: a valid topic
    subs = [ZSub(xpub, [long_topic[:504]], 1)]
    raw = subprocess.Popen([sys.executable, "-c", "import sys, zmq; s = zmq.Context().socket(zmq.SUB); "
                            f"s.connect('{xpub}'); s.setsockopt(zmq.SUBSCRIBE, b'caf\\xc3'); print('ready', "
                            "flush=True); print(s.recv_multipart()[0].decode() if s.poll(3000) else '')"],
                           stdout=subprocess.PIPE, text=True)
    assert raw.stdout is not None and raw.stdout.readline().strip() == "ready"
    with d.connect() as bus:
        wait_patterns(bus, 4)
        bus.publish(long_topic, b"1")
        bus.publish("café.menu", b"2")
        bus.flush()
        assert [f[0] for f in subs[0].result()] == [long_topic]
        assert raw.communicate(timeout=20)[0].strip() == "café.menu"


def test_retained_messages_are_not_replayed_through_the_gateway(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True}})
    _, xpub = endpoints(d)
    with d.connect() as bus:
        bus.publish("sensors.temp", b"21", retain=True)
        bus.flush()
        first = ZSub(xpub, [""], 99, timeout=1.0)
        wait_patterns(bus, 1)
        second = ZSub(xpub, ["sensors."], 99, timeout=1.0)
        wait_patterns(bus, 2)
        bus.publish("sensors.temp", b"22")
        bus.flush()
        assert first.result() == [["sensors.temp", "22"]]
        assert second.result() == [["sensors.temp", "22"]]


def test_endpoints_files_and_refusals(workdir: Path, start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True}})
    assert stat.S_IMODE(os.stat(d.runtime_dir / "zmq-publish.ipc").st_mode) == 0o600
    for zmq_cfg, expected in (
        ({"xsub": "ipc://@hostbus-abstract"}, "abstract socket"),
        ({"xsub": f"ipc://{workdir / 'victim.txt'}"}, "exists and is not a socket"),
        ({"topic_prefix": "alerts"}, "zmq.topic_prefix = 'alerts'"),
    ):
        (workdir / "victim.txt").write_text("keep me")
        cfg = workdir / "c.toml"
        cfg.write_text(toml_dump({"zmq": {"enabled": True, **zmq_cfg}}))
        r = subprocess.run([*HOSTBUSD, "--config", str(cfg), "--runtime-dir", str(workdir / "run"), "--state-dir",
                            str(workdir / "st"), "--log-format", "json"], capture_output=True, text=True, timeout=20)
        assert r.returncode in (1, 2) and expected in r.stderr, r.stderr
        assert (workdir / "victim.txt").read_text() == "keep me"
        assert not (workdir / "run").exists()


def test_reload_reports_that_zmq_changes_need_a_restart(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True}})
    d.config_path.write_text(toml_dump({"zmq": {"enabled": False}}))
    d.proc.send_signal(signal.SIGHUP)
    for _ in range(300):
        if '"reloaded"' in d.log():
            break
        time.sleep(0.02)
    line = next(json.loads(x) for x in d.log().splitlines() if '"reloaded"' in x)
    assert line["needs_restart"] == ["zmq"]
