"""Sender identity: stamped by the broker from SO_PEERCRED, never taken from the client."""

from __future__ import annotations

import os
import socket

import pytest

import hostbus
from hostbus import wire
from tests.conftest import Daemon, ensure_user, run_as


def test_messages_carry_the_publishers_kernel_identity(bus: hostbus.Bus) -> None:
    sub = bus.subscribe("who")
    bus.publish("who", b"me")
    msg = sub.next(timeout=5)
    assert msg.sender == hostbus.Sender(os.getuid(), os.getgid(), os.getpid(), "")
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    assert {k: bus.identity[k] for k in ("uid", "gid", "pid", "user")} == {
        "uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(), "user": user}
    assert {"*", f"uid:{os.getuid()}", f"user:{user}"} <= set(bus.identity["principals"])


@pytest.mark.needs_root
def test_identity_of_another_user_is_seen_and_cannot_be_claimed(shared_daemon: Daemon) -> None:
    uid, gid = ensure_user("hostbus-test")
    sock = shared_daemon.socket
    with shared_daemon.connect("watcher") as watcher:
        sub = watcher.subscribe("id.>")

        def publish_as_other_user() -> None:
            with hostbus.connect(sock) as bus:
                assert bus.identity["uid"] == uid
                # Headers that look like identity are just headers.
                bus.publish("id.claim", b"I am root", headers={"uid": "0", "sender": "0:0:1"})
                bus.flush()

        assert run_as(uid, gid, publish_as_other_user) == 0
        msg = sub.next(timeout=5)
        assert msg.data == b"I am root"
        assert msg.sender.uid == uid
        assert msg.sender.gid == gid
        assert msg.sender.pid != os.getpid()
        assert msg.headers == {"uid": "0", "sender": "0:0:1"}


def test_a_client_cannot_send_sender_frames(daemon: Daemon) -> None:
    with daemon.connect("watcher") as watcher:
        sub = watcher.subscribe(">")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(daemon.socket))
        s.sendall(wire.encode_hello("forger", "raw", wire.PROTOCOL_VERSION))
        # A SENDER frame (broker -> client type) claiming uid 0, then a publish.
        s.sendall(wire.encode_sender(1, 0, 0, 1) + wire.encode_pub(b"forged", b"x"))
        dec = wire.Decoder(wire.SERVER_FRAMES, 1 << 20)
        frames = []
        s.settimeout(5)
        while True:
            data = s.recv(65536)
            if not data:
                break
            dec.feed(data)
            frames += dec.frames()
        s.close()
        err = [f for f in frames if f.type == wire.FrameType.ERR]
        assert err and wire.decode_err(err[-1].body)[0] == hostbus.ErrorCode.UNKNOWN_FRAME
        with pytest.raises(hostbus.TimeoutError):
            sub.next(timeout=0.3)  # the forged publish never went out
