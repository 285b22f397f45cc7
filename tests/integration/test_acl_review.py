"""Review of access control and per-uid accounting (git diff 04b820f..HEAD): one test per defect.

Each test states what docs/security.md (or a docstring) promises; each failed before its fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import hostbus
from hostbus import wire
from hostbusd.errors import StartupError
from hostbusd.main import bind_socket, prepare_dir
from tests.conftest import Daemon, run_as
from tests.integration.test_acl import (
    RULES,
    People,
    _cgroup_root,
    held,
    nothing_more,
    open_daemon,
    serve_time,
    stalled_connections,
)
from tests.integration.test_zmq import ZSub, endpoints


@pytest.fixture(scope="module")
def people() -> People:
    return People()


@pytest.fixture
def acl_daemon(start_daemon: Callable[..., Daemon], workdir: Path, people: People) -> Daemon:
    return open_daemon(start_daemon, workdir, {"access": {"default": "deny"}, "acl": RULES})


def alive(d: Daemon) -> None:
    """The daemon still serves (a crash shows as exit status 70 in the assertion)."""
    try:
        with d.connect("probe") as bus:
            bus.stats()
    except hostbus.HostbusError as exc:
        raise AssertionError(f"the daemon is gone (exit status {d.proc.poll()}): {exc}") from None


@contextlib.contextmanager
def unit_cgroup(name: bytes) -> Iterator[Path]:
    """A cgroup directory named ``name`` under a test slice, as a unit's cgroup; skip without one."""
    root = _cgroup_root()
    if root is None:
        pytest.skip("no writable cgroup hierarchy here")
    slice_dir = os.fsencode(root / "hostbus-review.slice")
    path = os.path.join(slice_dir, name)
    os.makedirs(path, exist_ok=True)
    try:
        yield Path(os.fsdecode(path))
    finally:
        for _ in range(100):
            try:
                os.rmdir(path)
                break
            except OSError:  # the last process's exit is still being accounted
                time.sleep(0.05)
        with contextlib.suppress(OSError):
            os.rmdir(slice_dir)


# ---- 1. the daemon can be killed through its new credential code -----------------------------------------


@pytest.mark.needs_root
def test_a_cgroup_name_that_is_not_utf8_does_not_kill_the_daemon(
        start_daemon: Callable[..., Daemon], workdir: Path) -> None:
    # Any user owns a delegated cgroup subtree (user@UID.service) and may name a child cgroup as it likes.
    d = open_daemon(start_daemon, workdir, {})
    with unit_cgroup(b"hb-\xff.service") as cg:
        def connect_from_the_cgroup() -> None:
            (cg / "cgroup.procs").write_text(str(os.getpid()))
            with contextlib.suppress(hostbus.HostbusError), hostbus.connect(d.socket) as bus:
                bus.whoami()

        run_as(0, 0, connect_from_the_cgroup)
        time.sleep(0.2)
        alive(d)


@pytest.mark.needs_root
def test_a_peer_with_a_large_uid_does_not_kill_the_daemon(start_daemon: Callable[..., Daemon],
                                                         workdir: Path) -> None:
    d = open_daemon(start_daemon, workdir, {})
    big = 3_000_000_000  # a valid Linux uid (any value below 2**32 - 1)

    def connect() -> None:
        with contextlib.suppress(hostbus.HostbusError), hostbus.connect(d.socket) as bus:
            bus.whoami()

    run_as(big, big, connect)
    time.sleep(0.2)
    alive(d)


def test_a_zmq_inbox_prefix_does_not_kill_the_daemon(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"zmq": {"enabled": True}})
    _, xpub = endpoints(d)
    ZSub(xpub, ["_INBOX.x"], 1, timeout=0.5).result()
    time.sleep(0.2)
    alive(d)


# ---- 2. a '!unit:' refusal is bypassed by a process whose pid is gone at accept --------------------------


