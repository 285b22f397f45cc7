"""Unit tests of the access rules: hostbusd.core.acl.

Precedence of overlapping rules, ``!`` entries, empty lists, the default, the texts naming what
decided, principals and their validation, the systemd unit of a cgroup, whole-pattern decisions
for subscriptions and the per-peer decision cache.
"""

from __future__ import annotations

import itertools

import pytest

from hostbusd.core import acl
from hostbusd.core.acl import (
    Access,
    Decision,
    Policy,
    Principals,
    covers,
    overlaps,
    principal_problem,
    specificity,
    unit_of_cgroup,
)

Acts = dict[str, list[str] | None]

ALICE = Principals.of_peer(1000, 1000, (1000, 27), "alice", ("alice", "sudo"), "app.service")
BOB = Principals.of_peer(1001, 1001, (1001,), "bob", ("bob",), None)
ANON = Principals.of_peer(4242, 4242, (), None, (), None)  # no passwd entry, no group names, no unit
FEED = Principals.named("zmq:feed")


def policy(*rules: tuple[str, Acts], default: str = "deny") -> Policy:
    return Policy(list(rules), default == "allow")


def pub(p: Policy, who: Principals, topic: str) -> bool:
    return p.decide(who.names, "publish", topic).allowed


def sub(p: Policy, who: Principals, topic: str) -> bool:
    return p.decide(who.names, "subscribe", topic).allowed


def verdict(p: Policy, who: Principals, pattern: str, action: str = "subscribe") -> str:
    return p.decide_pattern(who.names, action, pattern)[0]


# ---- principals ------------------------------------------------------------------------------------


def test_names_of_a_unix_peer() -> None:
    assert ALICE.names == frozenset({"*", "uid:1000", "user:alice", "group:alice", "group:sudo", "unit:app.service"})
    assert ALICE.describe() == {"uid": 1000, "user": "alice", "gid": 1000, "groups": ["alice", "sudo"],
                                "unit": "app.service",
                                "principals": sorted(ALICE.names), "unknown": []}


def test_names_without_user_group_names_or_unit() -> None:
    assert ANON.names == frozenset({"*", "uid:4242"})  # no "user:", "group:" or "unit:" name to match


def test_named_principal() -> None:
    assert FEED.names == frozenset({"*", "zmq:feed"})
    assert FEED.uid == -1
    assert FEED.unit is None


@pytest.mark.parametrize(
    ("entry", "who", "allowed"),
    [
        ("*", ALICE, True),
        ("*", ANON, True),
        ("*", FEED, True),
        ("uid:1000", ALICE, True),
        ("uid:1000", BOB, False),
        ("uid:100", ALICE, False),  # whole names, no prefix matching
        ("uid:10000", ALICE, False),
        ("user:alice", ALICE, True),
        ("user:alice", BOB, False),
        ("user:alic", ALICE, False),
        ("group:sudo", ALICE, True),  # a supplementary group
        ("group:alice", ALICE, True),  # the primary group
        ("group:sudo", BOB, False),
        ("unit:app.service", ALICE, True),
        ("unit:app.service", BOB, False),
        ("unit:app", ALICE, False),
        ("zmq:feed", FEED, True),
        ("zmq:feed", ALICE, False),
        ("zmq:other", FEED, False),
        ("uid:-1", FEED, False),  # a named principal has no uid name
        ("uid:4242", ANON, True),
    ],
)
def test_principal_matching(entry: str, who: Principals, allowed: bool) -> None:
    p = policy(("t", {"publish": [entry]}))
    assert pub(p, who, "t") is allowed
    # The same entry refusing: refused exactly when it would have allowed, otherwise not granted.
    q = policy(("t", {"publish": [f"!{entry}", "*"]}))
    assert pub(q, who, "t") is (not allowed)


