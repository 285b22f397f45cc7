"""Routing against a real daemon: wildcards, fan-out, queue groups, request/reply, retained, headers."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

import hostbus
from tests.conftest import Daemon
from tests.helpers.subs import drain


def test_wildcards_match_as_documented(bus: hostbus.Bus) -> None:
    star = bus.subscribe("sensors.*.temp")
    tail = bus.subscribe("sensors.>")
    exact = bus.subscribe("sensors.kitchen.temp")
    everything = bus.subscribe(">")
    for topic in ("sensors.kitchen.temp", "sensors.hall.temp", "sensors.kitchen.humidity",
                  "sensors.kitchen.temp.raw", "sensors", "other.kitchen.temp"):
        bus.publish(topic, topic.encode())
    bus.flush()
    assert [m.topic for m in drain(star)] == ["sensors.kitchen.temp", "sensors.hall.temp"]
    assert [m.topic for m in drain(tail)] == ["sensors.kitchen.temp", "sensors.hall.temp",
                                              "sensors.kitchen.humidity", "sensors.kitchen.temp.raw"]
    assert [m.topic for m in drain(exact)] == ["sensors.kitchen.temp"]
    assert len(drain(everything)) == 6


def test_fan_out_reaches_every_subscriber_on_other_connections(daemon: Daemon) -> None:
    subs_buses = [daemon.connect(f"s{i}") for i in range(3)]
    try:
        subs = [b.subscribe("news.>") for b in subs_buses]
        with daemon.connect("pub") as pub:
            for i in range(500):
                pub.publish("news.x", str(i))
            pub.flush()
        for sub in subs:
            got = [int(m.data) for m in drain(sub)]
            assert got == list(range(500))  # complete and in order
    finally:
        for b in subs_buses:
            b.close()


def test_queue_group_delivers_each_message_to_exactly_one_member(daemon: Daemon) -> None:
    members = [daemon.connect(f"w{i}") for i in range(3)]
    try:
        subs = [b.subscribe("jobs.*", group="workers") for b in members]
        plain = members[0].subscribe("jobs.*")  # a plain subscription still sees everything
        with daemon.connect("pub") as pub:
            for i in range(300):
                pub.publish("jobs.resize", str(i))
            pub.flush()
        seen = [int(m.data) for sub in subs for m in drain(sub)]
        counts = Counter(seen)
        assert sorted(counts) == list(range(300))
        assert set(counts.values()) == {1}  # never twice
        per_member = [len(drain(s, 0.05)) for s in subs]  # drained already: nothing left
        assert per_member == [0, 0, 0]
        assert len(drain(plain)) == 300
    finally:
        for b in members:
            b.close()


def test_queue_group_shares_load_between_members(daemon: Daemon) -> None:
    a, b = daemon.connect("a"), daemon.connect("b")
    try:
        sa = a.subscribe("work", group="g")
        sb = b.subscribe("work", group="g")
        with daemon.connect("pub") as pub:
            for i in range(100):
                pub.publish("work", str(i))
            pub.flush()
        na, nb = len(drain(sa)), len(drain(sb))
        assert na + nb == 100
        assert na > 0 and nb > 0
    finally:
        a.close()
        b.close()


def test_request_reply_round_trip(daemon: Daemon) -> None:
    with daemon.connect("responder") as responder, daemon.connect("requester") as requester:
        sub = responder.subscribe("math.double")

        def serve() -> None:
            for _ in range(3):
                msg = sub.next(timeout=5)
                msg.respond(str(int(msg.data) * 2), headers={"served-by": "responder"})

        t = threading.Thread(target=serve)
        t.start()
        try:
            for n in (1, 21, 100):
                reply = requester.request("math.double", str(n), timeout=5)
                assert int(reply.data) == 2 * n
                assert reply.headers == {"served-by": "responder"}
                assert reply.sender.pid == responder.identity["pid"]
        finally:
            t.join()


def test_request_without_responders_fails_at_once(bus: hostbus.Bus) -> None:
    import time

    t0 = time.monotonic()
    with pytest.raises(hostbus.NoRespondersError):
        bus.request("nobody.listens", b"?", timeout=30)
    assert time.monotonic() - t0 < 10  # immediate, not after the 30 s timeout


def test_request_timeout_when_responder_stays_silent(bus: hostbus.Bus) -> None:
    bus.subscribe("silent.service")  # subscribed, never answers
    with pytest.raises(hostbus.TimeoutError):
        bus.request("silent.service", b"?", timeout=0.3)
    with pytest.raises(TimeoutError):  # also the builtin
        bus.request("silent.service", b"?", timeout=0.1)


def test_inbox_replies_reach_only_the_requester(daemon: Daemon) -> None:
    with daemon.connect("snoop") as snoop, daemon.connect("req") as req, daemon.connect("resp") as resp:
        with pytest.raises(hostbus.PermissionDeniedError):
            snoop.subscribe("_INBOX.>")
        watch_all = snoop.subscribe(">")
        sub = resp.subscribe("svc")
        t = threading.Thread(target=lambda: sub.next(timeout=5).respond(b"secret"))
        t.start()
        assert req.request("svc", b"q", timeout=5).data == b"secret"
        t.join()
        assert [m.topic for m in drain(watch_all)] == ["svc"]  # the request, never the reply


def test_retained_message_is_delivered_first_to_new_subscribers(daemon: Daemon) -> None:
    with daemon.connect("pub") as pub:
        pub.publish("config.mode", b"eco", retain=True)
        pub.publish("config.mode", b"turbo", retain=True)  # replaces
        pub.publish("config.level", b"3", retain=True)
        pub.publish("config.other", b"not retained")
        pub.flush()
        with daemon.connect("late") as late:
            sub = late.subscribe("config.*")
            pub.publish("config.mode", b"live")
            pub.flush()
            got = drain(sub)
            assert [(m.topic, m.data, m.retained) for m in got] == [
                ("config.mode", b"turbo", True), ("config.level", b"3", True), ("config.mode", b"live", False)]
        pub.publish("config.mode", b"", retain=True)  # empty payload deletes
        pub.flush()
        with daemon.connect("later") as later:
            sub = later.subscribe("config.*")
            assert [(m.topic, m.data) for m in drain(sub)] == [("config.level", b"3")]


def test_headers_arrive_intact(bus: hostbus.Bus) -> None:
    sub = bus.subscribe("h")
    headers = {"content-type": "application/json", "ünïcode": "välue ✓", "empty": ""}
    bus.publish("h", b"{}", headers=headers)
    msg = sub.next(timeout=5)
    assert msg.headers == headers
    assert msg.data == b"{}"


def test_invalid_names_are_refused_with_a_reason(bus: hostbus.Bus) -> None:
    with pytest.raises(hostbus.InvalidTopicError, match="empty token"):
        bus.publish("a..b", b"")
    with pytest.raises(hostbus.InvalidTopicError, match="wildcard"):
        bus.publish("a.*", b"")
    with pytest.raises(hostbus.InvalidTopicError, match="last token"):
        bus.subscribe("a.>.b")
    with pytest.raises(hostbus.InvalidHeadersError):
        bus.publish("a", b"", headers={"": "x"})
    bus.flush()  # the connection is still fine


def test_unsubscribe_stops_delivery(bus: hostbus.Bus) -> None:
    sub = bus.subscribe("u")
    bus.publish("u", b"1")
    bus.flush()
    assert sub.next(timeout=5).data == b"1"
    sub.unsubscribe()
    bus.publish("u", b"2")
    bus.flush()
    with pytest.raises(hostbus.ClosedError):
        sub.next(timeout=0.2)
    assert bus.stats()["subscriptions"] == 0


def test_large_message_up_to_the_frame_limit(daemon: Daemon) -> None:
    with daemon.connect() as bus:
        limit = bus.welcome["limits"]["max_frame_bytes"]
        sub = bus.subscribe("big")
        payload = bytes(range(256)) * ((limit - 64) // 256)
        bus.publish("big", payload)
        assert sub.next(timeout=10).data == payload
        with pytest.raises(hostbus.MessageTooLargeError):
            bus.publish("big", b"x" * limit)


def test_subscription_limit_per_connection(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon({"limits": {"max_subscriptions_per_connection": 3}})
    with d.connect() as bus:
        for i in range(3):
            bus.subscribe(f"t{i}")
        with pytest.raises(hostbus.LimitExceededError, match="max_subscriptions_per_connection"):
            bus.subscribe("t3")
        bus.publish("t0", b"still works")
        bus.flush()


def test_connection_limit(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon({"limits": {"max_connections": 2}})
    a, b = d.connect(), d.connect()
    try:
        with pytest.raises(hostbus.ConnectionLostError, match="max_connections"):
            d.connect()
        assert a.stats()["connections_rejected"] == 1
    finally:
        a.close()
        b.close()
    with d.connect() as c:  # room again
        c.flush()


def test_stats_count_messages_and_topics(bus: hostbus.Bus) -> None:
    sub = bus.subscribe("s.>")
    for _ in range(5):
        bus.publish("s.a", b"x")
    bus.publish("s.b", b"y")
    bus.flush()
    assert len(drain(sub)) == 6
    st = bus.stats()
    assert st["messages"]["in"] == 6
    assert st["messages"]["out"] >= 6
    assert st["topics"]["s.a"] == 5
    assert st["topics"]["s.b"] == 1
    assert st["connections"] == 1