@pytest.mark.needs_root
def test_a_refused_unit_cannot_escape_by_exiting_before_accept(
        start_daemon: Callable[..., Daemon], workdir: Path, people: People) -> None:
    name = f"hb-rev-{os.getpid()}.service"
    with unit_cgroup(name.encode()) as cg:
        d = open_daemon(start_daemon, workdir, {"access": {"default": "deny"}, "acl": [
            {"topic": "chat.>", "publish": ["*", f"!unit:{name}"], "subscribe": ["*"]}]})
        sock = str(d.socket)

        def in_unit_refused() -> None:  # the control: the rule does refuse a process of that unit
            (cg / "cgroup.procs").write_text(str(os.getpid()))
            with hostbus.connect(sock) as bus:
                assert str(bus.identity["unit"]) == name  # (Bus.identity is typed dict[str, int])
                bus.publish("chat.x", b"refused")
                with pytest.raises(hostbus.PermissionDeniedError):
                    bus.flush()

        assert run_as(0, 0, in_unit_refused) == 0
        with d.connect("watcher") as watcher:
            sub = watcher.subscribe("chat.>")
            go_r, go_w = os.pipe()
            os.kill(d.pid, signal.SIGSTOP)  # a busy broker: accept comes later than connect
            try:
                child = os.fork()
                if child == 0:  # in the refused unit: connect (into the backlog), hand over, exit
                    code = 1
                    try:
                        os.close(go_w)
                        (cg / "cgroup.procs").write_text(str(os.getpid()))
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s.connect(sock)
                        if os.fork() == 0:  # keeps the connection, same unit
                            try:
                                os.read(go_r, 1)
                                s.sendall(wire.encode_hello("escapee", "raw", wire.PROTOCOL_VERSION)
                                          + wire.encode_pub(b"chat.x", b"from the refused unit")
                                          + wire.encode_u32(wire.FrameType.PING, 7))
                                s.settimeout(5)
                                got = b""
                                while wire.encode_u32(wire.FrameType.PONG, 7) not in got:
                                    chunk = s.recv(65536)
                                    if not chunk:
                                        break
                                    got += chunk
                            finally:
                                os._exit(0)
                        code = 0
                    finally:
                        os._exit(code)
                os.close(go_r)
                assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0  # its pid is gone now
            finally:
                os.kill(d.pid, signal.SIGCONT)
            os.write(go_w, b"g")
            os.close(go_w)
            # The publish must be refused like any other from that unit.
            nothing_more(sub, 1.0)


# ---- 3. publishing what one may not, through another peer --------------------------------------------------


@pytest.mark.needs_root
def test_a_request_cannot_aim_the_reply_at_a_topic_the_requester_may_not_publish(
        acl_daemon: Daemon, people: People) -> None:
    sock = acl_daemon.socket

    def alice_serves(report: Callable[[str], None]) -> Any:
        return serve_time(sock)

    def bob_aims() -> None:
        with hostbus.connect(sock) as bus:
            bus.publish("sensors.kitchen", b"forged")  # refused: bob may not publish sensors.>
            with pytest.raises(hostbus.PermissionDeniedError):
                bus.flush()
            with contextlib.suppress(hostbus.PermissionDeniedError):
                bus.publish("svc.time", b"", reply_to="sensors.kitchen")  # bob may publish svc.time
                bus.flush()

    with acl_daemon.connect("watcher") as watcher:
        sensors = watcher.subscribe("sensors.>")
        with held(*people.alice, alice_serves, groups=[people.sensors]) as h:
            assert h.line() == "ready"
            assert people.as_bob(bob_aims) == 0
            nothing_more(sensors, 1.0)  # nothing bob could not publish himself