@pytest.mark.parametrize(
    "entry",
    ["*", "!*", "uid:0", "uid:1000", "!uid:33", "user:alice", "!user:www-data", "group:wheel", "group:a.b_c-d",
     "unit:nginx.service", "unit:user@1000.service", "zmq:feed", "!zmq:sensor-1", "user:ünïcødé"],
)
def test_principal_entries_accepted(entry: str) -> None:
    assert principal_problem(entry) is None


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("", "must be '*'"),
        ("!", "must be '*'"),
        ("alice", "must be '*'"),
        ("uid", "must be '*'"),
        ("host:x", "must be '*'"),
        ("UID:1", "must be '*'"),  # kinds are lower case
        ("!!uid:1", "must be '*'"),  # one '!' only
        (" *", "must be '*'"),
        ("* ", "must be '*'"),
        ("**", "must be '*'"),
        ("uid:", "needs a name without spaces"),
        ("user:", "needs a name without spaces"),
        ("!group:", "needs a name without spaces"),
        ("zmq:", "needs a name without spaces"),
        ("user:a b", "needs a name without spaces"),
        ("user:a\tb", "needs a name without spaces"),
        ("unit:x\n", "needs a name without spaces"),
        ("uid:abc", "uid: takes a number"),
        ("uid:-1", "uid: takes a number"),
        ("uid:1.5", "uid: takes a number"),
        ("!uid:0x10", "uid: takes a number"),
    ],
)
def test_principal_entries_rejected(entry: str, says: str) -> None:
    problem = principal_problem(entry)
    assert problem is not None
    assert says in problem


@pytest.mark.parametrize("entry", ["!uid:01", "!uid:\N{SUPERSCRIPT ONE}", "!uid:\N{ARABIC-INDIC DIGIT ONE}"])
def test_uid_entries_are_rejected_or_match(entry: str) -> None:
    # A uid entry spelled so that it can never equal a peer's "uid:N" must not pass validation: a
    # refusing entry such as '!uid:01' would otherwise refuse nobody, silently.
    who = Principals.of_peer(1, 1, (), "daemon", (), None)
    p = policy(("t", {"publish": [entry, "*"]}))
    assert principal_problem(entry) is not None or not pub(p, who, "t")


# ---- unit_of_cgroup --------------------------------------------------------------------------------

HYBRID = """\
12:pids:/system.slice/cron.service
11:memory:/system.slice/cron.service
10:cpu,cpuacct:/system.slice/cron.service
3:devices:/system.slice/cron.service
1:name=systemd:/system.slice/cron.service
0::/system.slice/other.service
"""

HYBRID_UNIFIED_FIRST = """\
0::/system.slice/other.service
5:blkio:/
1:name=systemd:/system.slice/cron.service
"""

LEGACY_V1 = """\
11:freezer:/
4:memory:/user.slice/user-1000.slice/session-2.scope
1:name=systemd:/user.slice/user-1000.slice/session-2.scope
"""


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("0::/system.slice/nginx.service\n", "nginx.service"),
        ("0::/system.slice/nginx.service", "nginx.service"),  # no final newline
        ("0::/system.slice/system-getty.slice/getty@tty1.service\n", "getty@tty1.service"),  # nested slices
        ("0::/system.slice/docker-0123abcd.scope\n", "docker-0123abcd.scope"),
        ("0::/system.slice/dbus.socket\n", "dbus.socket"),
        ("0::/system.slice/nginx.service/worker\n", "nginx.service"),  # a sub-cgroup of the unit (delegation)
        ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.service\n", "user@1000.service"),
        ("0::/user.slice/user-1000.slice/user@1000.service/init.scope\n", "user@1000.service"),
        ("0::/init.scope\n", "init.scope"),
        ("0::/\n", None),  # root cgroup: kernel threads, or a cgroup namespace
        ("0::/system.slice\n", None),  # only slices
        ("0::/lxc/container1\n", None),  # not a systemd unit
        ("0::/system.slice/foo.bar\n", None),  # not a unit suffix
        ("", None),
        ("garbage without colons\n", None),
        (HYBRID, "cron.service"),  # name=systemd wins over the unified line
        (HYBRID_UNIFIED_FIRST, "cron.service"),  # whatever the order of the lines
        (LEGACY_V1, "session-2.scope"),
        ("12:pids:/system.slice/cron.service\n", None),  # neither systemd nor unified hierarchy
        ("1:name=systemd:/\n0::/system.slice/x.service\n", None),  # the systemd hierarchy is read if present
    ],
)
def test_unit_of_cgroup(text: str, unit: str | None) -> None:
    assert unit_of_cgroup(text) == unit


# ---- specificity, covers, overlaps -----------------------------------------------------------------


