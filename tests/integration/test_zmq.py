"""The ZeroMQ gateway with real pyzmq PUB and SUB sockets, each in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import hostbus
from tests.conftest import HOSTBUSD, Daemon
from tests.helpers.subs import drain

ZPUB = """
import json, sys, time, zmq
endpoint, messages = sys.argv[1], json.loads(sys.stdin.read())
ctx = zmq.Context()
pub = ctx.socket(zmq.PUB)
pub.setsockopt(zmq.LINGER, 5000)
pub.connect(endpoint)
time.sleep(0.5)  # let the connection (and the gateway's subscription to everything) settle
for frames in messages:
    pub.send_multipart([f.encode("latin-1") for f in frames])
pub.close()
ctx.term()
"""

ZSUB = """
import json, sys, zmq
endpoint, prefixes, count, timeout = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.connect(endpoint)
for p in prefixes:
    sub.setsockopt(zmq.SUBSCRIBE, p.encode())
print("ready", flush=True)
got = []
while len(got) < count and sub.poll(int(timeout * 1000)):
    got.append([f.decode("latin-1") for f in sub.recv_multipart()])
print(json.dumps(got), flush=True)
sub.close(linger=0)
ctx.term()
"""


def zmq_pub(endpoint: str, messages: list[list[str]]) -> None:
    subprocess.run([sys.executable, "-c", ZPUB, endpoint], input=json.dumps(messages), text=True, check=True,
                   timeout=30)


class ZSub:
    def __init__(self, endpoint: str, prefixes: list[str], count: int, timeout: float = 2.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZSUB, endpoint, json.dumps(prefixes), str(count),
                                      str(timeout)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def result(self) -> list[list[str]]:
        out, _ = self.proc.communicate(timeout=60)
        return json.loads(out)  # type: ignore[no-any-return]


def wait_patterns(bus: hostbus.Bus, n: int) -> None:
    for _ in range(200):
        if len(bus.stats()["zmq"]["zmq"]["patterns"]) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(bus.stats()["zmq"])


@pytest.fixture
def gw(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon({"zmq": {"enabled": True}})


def endpoints(d: Daemon) -> tuple[str, str]:
    return f"ipc://{d.runtime_dir / 'zmq-publish.ipc'}", f"ipc://{d.runtime_dir / 'zmq-subscribe.ipc'}"


def test_zeromq_publisher_to_hostbus_subscriber(gw: Daemon) -> None:
    xsub, _ = endpoints(gw)
    with gw.connect() as bus:
        sub = bus.subscribe("z.>")
        zmq_pub(xsub, [["z.a", "one"], ["z.b", "two", '{"unit": "C"}']])
        got = drain(sub, 1)
        assert [(m.topic, m.data, m.headers) for m in got] == [("z.a", b"one", {}), ("z.b", b"two", {"unit": "C"})]
        assert got[0].sender == hostbus.Sender(0xFFFFFFFF, 0xFFFFFFFF, 0, "zmq:zmq")
        assert bus.stats()["zmq"]["zmq"]["in"] == 2


def test_hostbus_publisher_to_zeromq_subscriber_with_prefix_mapping(gw: Daemon) -> None:
    _, xpub = endpoints(gw)
    topics = ["sensors.kitchen.temp", "sensors.kit", "sensors.kitchenette", "sensors.hall.temp", "sensors",
              "other.x", "a.b.c", "a.b"]
    subs = {
        "": ZSub(xpub, [""], 99),  # everything
        "sensors.": ZSub(xpub, ["sensors."], 99),
        "sensors.kit": ZSub(xpub, ["sensors.kit"], 99),
        "a.b.|other": ZSub(xpub, ["a.b.", "other"], 99),
        "bad prefix": ZSub(xpub, ["sens ors", "x.*"], 99),
    }
    with gw.connect() as bus:
        wait_patterns(bus, 6)  # >, sensors.>, sensors.*(.>), a.b.>, *(.>) for "other"
        for t in topics:
            bus.publish(t, t)
        bus.flush()
        results = {k: [frames[0] for frames in s.result()] for k, s in subs.items()}
    assert results[""] == topics
    assert results["sensors."] == ["sensors.kitchen.temp", "sensors.kit", "sensors.kitchenette", "sensors.hall.temp"]
    assert results["sensors.kit"] == ["sensors.kitchen.temp", "sensors.kit", "sensors.kitchenette"]
    assert results["a.b.|other"] == ["other.x", "a.b.c"]
    assert results["bad prefix"] == []


def test_zeromq_to_zeromq_through_hostbus_with_headers(gw: Daemon) -> None:
    xsub, xpub = endpoints(gw)
    sub = ZSub(xpub, ["chat."], 3)
    with gw.connect() as bus:
        wait_patterns(bus, 1)
        zmq_pub(xsub, [["chat.room1", "hi"], ["chat.room2", "yo", '{"from": "bob"}'], ["chat.room1", "bye"]])
    assert sub.result() == [["chat.room1", "hi"], ["chat.room2", "yo", '{"from":"bob"}'], ["chat.room1", "bye"]]


def test_bad_multipart_messages_are_dropped_counted_and_logged_once(gw: Daemon) -> None:
    xsub, _ = endpoints(gw)
    with gw.connect() as bus:
        sub = bus.subscribe("ok")
        zmq_pub(xsub, [["just-a-topic"], ["t", "p", "{}", "extra"], ["a..b", "x"], ["$SYS.x", "y"],
                       ["t", "p", "not json"], ["t", "p", '{"k": 1}'], ["big", "x" * 2_000_000], ["ok", "fine"]])
        assert [m.data for m in drain(sub, 1)] == [b"fine"]
        st = bus.stats()["zmq"]["zmq"]
    # ZeroMQ itself refuses the oversized message (ZMQ_MAXMSGSIZE) and drops that peer's
    # connection; the gateway's own size check covers the rest.
    assert st["errors"] == {"frames": 2, "invalid_topic": 2, "invalid_headers": 2}
    assert gw.log().count('"event": "zmq_bad_input"') == 1


def test_endpoint_topic_prefix_limits_both_directions(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True, "topic_prefix": "alerts."}})
    xsub, xpub = endpoints(d)
    zsub = ZSub(xpub, [""], 99)
    with d.connect() as bus:
        wait_patterns(bus, 1)
        assert bus.stats()["zmq"]["zmq"]["patterns"] == ["alerts.>"]
        sub = bus.subscribe(">")
        zmq_pub(xsub, [["alerts.disk", "full"], ["other.x", "denied"]])
        assert [m.topic for m in drain(sub, 1)] == ["alerts.disk"]
        bus.publish("other.y", b"not for zeromq")
        bus.publish("alerts.cpu", b"hot")
        bus.flush()
        assert bus.stats()["zmq"]["zmq"]["errors"] == {"denied_topic": 1}
    assert [f[0] for f in zsub.result()] == ["alerts.disk", "alerts.cpu"]


def test_a_slow_zeromq_subscriber_costs_counted_drops_not_memory(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True, "hwm": 100},
                      "subscriptions": {"max_queued_msgs": 1000, "policy": "drop-oldest"}})
    _, xpub = endpoints(d)
    stalled = subprocess.Popen([sys.executable, "-c", "import sys, time, zmq; s = zmq.Context().socket(zmq.SUB); "
                                f"s.setsockopt(zmq.RCVHWM, 10); s.connect('{xpub}'); s.setsockopt(zmq.SUBSCRIBE, b''); "
                                "print('ready', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert stalled.stdout is not None and stalled.stdout.readline().strip() == "ready"
        with d.connect() as bus:
            wait_patterns(bus, 1)
            other = bus.subscribe("flood", max_msgs=100_000, pending_limit=100_000)
            for _ in range(20_000):
                bus.publish("flood", b"x" * 1000)
            bus.flush(timeout=30)
            assert len(drain(other, 1)) == 20_000  # the socket subscriber is not held back
            st = bus.stats()
            z = st["zmq"]["zmq"]
        assert z["dropped"] > 0
        assert z["out"] + z["dropped"] <= 20_000
        assert st["messages"]["dropped"] >= z["dropped"]  # the gateway's drops count in the totals
        assert d.status()["VmRSS"] < 200 * 1024
    finally:
        stalled.kill()
        stalled.wait()


def test_remote_tcp_endpoints_need_allow_remote(workdir: Path) -> None:
    cfg = workdir / "c.toml"
    cfg.write_text('[zmq]\nenabled = true\nxsub = "tcp://0.0.0.0:0"\n')
    r = subprocess.run([*HOSTBUSD, "--config", str(cfg), "--runtime-dir", str(workdir / "run"), "--state-dir",
                        str(workdir / "st"), "--log-format", "json"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert "is not on a loopback address" in r.stderr and "zmq.allow_remote" in r.stderr
    assert not (workdir / "run").exists()


def test_gateway_files_are_removed_at_exit(gw: Daemon) -> None:
    assert (gw.runtime_dir / "zmq-publish.ipc").exists()
    assert gw.stop() == 0
    assert not gw.runtime_dir.exists()


def test_stats_command_shows_the_gateway(gw: Daemon) -> None:
    from tests.integration.test_cli import cli

    xsub, _ = endpoints(gw)
    zmq_pub(xsub, [["z.a", "1"], ["bad"]])
    time.sleep(0.3)
    assert "zmq zmq: in 1, out 0, dropped 0, skipped: frames 1, prefixes 0" in cli(gw, "stats").stdout


def test_access_rules_apply_to_the_endpoint_principal(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True, "name": "gw"}, "access": {"default": "deny"}, "acl": [
        {"topic": "zmq.>", "publish": ["zmq:gw"], "subscribe": ["*"]},
        {"topic": "out.>", "publish": ["uid:0"], "subscribe": ["zmq:gw"]},
        {"topic": "out.secret.>", "subscribe": ["uid:0"]},
    ]})
    xsub, xpub = endpoints(d)
    zsub = ZSub(xpub, [""], 99)  # everything: the rules decide what it gets
    with d.connect() as bus:
        for _ in range(200):
            if bus.stats()["zmq"]["gw"]["patterns"]:
                break
            time.sleep(0.02)
        sub = bus.subscribe(">")  # root may see zmq.> and out.secret.>, nothing else
        for t in ("out.a", "out.secret.b", "out.c"):
            bus.publish(t, t)
        bus.flush()
        assert [frames[0] for frames in zsub.result()] == ["out.a", "out.c"]  # not out.secret.b
        assert [m.topic for m in drain(sub, 0.5)] == ["out.secret.b"]
        zmq_pub(xsub, [["other.x", "refused: no rule lets zmq:gw publish it"], ["zmq.ok", "allowed"]])
        assert [(m.topic, m.sender.origin) for m in drain(sub, 1)] == [("zmq.ok", "zmq:gw")]
        st = bus.stats()
        assert st["zmq"]["gw"]["errors"] == {"denied": 1}
        assert bus.whoami("zmq.x")["access"]["publish"]["allowed"] is False  # the rule is for zmq:gw only
    line = next(json.loads(x) for x in d.log().splitlines() if '"zmq_bad_input"' in x)
    assert line["fault"] == "denied" and "other.x" in line["error"] and "access.default (deny)" in line["error"]
