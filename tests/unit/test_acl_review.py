"""Review of access control and per-uid accounting (git diff 04b820f..HEAD): pure-logic defects.

Each test failed before its fix.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import pytest

from hostbus import wire
from hostbusd.config import Config
from hostbusd.core.acl import DECISION_CACHE, Access, Policy, Principals
from hostbusd.core.hub import Hub
from hostbusd.core.peer import PeerCore

BOB = Principals.of_peer(1001, 1001, (), "bob", ("bob",), None)
LIMITS = Config().limits


def _held_by(fill: Callable[[Access], None]) -> int:
    """Bytes an Access keeps after ``fill`` (its decision caches)."""
    policy = Policy([("sensors.>", {"publish": ["group:sensors"]}), ("chat.>", {"publish": ["*", "!user:bob"]})],
                    False)
    access = policy.access(BOB)
    assert access is not None
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill(access)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_a_connections_decision_cache_stays_within_its_share_of_the_uid_memory() -> None:
    share = LIMITS.max_queued_bytes_per_uid // LIMITS.max_connections_per_uid  # 1 MiB
    long_prefix = "x" * 480

    def refused_publishes(access: Access) -> None:  # each one refused, each one remembered
        for i in range(DECISION_CACHE):
            assert not access.publish(f"{long_prefix}.{i}").allowed

    held = _held_by(refused_publishes)
    assert held <= share, f"{held / 2**20:.1f} MiB for one connection"


def test_replies_to_inboxes_are_not_cached() -> None:
    def replies(access: Access) -> None:
        for i in range(20000):
            assert access.publish(f"_INBOX.0123456789abcdef.{i}").allowed

    assert _held_by(replies) < 256 * 1024


def _admitted(hub: Hub, principals: Principals = BOB) -> PeerCore:
    core = PeerCore(hub, hub.identity(principals.uid, principals.gid, 4242))
    assert hub.admit(core.session, principals) is None
    return core


@pytest.mark.parametrize("topic", ["_INBOX.0123456789abcdef.1", "_INBOX.>"])
def test_whoami_says_inbox_topics_cannot_be_subscribed(topic: str) -> None:
    hub = Hub(Config.model_validate({"access": {"default": "allow"}}))
    core = _admitted(hub)
    core.receive(wire.encode_hello("bob", "test", wire.PROTOCOL_VERSION))
    assert hub.may(core.session, topic)["subscribe"]["allowed"] is False


def test_a_session_in_its_handshake_during_a_reload_gets_the_new_per_uid_bound() -> None:
    small = {"limits": {"max_queued_bytes_per_uid": 65536}}
    large = {"limits": {"max_queued_bytes_per_uid": 1024 * 1024}}
    hub = Hub(Config.model_validate(small))
    core = _admitted(hub)  # accepted, HELLO not yet received
    hub.apply_config(Config.model_validate(large))
    core.receive(wire.encode_hello("bob", "test", wire.PROTOCOL_VERSION))
    assert core.session.account_max_queued == 1024 * 1024


def test_a_refused_subscription_is_logged_with_its_pattern_and_rule() -> None:
    logged: list[tuple[str, dict[str, object]]] = []
    hub = Hub(Config.model_validate({"access": {"default": "deny"}}),
              lambda kind, **fields: logged.append((kind, fields)))
    core = _admitted(hub)
    core.receive(wire.encode_hello("bob", "test", wire.PROTOCOL_VERSION)
                 + wire.encode_sub(1, {"pattern": "secret.>"}))
    fields = next(f for k, f in logged if k == "subscribe_refused")
    assert {"uid", "pid", "rule"} <= fields.keys() and ({"topic", "pattern"} & fields.keys()), fields