def test_specificity() -> None:
    assert specificity("a.*.>") == (2, 1, 0)
    assert specificity(">") == (0,)
    assert specificity("$SYS.b") == (2, 2)
    assert specificity("a.b") > specificity("a.*") > specificity("a.>")
    assert specificity("a.b.>") > specificity("a.*.c")  # from the left: the first difference decides
    assert specificity("*.*") > specificity("*.>") > specificity(">")


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        (">", ">", True),
        (">", "a.b", True),
        (">", "*.>", True),
        ("*.>", ">", False),  # '>' also matches one token
        ("a.>", "a.*", True),
        ("a.*", "a.>", False),
        ("a.*", "a.b", True),
        ("a.b", "a.*", False),
        ("*", "*", True),
        ("*", "a.b", False),
        ("a.b", "a.b", True),
        ("a", "a.b", False),
        ("a.b", "a", False),
        (">", "$SYS.x", False),  # wildcards first never reach '$' topics
        ("*.x", "$SYS.x", False),
        ("$SYS.>", "$SYS.*", True),
        ("$SYS.>", ">", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.>", False),
    ],
)
def test_covers(outer: str, inner: str, expected: bool) -> None:
    assert covers(outer, inner) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (">", "a", True),
        (">", "a.b.c", True),
        ("a", "a.>", False),  # '>' needs at least one more token
        ("a.*", "a.>", True),
        ("a.b", "a.c", False),
        ("*.b", "a.*", True),
        ("a.>", "b.>", False),
        ("a.>", "*.b.c.>", True),
        ("*", "*.*", False),
        (">", "$SYS.>", False),
        ("*.b", "$SYS.b", False),
        ("$SYS.*", "$SYS.>", True),
        (">", "_INBOX.a", False),
    ],
)
def test_overlaps(a: str, b: str, expected: bool) -> None:
    assert overlaps(a, b) is expected
    assert overlaps(b, a) is expected


# ---- precedence -----------------------------------------------------------------------------------

LAYERED: list[tuple[str, Acts]] = [
    (">", {"publish": ["user:alice"]}),
    ("sensors.>", {"publish": ["user:bob"]}),
    ("sensors.*", {"publish": ["uid:4242"]}),
    ("sensors.kitchen", {"publish": ["zmq:feed"]}),
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(LAYERED)))))
def test_most_specific_rule_decides_whatever_the_order(order: tuple[int, ...]) -> None:
    p = policy(*(LAYERED[i] for i in order))
    who = {"other": ALICE, "sensors.hall.temp": BOB, "sensors.hall": ANON, "sensors.kitchen": FEED}
    for topic, allowed in who.items():
        for peer in (ALICE, BOB, ANON, FEED):
            assert pub(p, peer, topic) is (peer is allowed), (topic, peer.names)
        d = p.decide(allowed.names, "publish", topic)
        want = {"other": ">", "sensors.hall.temp": "sensors.>", "sensors.hall": "sensors.*",
                "sensors.kitchen": "sensors.kitchen"}[topic]
        position = [LAYERED[i][0] for i in order].index(want)
        assert f"acl rule {position} (topic {want!r})" in d.rule


@pytest.mark.parametrize(
    ("patterns", "topic", "winner"),
    [
        (["*.kitchen", "sensors.*"], "sensors.kitchen", "sensors.*"),  # literal first token beats '*' first
        (["a.*.c", "a.b.>"], "a.b.c", "a.b.>"),  # from the left: the second token decides before the third
        (["*.*", "*.>"], "a.b", "*.*"),
        (["*.>", ">"], "a.b", "*.>"),
        (["*", ">"], "a", "*"),
        (["a.>", "a.*.>", "a.*.*"], "a.b.c", "a.*.*"),
        (["a.>", "a.*.>", "a.*.*"], "a.b.c.d", "a.*.>"),
        (["a.>", "a.*.>", "a.*.*"], "a.b", "a.>"),
    ],
)
def test_precedence_from_the_left(patterns: list[str], topic: str, winner: str) -> None:
    for order in itertools.permutations(patterns):
        rules: list[tuple[str, Acts]] = [(pat, {"publish": ["user:alice"] if pat == winner else ["user:bob"]})
                                         for pat in order]
        p = policy(*rules)
        d = p.decide(ALICE.names, "publish", topic)
        assert d.allowed
        assert f"acl rule {order.index(winner)} (topic {winner!r})" in d.rule
        assert not pub(p, BOB, topic)


