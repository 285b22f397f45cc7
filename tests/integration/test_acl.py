"""Access rules and per-uid limits against a real daemon, with real users and groups.

Users hb-alice (member of hb-sensors when a test says so) and hb-bob are created for the tests;
their clients run in forked children that switch uid, gid and supplementary groups, so the
broker sees them through SO_PEERCRED and SO_PEERGROUPS exactly as any other process. The root
test process itself is an ordinary principal here: no rule names it unless it says uid:0.
Every attempted violation below is listed in docs/security.md with its outcome.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import hostbus
from hostbus import cli
from tests.conftest import HOSTBUSD, Daemon, ensure_group, ensure_user, run_as, toml_dump

pytestmark = pytest.mark.needs_root

RULES: list[dict[str, Any]] = [
    {"topic": "sensors.>", "publish": ["group:hb-sensors"], "subscribe": ["*"]},
    {"topic": "sensors.private.>", "subscribe": ["user:hb-alice"]},
    {"topic": "chat.>", "publish": ["*", "!user:hb-bob"], "subscribe": ["*"]},
    {"topic": "svc.time", "publish": ["user:hb-bob"], "subscribe": ["user:hb-alice"]},
]


class People:
    def __init__(self) -> None:
        self.sensors = ensure_group("hb-sensors")
        self.alice = ensure_user("hb-alice")
        self.bob = ensure_user("hb-bob")

    def as_alice(self, fn: Callable[[], None], **kw: Any) -> int:
        return run_as(*self.alice, fn, groups=[self.sensors], **kw)

    def as_bob(self, fn: Callable[[], None], **kw: Any) -> int:
        return run_as(*self.bob, fn, **kw)


@pytest.fixture(scope="module")
def people() -> People:
    return People()


def open_daemon(start_daemon: Callable[..., Daemon], workdir: Path, config: dict[str, Any]) -> Daemon:
    """A daemon other users can reach, with ``config`` on top of open socket modes."""
    workdir.chmod(0o755)
    d = start_daemon({"socket": {"dir_mode": 0o755, "mode": 0o666}, **config})
    d.workdir.chmod(0o755)
    return d


@pytest.fixture
def acl_daemon(start_daemon: Callable[..., Daemon], workdir: Path, people: People) -> Daemon:
    return open_daemon(start_daemon, workdir, {"access": {"default": "deny"}, "acl": RULES})


class Held:
    """A child process as another user: runs ``setup(report)``, then holds what it opened until
    :meth:`release`. Lines passed to ``report`` come back through :meth:`line`."""

    def __init__(self, uid: int, gid: int, setup: Callable[[Callable[[str], None]], Any],
                 groups: list[int] | None = None) -> None:
        out_r, out_w = os.pipe()
        hold_r, hold_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(out_r)
                os.close(hold_w)
                os.setgroups(groups or [])
                os.setgid(gid)
                os.setuid(uid)
                kept = setup(lambda line: os.write(out_w, line.encode() + b"\n"))
                os.write(out_w, b"ready\n")
                os.read(hold_r, 1)  # until released (or the parent dies)
                del kept
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(out_w)
        os.close(hold_r)
        self.pid, self._out, self._hold, self._buf = pid, out_r, hold_w, b""

    def line(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            ready, _, _ = select.select([self._out], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"the child said nothing more (so far: {self._buf!r})"
            chunk = os.read(self._out, 4096)
            assert chunk, f"the child ended (so far: {self._buf!r})"
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode().strip()

    def release(self) -> int:
        with contextlib.suppress(OSError):
            os.close(self._hold)
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        os.close(self._out)
        return os.waitstatus_to_exitcode(status)


@contextlib.contextmanager
def held(uid: int, gid: int, setup: Callable[[Callable[[str], None]], Any],
         groups: list[int] | None = None) -> Iterator[Held]:
    h = Held(uid, gid, setup, groups)
    try:
        yield h
    finally:
        if h.pid:  # not released by the test: end it
            with contextlib.suppress(ProcessLookupError):
                os.kill(h.pid, signal.SIGKILL)
            h.release()


def serve_time(sock: str | Path) -> hostbus.Bus:
    """A responder on svc.time answering b"noon" from a thread; the returned bus keeps it alive."""
    import threading

    bus = hostbus.connect(sock)
    sub = bus.subscribe("svc.time")

    def serve() -> None:
        with contextlib.suppress(hostbus.HostbusError):
            for msg in sub:
                msg.respond(b"noon")
                bus.flush()

    threading.Thread(target=serve, daemon=True).start()
    return bus


def stalled_connections(sock: str | Path, n: int, pattern: str) -> list[socket.socket]:
    """``n`` raw connections that subscribe to ``pattern`` and never read (small receive buffers)."""
    from hostbus import wire

    raws = []
    for i in range(n):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(str(sock))
        raw.sendall(wire.encode_hello(f"stalled{i}", "raw", wire.PROTOCOL_VERSION)
                    + wire.encode_sub(1, {"pattern": pattern}))
        raws.append(raw)
    return raws


def nothing_more(sub: hostbus.Subscription, within: float = 0.3) -> None:
    with pytest.raises(hostbus.TimeoutError):
        msg = sub.next(timeout=within)
        raise AssertionError(f"unexpected {msg.topic}")


def wait_log(d: Daemon, event: str, count: int = 1, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = d.log()
        if log.count(f'"event": "{event}"') >= count:
            return log
        time.sleep(0.02)
    raise AssertionError(f"no {event} in the log: {d.log()}")


# ---- publish -------------------------------------------------------------------------------------


def test_publish_allowed_to_a_group_member_and_refused_to_others(acl_daemon: Daemon, people: People) -> None:
    sock = acl_daemon.socket
    with acl_daemon.connect("watcher") as watcher:
        sub = watcher.subscribe("sensors.>")

        def alice() -> None:  # member of hb-sensors through her supplementary groups
            with hostbus.connect(sock) as bus:
                assert "group:hb-sensors" in bus.identity["principals"]
                bus.publish("sensors.kitchen", b"21.5")
                bus.flush()

        def bob() -> None:
            with hostbus.connect(sock) as bus:
                bus.publish("sensors.kitchen", b"forged")
                with pytest.raises(hostbus.PermissionDeniedError) as err:
                    bus.flush()
                assert "'sensors.kitchen'" in str(err.value) and "acl rule 0 (topic 'sensors.>')" in str(err.value)
                bus.publish("chat.hello", b"bob")  # refused by name ("!user:hb-bob")
                with pytest.raises(hostbus.PermissionDeniedError, match="refused to user:hb-bob"):
                    bus.flush()
                bus.publish("elsewhere", b"x")  # no rule: the default (deny) decides
                with pytest.raises(hostbus.PermissionDeniedError, match=r"access.default \(deny\)"):
                    bus.flush()

        assert people.as_alice(alice) == 0
        assert people.as_bob(bob) == 0
        msg = sub.next(timeout=5)
        assert (msg.topic, msg.data, msg.sender.uid) == ("sensors.kitchen", b"21.5", people.alice[0])
        nothing_more(sub)
        # Root is not special: no rule names uid 0 for publishing sensors.
        watcher.publish("sensors.kitchen", b"root")
        with pytest.raises(hostbus.PermissionDeniedError):
            watcher.flush()
        nothing_more(sub)
        st = watcher.stats()
        assert st["access"] == {"default": "deny", "rules": 4, "denied": {"publish": 4}}
    log = wait_log(acl_daemon, "publish_denied")
    line = next(json.loads(x) for x in log.splitlines() if '"publish_denied"' in x)
    assert line["uid"] == people.bob[0] and line["topic"] == "sensors.kitchen" and "acl rule 0" in line["rule"]


# ---- subscribe -----------------------------------------------------------------------------------


def test_refused_subscriptions_fail_at_once_naming_the_rule(acl_daemon: Daemon, people: People) -> None:
    sock = acl_daemon.socket

    def bob() -> None:
        with hostbus.connect(sock) as bus:
            with pytest.raises(hostbus.PermissionDeniedError) as err:
                bus.subscribe("sensors.private.diary")
            assert "'sensors.private.diary'" in str(err.value)
            assert "acl rule 1 (topic 'sensors.private.>')" in str(err.value)
            with pytest.raises(hostbus.PermissionDeniedError, match=r"access.default \(deny\)"):
                bus.subscribe("secret.>")
            with pytest.raises(hostbus.PermissionDeniedError, match="queue group"):
                bus.subscribe("sensors.>", group="workers")  # a group member must take every message
            bus.subscribe("sensors.public")  # allowed: the connection goes on
            bus.flush()

    assert people.as_bob(bob) == 0


def test_wildcard_subscribers_see_only_the_topics_they_may(acl_daemon: Daemon, people: People) -> None:
    sock = acl_daemon.socket
    topics = ["sensors.private.diary", "sensors.a", "secret.plan", "chat.hi", "sensors.private.r"]

    def publish_everything() -> None:
        with hostbus.connect(sock) as bus:  # alice may publish sensors.> and chat.>
            for t in topics:
                bus.publish(t, t.encode(), retain=t == "sensors.private.r")
            bus.publish("zz.end", b"")  # refused (no rule): the rest was routed before it
            with pytest.raises(hostbus.PermissionDeniedError):
                bus.flush()

    seen: dict[str, list[list[str]]] = {}
    for name, who in (("bob", people.bob), ("alice", people.alice)):
        groups = [people.sensors] if name == "alice" else None
        r, w = os.pipe()

        def run(r: int = r, w: int = w) -> None:
            os.close(r)
            with hostbus.connect(sock) as bus:
                subs = [bus.subscribe(">"), bus.subscribe("sensors.>")]
                os.write(w, b"subscribed\n")
                results = []
                for s in subs:
                    got = []
                    with contextlib.suppress(hostbus.TimeoutError):
                        while True:
                            got.append(s.next(timeout=1.5).topic)
                    results.append(got)
                os.write(w, json.dumps(results).encode() + b"\n")

        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups(groups or [])
                os.setgid(who[1])
                os.setuid(who[0])
                run()
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(w)
        reader = os.fdopen(r)
        assert reader.readline().strip() == "subscribed"
        if name == "bob":  # alice subscribes after the retained message is stored: only it arrives
            assert people.as_alice(publish_everything) == 0
        seen[name] = json.loads(reader.readline())
        reader.close()
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    # bob: '>' sees what his rules allow -- not sensors.private.*, not secret.* (no rule: deny)
    assert seen["bob"] == [["sensors.a", "chat.hi"], ["sensors.a"]]
    # alice, subscribing later, gets the retained sensors.private.r she may see, on both patterns
    assert seen["alice"] == [["sensors.private.r"], ["sensors.private.r"]]

    def bob_late() -> None:  # the retained private message is not handed to bob either
        with hostbus.connect(sock) as bus:
            sub = bus.subscribe("sensors.>")
            nothing_more(sub, 0.5)

    assert people.as_bob(bob_late) == 0


def test_a_reply_to_a_request_needs_no_rule(acl_daemon: Daemon, people: People) -> None:
    sock = acl_daemon.socket

    def alice_serves(report: Callable[[str], None]) -> Any:
        bus = serve_time(sock)  # alice has no publish rule for _INBOX.*: the reply is allowed anyway
        report("serving")
        return bus

    def bob_asks() -> None:
        with hostbus.connect(sock) as bus:
            assert bus.request("svc.time", b"", timeout=5).data == b"noon"
            with pytest.raises(hostbus.PermissionDeniedError):
                bus.subscribe("svc.time")  # only alice serves it

    with held(*people.alice, alice_serves, groups=[people.sensors]) as h:
        assert h.line() == "serving"
        assert h.line() == "ready"
        assert people.as_bob(bob_asks) == 0


# ---- reload ----------------------------------------------------------------------------------------


def test_reload_applies_new_rules_to_open_connections(acl_daemon: Daemon, people: People) -> None:
    sock = acl_daemon.socket
    config = {"socket": {"dir_mode": 0o755, "mode": 0o666}, "access": {"default": "deny"}}

    def reload(rules: list[dict[str, Any]] | str, expect: str = "reloaded") -> None:
        text = rules if isinstance(rules, str) else toml_dump({**config, "acl": rules})
        acl_daemon.config_path.write_text(text)
        before = acl_daemon.log().count(f'"event": "{expect}"')
        acl_daemon.proc.send_signal(signal.SIGHUP)
        wait_log(acl_daemon, expect, before + 1)

    def bob(report: Callable[[str], None]) -> Any:
        bus = hostbus.connect(sock)
        chat = bus.subscribe("chat.>")
        wide = bus.subscribe(">")
        report("subscribed")

        import threading

        def watch() -> None:
            try:
                chat.next(timeout=30)
                report("chat: got a message")
            except hostbus.PermissionDeniedError as exc:
                report(f"chat ended: {exc}")
            except hostbus.HostbusError as exc:
                report(f"chat: {type(exc).__name__} {exc}")
            try:
                bus.publish("sensors.b", b"bob may now")
                bus.flush()
                report("published")
            except hostbus.HostbusError as exc:
                report(f"publish: {type(exc).__name__} {exc}")
            try:  # the filtered '>' stays and now sees sensors.b
                report(f"wide: {wide.next(timeout=10).topic}")
            except hostbus.HostbusError as exc:
                report(f"wide: {type(exc).__name__} {exc}")

        threading.Thread(target=watch, daemon=True).start()
        return bus

    with acl_daemon.connect("watcher") as watcher:
        sensors = watcher.subscribe("sensors.>")
        with held(*people.bob, bob) as h:
            assert h.line() == "subscribed"
            assert h.line() == "ready"
            # An invalid file keeps the old rules, and says why.
            reload("[[acl]]\ntopic = 'x.>'\npublish = ['nobody-here']\n", expect="reload_failed")
            assert "principal 'nobody-here'" in acl_daemon.log()
            # New rules: chat no longer for bob; sensors.b published by bob, seen by everyone.
            reload([{"topic": "chat.>", "subscribe": ["user:hb-alice"]},
                    {"topic": "sensors.>", "publish": ["user:hb-bob"], "subscribe": ["*"]}])
            assert h.line().startswith("chat ended: subscription ended by new access rules")
            assert h.line() == "published"
            assert h.line() == "wide: sensors.b"
            msg = sensors.next(timeout=5)
            assert (msg.topic, msg.sender.uid) == ("sensors.b", people.bob[0])
            assert watcher.stats()["access"]["denied"].get("ended") == 1
            # And removed again: bob's publish is refused from the next message on.
            reload([{"topic": "sensors.>", "subscribe": ["*"]}])

        def bob_again() -> None:
            with hostbus.connect(sock) as bus:
                bus.publish("sensors.b", b"no more")
                with pytest.raises(hostbus.PermissionDeniedError):
                    bus.flush()

        assert people.as_bob(bob_again) == 0
        nothing_more(sensors)


# ---- per-uid limits --------------------------------------------------------------------------------


def test_one_user_at_its_limits_leaves_the_others_untouched(
        start_daemon: Callable[..., Daemon], workdir: Path, people: People) -> None:
    d = open_daemon(start_daemon, workdir, {
        "limits": {"max_connections_per_uid": 3, "max_subscriptions_per_uid": 4,
                   "max_queued_bytes_per_uid": 65536},
        "subscriptions": {"policy": "drop-oldest"},
    })
    sock = d.socket

    def bob_exhausts(report: Callable[[str], None]) -> Any:
        buses = [hostbus.connect(sock) for _ in range(2)]
        for i in range(4):
            buses[i % 2].subscribe(f"load.{i}")
        try:
            buses[0].subscribe("load.more")
        except hostbus.LimitExceededError as exc:
            report(f"subscription refused: {exc}")
        # A third connection that never reads: what it is sent waits in the broker, bounded per uid.
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(str(sock))
        from hostbus import wire

        raw.sendall(wire.encode_hello("stalled", "raw", wire.PROTOCOL_VERSION))
        try:
            hostbus.connect(sock)
            report("fourth connection accepted")
        except hostbus.HostbusError as exc:
            report(f"connection refused: {exc}")
        return buses, raw

    with held(*people.bob, bob_exhausts) as h:
        assert h.line().startswith("subscription refused: uid")
        refusal = h.line()
        assert "limits.max_connections_per_uid" in refusal, refusal
        assert h.line() == "ready"

        def alice_works() -> None:
            buses = [hostbus.connect(sock) for _ in range(3)]
            subs = [b.subscribe(f"a.{i}") for i, b in enumerate(buses)]
            subs.append(buses[0].subscribe("a.3"))
            for i in range(4):
                buses[1].publish(f"a.{i}", b"x" * 1000)
            buses[1].flush()
            for s in subs:
                assert s.next(timeout=5).data == b"x" * 1000
            for b in buses:
                b.close()

        assert people.as_alice(alice_works) == 0
        with d.connect("root") as root:
            st = root.stats()
            bob = st["uids"][str(people.bob[0])]
            assert bob["connections"] == 3 and bob["subscriptions"] == 4
            assert st["access"]["denied"]["connection_limit"] == 1
            assert str(people.alice[0]) not in st["uids"]  # everything alice held was given back
        assert h.release() == 0
    with d.connect("root") as root:
        assert str(people.bob[0]) not in root.stats()["uids"]


def test_queued_bytes_are_bounded_per_uid(start_daemon: Callable[..., Daemon], workdir: Path,
                                          people: People) -> None:
    d = open_daemon(start_daemon, workdir, {"limits": {"max_queued_bytes_per_uid": 65536}})
    sock = d.socket

    def bob_stalls(report: Callable[[str], None]) -> Any:
        return stalled_connections(sock, 3, "flood")

    with held(*people.bob, bob_stalls) as h, d.connect("alice-ish") as reader:
        assert h.line() == "ready"
        sub = reader.subscribe("flood")
        time.sleep(0.2)
        n = 3000
        got = 0
        for i in range(n):
            reader.publish("flood", b"y" * 1024)
            if i % 50 == 49:  # small batches: this reader never falls behind
                reader.flush()
                while True:  # keep reading, so only bob's connections stall
                    try:
                        sub.next(timeout=0.01)
                        got += 1
                    except hostbus.TimeoutError:
                        break
        reader.flush()
        with contextlib.suppress(hostbus.TimeoutError):
            while True:
                sub.next(timeout=0.5)
                got += 1
        assert got == n  # the reading subscriber lost nothing
        st = reader.stats()
        bob = st["uids"][str(people.bob[0])]
        # What the broker holds for bob's uid: queued, plus written to transports that do not send
        # it; the bound is checked before each message, so it is passed by at most one.
        assert 0 < bob["queued_bytes"] + bob["written_bytes"] <= 65536 + 1024 + 100
        assert st["messages"]["dropped"] > 0  # bob's overflow was dropped, and counted


# ---- unit principal --------------------------------------------------------------------------------


def _cgroup_root() -> Path | None:
    """A writable cgroup hierarchy that /proc/PID/cgroup reports the way the broker reads it."""
    text = Path("/proc/self/cgroup").read_text()
    candidates = []
    if ":name=systemd:" in text:
        candidates.append(Path("/sys/fs/cgroup/systemd"))
    else:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split(" - ")
            if len(fields) == 2 and fields[1].startswith("cgroup2 "):
                candidates.append(Path(line.split()[4]))
    for root in candidates:
        if (root / "cgroup.procs").exists() and os.access(root, os.W_OK):
            return root
    return None


def test_a_rule_for_a_systemd_unit(start_daemon: Callable[..., Daemon], workdir: Path, people: People) -> None:
    root = _cgroup_root()
    if root is None:
        pytest.skip("no writable cgroup hierarchy here to put a process in a unit's cgroup "
                    "(the cgroup parser is tested in tests/unit/test_acl.py)")
    unit_dir = root / "hostbus-test.slice" / f"hb-acl-{os.getpid()}.service"
    unit_dir.mkdir(parents=True, exist_ok=True)
    try:
        d = open_daemon(start_daemon, workdir, {"access": {"default": "deny"}, "acl": [
            {"topic": "units.>", "publish": [f"unit:{unit_dir.name}"], "subscribe": ["*"]}]})
        sock = d.socket

        def in_unit() -> None:
            with hostbus.connect(sock) as bus:
                assert bus.identity["unit"] == unit_dir.name
                bus.publish("units.hello", b"from the unit")
                bus.flush()

        def outside() -> None:
            with hostbus.connect(sock) as bus:
                assert bus.identity["unit"] != unit_dir.name
                bus.publish("units.hello", b"not from the unit")
                with pytest.raises(hostbus.PermissionDeniedError):
                    bus.flush()

        def enter_unit_then(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                (unit_dir / "cgroup.procs").write_text(str(os.getpid()))
                fn()
            return run

        with d.connect("watcher") as watcher:
            sub = watcher.subscribe("units.>")
            assert run_as(0, 0, enter_unit_then(in_unit)) == 0
            assert people.as_bob(outside) == 0
            msg = sub.next(timeout=5)
            assert msg.data == b"from the unit"
            nothing_more(sub)
    finally:
        for _ in range(50):
            try:
                unit_dir.rmdir()
                break
            except OSError:  # the child's exit is still being accounted
                time.sleep(0.05)
        with contextlib.suppress(OSError):
            unit_dir.parent.rmdir()


# ---- files -------------------------------------------------------------------------------------------


def test_socket_and_fifo_groups_decide_who_may_connect_and_write(
        start_daemon: Callable[..., Daemon], workdir: Path, people: People) -> None:
    workdir.chmod(0o755)
    d = start_daemon({
        "socket": {"dir_mode": 0o750, "mode": 0o660, "group": "hb-sensors"},
        "fifo": {"ingress": [{"path": "sensors.fifo", "mode": 0o620, "group": "hb-sensors"}]},
    })
    d.workdir.chmod(0o755)
    run_st, sock_st = os.stat(d.runtime_dir), os.stat(d.socket)
    fifo_st = os.stat(d.runtime_dir / "sensors.fifo")
    assert (stat.S_IMODE(run_st.st_mode), run_st.st_gid) == (0o750, people.sensors)
    assert (stat.S_IMODE(sock_st.st_mode), sock_st.st_gid) == (0o660, people.sensors)
    assert (stat.S_IMODE(fifo_st.st_mode), fifo_st.st_gid) == (0o620, people.sensors)
    assert [p.name for p in d.runtime_dir.iterdir() if p.name.startswith(".")] == []  # no temporary name left
    sock, fifo = str(d.socket), str(d.runtime_dir / "sensors.fifo")

    def member() -> None:
        with hostbus.connect(sock) as bus:
            bus.publish("ok", b"")
            bus.flush()
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    def stranger() -> None:
        with pytest.raises(hostbus.ConnectionLostError):
            hostbus.connect(sock)
        with pytest.raises(PermissionError):
            os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)

    assert people.as_alice(member) == 0
    assert people.as_bob(stranger) == 0


def test_an_existing_runtime_directory_of_another_group_is_refused(workdir: Path, people: People) -> None:
    run = workdir / "run"
    run.mkdir(mode=0o750)
    (workdir / "hostbus.toml").write_text(toml_dump({"socket": {"group": "hb-sensors"}}))
    r = subprocess.run([*HOSTBUSD, "--config", str(workdir / "hostbus.toml"), "--runtime-dir", str(run),
                        "--state-dir", str(workdir / "state")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "exists with group 0, not socket.group's" in r.stdout + r.stderr
    assert os.stat(run).st_gid == 0 and stat.S_IMODE(os.stat(run).st_mode) == 0o750  # left as it was
    assert list(run.iterdir()) == []


# ---- whoami --------------------------------------------------------------------------------------------


def test_whoami_shows_identity_and_what_it_may_do(acl_daemon: Daemon, people: People) -> None:
    sock = str(acl_daemon.socket)
    r, w = os.pipe()

    def alice() -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["--socket", sock, "whoami", "--topic", "sensors.private.x"]) == 0
            assert cli.main(["--socket", sock, "whoami", "--topic", ">", "--json"]) == 0
        os.write(w, out.getvalue().encode())

    assert people.as_alice(alice) == 0
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    table, _, as_json = text.partition("{")
    assert f"uid        {people.alice[0]} (hb-alice)" in table
    assert "hb-sensors" in table
    assert "publish    yes         acl rule 0 (topic 'sensors.>'): publish allowed to group:hb-sensors" in table
    assert "subscribe  yes         acl rule 1 (topic 'sensors.private.>'): subscribe allowed to user:hb-alice" in table
    assert "manage     no          access.default (deny)" in table
    me = json.loads("{" + as_json)
    assert me["access"]["subscribe"]["allowed"] == "some topics"
    assert me["identity"]["principals"] == sorted(
        ["*", f"uid:{people.alice[0]}", "user:hb-alice", "group:hb-alice", "group:hb-sensors"])


def test_the_system_instance_denies_by_default() -> None:
    """The default itself, decided by where the instance lives (unit-level: /run/hostbus may be taken)."""
    from hostbusd.config import Config
    from hostbusd.core.hub import build_policy

    assert build_policy(Config(), system=True).default_allow is False
    assert build_policy(Config(), system=False).default_allow is True
    assert build_policy(Config.model_validate({"access": {"default": "allow"}}), system=True).default_allow