@pytest.mark.needs_root
def test_a_reused_uid_does_not_inherit_the_old_users_name(
        start_daemon: Callable[..., Daemon], workdir: Path) -> None:
    import pwd
    import subprocess

    uid = next(u for u in range(23000, 24000) if not _uid_taken(u))
    old, new = f"hb-rev-o{os.getpid() % 100000}", f"hb-rev-n{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--no-create-home", "-u", str(uid), "-U", old], check=True)
    try:
        gid = pwd.getpwnam(old).pw_gid
        d = open_daemon(start_daemon, workdir, {"access": {"default": "deny"}, "acl": [
            {"topic": "chat.>", "publish": [f"user:{old}"], "subscribe": ["*"]}]})
        sock = d.socket

        def as_old() -> None:
            with hostbus.connect(sock) as bus:
                bus.publish("chat.x", b"old may")
                bus.flush()

        assert run_as(uid, gid, as_old) == 0
        subprocess.run(["userdel", old], check=True)
        subprocess.run(["useradd", "--system", "--no-create-home", "-u", str(uid), "-U", new], check=True)
        gid = pwd.getpwnam(new).pw_gid
        identity: dict[str, Any] = {}
        r, w = os.pipe()

        def as_new() -> None:
            with hostbus.connect(sock) as bus:
                os.write(w, json.dumps(bus.welcome["identity"]).encode())

        assert run_as(uid, gid, as_new) == 0
        os.close(w)
        with os.fdopen(r) as f:
            identity = json.loads(f.read())
        assert identity["user"] == new and f"user:{old}" not in identity["principals"], identity
    finally:
        for name in (old, new):
            subprocess.run(["userdel", name], capture_output=True)
            subprocess.run(["groupdel", name], capture_output=True)


def _uid_taken(uid: int) -> bool:
    import pwd

    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


# ---- 4. what one may not see, outside the message path -----------------------------------------------------


@pytest.mark.needs_root
def test_stats_do_not_show_topics_the_caller_may_not_subscribe(acl_daemon: Daemon, people: People) -> None:
    sock = acl_daemon.socket

    def alice() -> None:
        with hostbus.connect(sock) as bus:
            bus.publish("sensors.private.diary-of-alice", b"dear diary")
            bus.flush()

    def bob() -> None:
        with hostbus.connect(sock) as bus:
            with pytest.raises(hostbus.PermissionDeniedError):
                bus.subscribe("sensors.private.diary-of-alice")
            topics = bus.stats()["topics"]
            assert "sensors.private.diary-of-alice" not in topics, topics

    assert people.as_alice(alice) == 0
    assert people.as_bob(bob) == 0


@pytest.mark.needs_root
def test_a_root_instance_that_everyone_can_reach_does_not_default_to_allow(
        start_daemon: Callable[..., Daemon], workdir: Path, people: People) -> None:
    workdir.chmod(0o755)
    d = start_daemon({"access": {}})  # root, not /run/hostbus, no modes or access.default: root's defaults
    d.workdir.chmod(0o755)
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o666
    sock = d.socket

    def bob() -> None:
        with hostbus.connect(sock) as bus:
            assert bus.whoami("anything.at.all")["access"]["publish"]["allowed"] is False

    assert people.as_bob(bob) == 0


# ---- 5. one uid takes what the others need -----------------------------------------------------------------


@pytest.mark.needs_root
def test_one_user_cannot_fill_the_retained_store_for_the_others(
        start_daemon: Callable[..., Daemon], workdir: Path, people: People) -> None:
    d = open_daemon(start_daemon, workdir, {"access": {"default": "allow"},
                                            "retained": {"max_topics": 4, "max_topics_per_uid": 2}})
    sock = d.socket

    def bob_fills() -> None:
        with hostbus.connect(sock) as bus:
            for i in range(10):
                bus.publish(f"bob.{i}", b"mine", retain=True)
            with contextlib.suppress(hostbus.LimitExceededError):
                bus.flush()

    def alice_retains() -> None:
        with hostbus.connect(sock) as bus:
            bus.publish("alice.status", b"online", retain=True)
            bus.flush()  # LimitExceededError: the store is full of bob's topics

    assert people.as_bob(bob_fills) == 0
    assert people.as_alice(alice_retains) == 0