def test_rule_not_naming_the_action_falls_through() -> None:
    p = policy(
        (">", {"publish": ["user:alice"]}),
        ("sensors.>", {"subscribe": ["user:bob"]}),  # says nothing about publishing
        ("sensors.kitchen", {"publish": None, "subscribe": []}),  # None: not named either
    )
    # publish: both sensors rules are skipped, '>' decides
    assert pub(p, ALICE, "sensors.kitchen")
    assert not pub(p, BOB, "sensors.kitchen")
    assert "acl rule 0 (topic '>')" in p.decide(ALICE.names, "publish", "sensors.kitchen").rule
    # subscribe: no rule named it for "other", the default (deny) decides
    d = p.decide(BOB.names, "subscribe", "other")
    assert d == p.default
    assert not d.allowed
    assert d.rule.startswith("access.default (deny)")
    assert sub(p, BOB, "sensors.hall")
    assert not sub(p, BOB, "sensors.kitchen")  # [] names the action: nobody
    # manage: named by no rule at all
    assert p.decide(ALICE.names, "manage", "sensors.kitchen") == p.default


def test_default_allow_decides_when_no_rule_names_the_action() -> None:
    p = policy(("sensors.>", {"subscribe": ["user:bob"]}), default="allow")
    assert pub(p, ANON, "sensors.x")
    d = p.decide(ANON.names, "subscribe", "other")
    assert d.allowed
    assert d.rule.startswith("access.default (allow)")
    assert not sub(p, ANON, "sensors.x")  # the rule names subscribe: the default does not apply


def test_empty_list_means_nobody() -> None:
    p = policy(("secret.>", {"publish": [], "subscribe": []}), default="allow")
    for who in (ALICE, BOB, ANON, FEED):
        assert not pub(p, who, "secret.x")
        assert not sub(p, who, "secret.x")
    d = p.decide(ALICE.names, "publish", "secret.x")
    assert d.rule == "acl rule 0 (topic 'secret.>'): publish not granted to this peer"
    assert pub(p, ALICE, "public")


def test_refusing_entry_wins_within_its_rule() -> None:
    p = policy(("t", {"publish": ["*", "user:alice", "!group:sudo"]}))
    assert not pub(p, ALICE, "t")  # allowed twice over, refused once: refused
    assert pub(p, BOB, "t")
    d = p.decide(ALICE.names, "publish", "t")
    assert d == Decision(False, "acl rule 0 (topic 't'): publish refused to group:sudo")
    assert p.decide(BOB.names, "publish", "t") == Decision(True, "acl rule 0 (topic 't'): publish allowed to *")


def test_refuse_everyone() -> None:
    p = policy(("t", {"publish": ["!*", "user:alice"]}), default="allow")
    for who in (ALICE, BOB, FEED):
        assert not pub(p, who, "t")


def test_only_refusing_entries_grant_nothing() -> None:
    # A rule naming an action lists everyone allowed: refusing bob does not allow alice.
    p = policy(("t", {"publish": ["!user:bob"]}), default="allow")
    assert not pub(p, BOB, "t")
    assert not pub(p, ALICE, "t")
    assert p.decide(ALICE.names, "publish", "t").rule == "acl rule 0 (topic 't'): publish not granted to this peer"


def test_more_specific_rule_overrides_a_refusal() -> None:
    p = policy(
        (">", {"publish": ["*", "!user:bob"]}),
        ("bob.>", {"publish": ["user:bob"]}),
    )
    assert not pub(p, BOB, "x")
    assert pub(p, BOB, "bob.x")
    assert not pub(p, ALICE, "bob.x")  # bob.> names publish and lists only bob
    assert pub(p, ALICE, "x")


def test_refusal_in_a_more_specific_rule() -> None:
    p = policy(
        ("sensors.>", {"subscribe": ["*"]}),
        ("sensors.secret", {"subscribe": ["!user:alice", "*"]}),
    )
    assert sub(p, ALICE, "sensors.public")
    assert not sub(p, ALICE, "sensors.secret")
    assert sub(p, BOB, "sensors.secret")
    assert sub(p, ALICE, "sensors.secret.deeper")  # 'sensors.secret' is exact: one more token is not it


