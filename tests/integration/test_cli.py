"""The hostbus command against a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import hostbus
from tests.conftest import Daemon

HOSTBUS = str(Path(sys.executable).parent / "hostbus")


def cli(daemon: Daemon | None, *args: str, stdin: str | None = None,
        timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("HOSTBUS_SOCKET", None)
    if daemon is not None:
        env["HOSTBUS_SOCKET"] = str(daemon.socket)
    return subprocess.run([HOSTBUS, *args], input=stdin, capture_output=True, text=True, env=env,
                          timeout=timeout)


def start_sub(daemon: Daemon, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HOSTBUS_SOCKET": str(daemon.socket)}
    return subprocess.Popen([HOSTBUS, "sub", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def wait_subscribed(daemon: Daemon, n: int) -> None:
    with daemon.connect() as bus:
        for _ in range(500):
            if bus.stats()["subscriptions"] >= n:
                return
            threading.Event().wait(0.01)
    raise AssertionError("the subscriber never subscribed")


def test_pub_and_sub_as_in_the_readme(daemon: Daemon) -> None:
    sub = start_sub(daemon, "demo.>", "--count", "5", "--timeout", "15")
    wait_subscribed(daemon, 1)
    assert cli(daemon, "pub", "demo.hello", "hi there").returncode == 0
    assert cli(daemon, "pub", "demo.lines", "--lines", stdin="one\ntwo\n").returncode == 0
    assert cli(daemon, "pub", "demo.stdin", stdin="all of\nstdin").returncode == 0
    assert cli(daemon, "pub", "demo.echo", stdin="21.5\n").returncode == 0  # echo 21.5 | hostbus pub
    out, err = sub.communicate(timeout=20)
    assert sub.returncode == 0, err
    assert out == "demo.hello hi there\ndemo.lines one\ndemo.lines two\ndemo.stdin all of\\nstdin\ndemo.echo 21.5\n"


def test_sub_json_carries_headers_and_sender(daemon: Daemon) -> None:
    sub = start_sub(daemon, "j", "--json", "--count", "1", "--timeout", "15")
    wait_subscribed(daemon, 1)
    r = cli(daemon, "pub", "j", '{"t": 21.5}', "-H", "unit=C", "-H", "src=kitchen")
    assert r.returncode == 0, r.stderr
    out, _ = sub.communicate(timeout=20)
    obj = json.loads(out)
    assert obj["topic"] == "j"
    assert obj["data"] == '{"t": 21.5}'
    assert obj["headers"] == {"unit": "C", "src": "kitchen"}
    assert obj["sender"]["uid"] == os.getuid()
    assert obj["sender"]["gid"] == os.getgid()
    assert obj["sender"]["pid"] > 0


def test_retained_and_multiple_patterns(daemon: Daemon) -> None:
    assert cli(daemon, "pub", "state.door", "open", "--retain").returncode == 0
    r = cli(daemon, "sub", "state.*", "other", "--count", "1", "--timeout", "10")
    assert r.returncode == 0
    assert r.stdout == "state.door open\n"


def test_sub_timeout_without_enough_messages_fails(daemon: Daemon) -> None:
    r = cli(daemon, "sub", "quiet", "--count", "2", "--timeout", "0.3")
    assert r.returncode == 1
    assert "timed out after 0.3 s with 0 of 2 messages" in r.stderr
    r = cli(daemon, "sub", "quiet", "--timeout", "0.3")
    assert r.returncode == 0  # no count asked: a timeout is the normal end


def test_queue_group_members_split_messages(daemon: Daemon) -> None:
    subs = [start_sub(daemon, "work", "--group", "g", "--timeout", "3") for _ in range(2)]
    wait_subscribed(daemon, 2)
    assert cli(daemon, "pub", "work", "--lines", stdin="".join(f"{i}\n" for i in range(20))).returncode == 0
    outs = [s.communicate(timeout=20)[0].splitlines() for s in subs]
    assert sorted(int(line.split()[1]) for out in outs for line in out) == list(range(20))


def test_req_prints_the_reply(daemon: Daemon) -> None:
    with daemon.connect("responder") as bus:
        sub = bus.subscribe("time.now")
        t = threading.Thread(target=lambda: sub.next(timeout=10).respond(b"12:00"))
        t.start()
        r = cli(daemon, "req", "time.now", "--timeout", "10")
        t.join()
    assert (r.returncode, r.stdout) == (0, "12:00\n")


def test_req_without_responders(daemon: Daemon) -> None:
    r = cli(daemon, "req", "nobody.home")
    assert r.returncode == 1
    assert r.stderr == "hostbus: no responders on 'nobody.home'\n"


def test_stats_human_and_json(daemon: Daemon) -> None:
    cli(daemon, "pub", "counted", "x")
    r = cli(daemon, "stats")
    assert r.returncode == 0
    assert "messages in" in r.stdout and "counted" in r.stdout
    st = json.loads(cli(daemon, "stats", "--json").stdout)
    assert st["messages"]["in"] == 1
    assert st["topics"] == {"counted": 1}


def test_errors_are_one_line_and_non_zero(daemon: Daemon) -> None:
    r = cli(daemon, "pub", "bad topic", "x")
    assert r.returncode == 1
    assert r.stderr.startswith("hostbus: invalid topic") and r.stderr.count("\n") == 1
    r = cli(daemon, "pub", "t", "x", "-H", "novalue")
    assert r.returncode != 0 and "KEY=VALUE" in r.stderr


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    r = cli(None, "--socket", str(tmp_path / "none.sock"), "pub", "x", "y")
    assert r.returncode == 1
    assert "cannot connect to hostbusd" in r.stderr and r.stderr.count("\n") == 1


def test_library_and_cli_agree_on_the_socket_from_the_environment(daemon: Daemon, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HOSTBUS_SOCKET", str(daemon.socket))
    with hostbus.connect() as bus:
        assert bus.welcome["server"].startswith("hostbusd")


def test_sub_reports_a_stopping_broker_in_one_line(daemon: Daemon) -> None:
    # Regression: the error escaped as an ExceptionGroup traceback.
    sub = start_sub(daemon, "x")
    wait_subscribed(daemon, 1)
    daemon.stop()
    _, err = sub.communicate(timeout=20)
    assert sub.returncode == 1
    assert err == "hostbus: the broker is stopping\n"


def test_sub_into_head_exits_quietly(daemon: Daemon) -> None:
    env = {**os.environ, "HOSTBUS_SOCKET": str(daemon.socket)}
    shell = subprocess.Popen(["bash", "-c", f"set -o pipefail; {HOSTBUS} sub 'p.>' | head -1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_subscribed(daemon, 1)
    cli(daemon, "pub", "p.x", "--lines", stdin="".join(f"{i}\n" for i in range(5000)))
    out, err = shell.communicate(timeout=20)
    assert (shell.returncode, out, err) == (0, "p.x 0\n", "")


def test_sub_prints_inner_newlines_escaped(daemon: Daemon) -> None:
    sub = start_sub(daemon, "ml", "--count", "1", "--timeout", "10")
    wait_subscribed(daemon, 1)
    cli(daemon, "pub", "ml", stdin="line1\nline2\r\n")
    out, _ = sub.communicate(timeout=20)
    assert out == "ml line1\\nline2\\r\n"


def test_bench_measures_the_running_broker(daemon: Daemon) -> None:
    r = cli(daemon, "bench", "--count", "3000", "--subscribers", "2", "--requests", "50", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["lost"] == 0 and res["count"] == 3000 and res["subscribers"] == 2
    assert res["publish_msgs_per_s"] > 0 and res["delivery_msgs_per_s"] > 0
    assert 0 < res["rtt_us"]["p50"] <= res["rtt_us"]["p99"] <= res["rtt_us"]["max"]
    table = cli(daemon, "bench", "--count", "1000", "--requests", "10", timeout=120)
    assert table.returncode == 0 and "round trip  p50" in table.stdout and "lost        0" in table.stdout
    assert cli(daemon, "bench", "--count", "0").returncode == 2