@pytest.mark.needs_root
def test_queued_bytes_per_uid_bound_what_stalled_connections_hold(
        start_daemon: Callable[..., Daemon], workdir: Path, people: People) -> None:
    bound = 65536
    d = open_daemon(start_daemon, workdir, {"limits": {"max_queued_bytes_per_uid": bound}})
    sock = d.socket
    n, size = 16, 4 * 1024 * 1024

    def bob_stalls(report: Callable[[str], None]) -> Any:
        return stalled_connections(sock, n, "big")

    with held(*people.bob, bob_stalls) as h, d.connect("publisher") as pub:
        assert h.line() == "ready"
        time.sleep(0.3)
        before = d.status()["VmRSS"] * 1024
        pub.publish("big", b"z" * size)
        pub.flush()
        time.sleep(0.3)
        held_now = d.status()["VmRSS"] * 1024 - before
        queued = pub.stats()["uids"][str(people.bob[0])]["queued_bytes"]
        assert queued <= bound
        # Allow the message's two buffers, which the heap keeps for reuse once freed (KEEP_BYTES
        # in hostbus._heap), and 8 MiB for the allocator; unbounded, bob's uid would make the broker
        # hold about n x size (64 MiB).
        assert held_now <= bound + 2 * size + 8 * 1024 * 1024, f"{held_now / 2**20:.0f} MiB held for bob's uid"


# ---- 6. socket.group: directories and sockets ---------------------------------------------------------------


@pytest.mark.needs_root
def test_a_directory_that_cannot_be_made_is_not_blamed_on_socket_group(workdir: Path, people: People) -> None:
    workdir.chmod(0o755)
    locked = workdir / "locked"
    locked.mkdir(mode=0o755)  # root's: bob may not create anything in it

    def bob() -> None:
        with pytest.raises(StartupError) as err:
            prepare_dir(locked / "run", 0o700)  # no group asked for
        assert "socket.group" not in str(err.value), str(err.value)

    assert people.as_bob(bob) == 0


@pytest.mark.needs_root
def test_a_failed_group_change_leaves_no_directory_behind(workdir: Path, people: People) -> None:
    workdir.chmod(0o755)
    mine = workdir / "bobs"
    mine.mkdir()
    os.chown(mine, people.bob[0], people.bob[1])
    target = mine / "run"
    sensors = people.sensors

    def bob() -> None:  # not a member of hb-sensors: the chown fails
        with pytest.raises(StartupError):
            prepare_dir(target, 0o750, sensors)

    assert people.as_bob(bob) == 0
    assert not target.exists(), f"left behind: mode {stat.S_IMODE(os.stat(target).st_mode):o}"


@pytest.mark.needs_root
def test_a_socket_group_the_daemon_is_not_in_is_named(workdir: Path, people: People) -> None:
    workdir.chmod(0o755)
    run = workdir / "run"
    run.mkdir(mode=0o750)
    os.chown(run, people.bob[0], people.sensors)  # e.g. made by systemd with the right group
    sensors = people.sensors

    def bob() -> None:  # bob runs the daemon but is not a member of the group
        with pytest.raises(StartupError) as err:
            bind_socket(run / "hostbus.sock", 0o660, sensors)
        assert sorted(os.listdir(run)) == []  # no temporary name left (this part holds)
        assert "socket.group" in str(err.value), str(err.value)

    assert people.as_bob(bob) == 0


def test_binding_with_a_group_does_not_replace_a_socket_that_appeared_meanwhile(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = workdir / "hostbus.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    real_chown = os.chown

    def chown_while_another_daemon_starts(p: Any, uid: int, gid: int) -> None:
        if not path.exists():
            other.bind(str(path))  # the other daemon binds between our probe and our rename
            other.listen()
        real_chown(p, uid, gid)

    monkeypatch.setattr(os, "chown", chown_while_another_daemon_starts)
    try:
        with pytest.raises(StartupError):
            bind_socket(path, 0o660, os.getgid()).close()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))  # still the other daemon's
        conn, _ = other.accept()
        conn.close()
        probe.close()
    finally:
        other.close()