def test_decision_texts() -> None:
    p = policy(
        ("a", {"publish": ["user:bob"]}),
        ("sensors.>", {"publish": ["group:sudo", "user:alice"], "subscribe": ["!uid:1000", "*"]}),
    )
    d = p.decide(ALICE.names, "publish", "sensors.x")
    assert d.allowed
    assert d.rule == "acl rule 1 (topic 'sensors.>'): publish allowed to group:sudo"  # the first name, sorted
    d = p.decide(ALICE.names, "subscribe", "sensors.x")
    assert not d.allowed
    assert d.rule == "acl rule 1 (topic 'sensors.>'): subscribe refused to uid:1000"
    d = p.decide(ALICE.names, "publish", "a")
    assert not d.allowed
    assert "acl rule 0" in d.rule
    assert "'a'" in d.rule
    d = p.decide(ALICE.names, "publish", "b")
    assert d.rule == "access.default (deny): no rule names this action for this topic"
    assert d is p.default


def test_replies_to_inboxes_need_no_rule() -> None:
    p = policy()  # deny everything
    d = p.decide(ANON.names, "publish", "_INBOX.abc.1")
    assert d.allowed
    assert "inbox" in d.rule
    assert pub(p, ANON, "_INBOX.abc")
    # even a rule that would refuse it does not apply to inbox replies
    q = policy((">", {"publish": []}), ("_INBOX.>", {"publish": []}))
    assert pub(q, FEED, "_INBOX.abc.1")
    # only publishing is exempt, and only under the "_INBOX." prefix
    assert not p.decide(ANON.names, "subscribe", "_INBOX.abc.1").allowed
    assert not pub(p, ANON, "_INBOX")
    assert not pub(p, ANON, "_INBOXES.a")


def test_dollar_topics_are_not_covered_by_wildcard_first_rules() -> None:
    p = policy((">", {"subscribe": ["*"], "publish": ["*"]}), ("*.stats", {"subscribe": ["*"]}))
    assert sub(p, ALICE, "a.b")
    assert sub(p, ALICE, "x.stats")
    assert not sub(p, ALICE, "$SYS.stats")  # neither rule matches: the default (deny)
    assert p.decide(ALICE.names, "subscribe", "$SYS.stats") is p.default
    q = policy((">", {"subscribe": ["*"]}), ("$SYS.>", {"subscribe": ["user:alice"]}))
    assert sub(q, ALICE, "$SYS.stats")
    assert not sub(q, BOB, "$SYS.stats")


# ---- decide_pattern ---------------------------------------------------------------------------------


def test_decide_pattern_filter_allow_deny() -> None:
    p = policy(("sensors.>", {"subscribe": ["user:alice"]}))
    assert verdict(p, ALICE, ">") == "filter"
    assert verdict(p, ALICE, "sensors.>") == "allow"
    assert verdict(p, ALICE, "sensors.*") == "allow"
    assert verdict(p, ALICE, "sensors.*.temp") == "allow"
    assert verdict(p, ALICE, "sensors.kitchen") == "allow"
    assert verdict(p, ALICE, "other.>") == "deny"
    assert verdict(p, ALICE, "*") == "deny"  # one token: never under sensors.>
    assert verdict(p, ALICE, "*.>") == "filter"
    assert verdict(p, ALICE, "$SYS.>") == "deny"
    assert verdict(p, BOB, ">") == "deny"  # denied by the rule and by the default alike
    assert verdict(p, BOB, "sensors.>") == "deny"


def test_decide_pattern_names_the_deciding_rule() -> None:
    p = policy(("sensors.>", {"subscribe": ["user:alice"]}))
    kind, d = p.decide_pattern(ALICE.names, "subscribe", "sensors.*")
    assert kind == "allow"
    assert d.rule == "acl rule 0 (topic 'sensors.>'): subscribe allowed to user:alice"
    kind, d = p.decide_pattern(BOB.names, "subscribe", "sensors.*")
    assert kind == "deny"
    assert d.rule == "acl rule 0 (topic 'sensors.>'): subscribe not granted to this peer"
    kind, d = p.decide_pattern(ALICE.names, "subscribe", "other.>")
    assert kind == "deny"
    assert d is p.default


def test_decide_pattern_with_an_exception_inside() -> None:
    p = policy(
        ("sensors.>", {"subscribe": ["*"]}),
        ("sensors.secret.>", {"subscribe": ["user:root"]}),
    )
    root = Principals.of_peer(0, 0, (), "root", ("root",), None)
    assert verdict(p, ALICE, "sensors.>") == "filter"
    assert verdict(p, ALICE, "sensors.public.>") == "allow"
    assert verdict(p, ALICE, "sensors.secret.>") == "deny"
    assert verdict(p, ALICE, "sensors.*.x") == "filter"
    assert verdict(p, root, "sensors.>") == "allow"  # the exception agrees with the base: no filter
    assert verdict(p, ALICE, "sensors.*") == "allow"  # sensors.secret.> needs three tokens


def test_decide_pattern_dollar_topics() -> None:
    p = policy((">", {"subscribe": ["*"]}))
    assert verdict(p, ALICE, ">") == "allow"
    assert verdict(p, ALICE, "$SYS.>") == "deny"  # '>' does not cover '$' topics: the default decides
    q = policy((">", {"subscribe": []}), default="allow")
    assert verdict(q, ALICE, ">") == "deny"
    assert verdict(q, ALICE, "$SYS.>") == "allow"
    r = policy(("$SYS.>", {"subscribe": ["user:alice"]}))
    assert verdict(r, ALICE, ">") == "deny"  # the $SYS rule does not overlap '>'
    assert verdict(r, ALICE, "$SYS.*") == "allow"


def test_decide_pattern_other_actions() -> None:
    p = policy(("q.>", {"manage": ["user:alice"], "publish": ["*"]}))
    assert verdict(p, ALICE, "q.>", "manage") == "allow"
    assert verdict(p, BOB, "q.>", "manage") == "deny"
    assert verdict(p, ALICE, ">", "manage") == "filter"
    assert verdict(p, BOB, ">", "publish") == "filter"


# ---- Access ---------------------------------------------------------------------------------------


def test_open_policy_needs_no_checker() -> None:
    assert policy(default="allow").open
    assert policy(default="allow").access(ALICE) is None
    assert not policy(default="deny").open
    assert isinstance(policy(default="deny").access(ALICE), Access)
    with_rule = policy(("a", {"publish": ["*"]}), default="allow")
    assert not with_rule.open
    assert isinstance(with_rule.access(ALICE), Access)


def test_access_caches_decisions() -> None:
    p = policy(("sensors.>", {"subscribe": ["user:alice"], "publish": ["user:alice"]}))
    access = p.access(ALICE)
    assert access is not None
    first = access.publish("sensors.a")
    assert first.allowed
    assert access.publish("sensors.a") is first  # remembered (as a bool: one shared "allowed" decision)
    assert access._pub == {"sensors.a": True}
    refused = access.publish("other")
    assert refused == p.decide(ALICE.names, "publish", "other")  # a refusal keeps its words
    assert not refused.allowed and access._pub["other"] is False
    assert p.access(ALICE) is access  # shared by the peers with the same principals
    assert access.publish("_INBOX.x.1").allowed
    assert access.may_receive("sensors.a")
    assert access.may_receive("sensors.a")
    assert not access.may_receive("other")
    assert not access.may_receive("other")
    assert not access.may_receive("$SYS.x")
    assert access.subscribe(">") == p.decide_pattern(ALICE.names, "subscribe", ">")
    assert access.subscribe(">")[0] == "filter"
    assert access.decide("manage", "sensors.a") is p.default

    bob = p.access(BOB)
    assert bob is not None
    assert not bob.publish("sensors.a").allowed  # per peer: alice's cache is not bob's
    assert not bob.may_receive("sensors.a")


def test_access_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acl, "DECISION_CACHE", 3)
    p = policy(("even.>", {"subscribe": ["*"], "publish": ["*"]}))
    access = p.access(ALICE)
    assert access is not None
    for i in range(20):
        prefix = "even" if i % 2 == 0 else "odd"
        assert access.publish(f"{prefix}.{i}").allowed is (i % 2 == 0)
        assert access.may_receive(f"{prefix}.{i}") is (i % 2 == 0)
        assert len(access._pub) <= 3
        assert len(access._sub) <= 3
    for i in range(20):  # after the cache was cleared, the answers are still right
        prefix = "even" if i % 2 == 0 else "odd"
        assert access.publish(f"{prefix}.{i}").allowed is (i % 2 == 0)
        assert access.may_receive(f"{prefix}.{i}") is (i % 2 == 0)
