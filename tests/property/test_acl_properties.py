"""Property tests (Hypothesis) of the access rules against their reference definitions.

1. ``covers`` and ``overlaps`` agree with :func:`hostbus.topics.matches`: on small alphabets,
   where every topic can be enumerated, they are exact (sound and complete).
2. ``Policy.decide`` equals a brute-force reading of the documented rule (module docstring of
   ``hostbusd.core.acl``), including which rule decided; ``Access`` gives the same answers.
3. ``Policy.decide_pattern`` is sound: "allow" means every topic of the pattern is allowed,
   "deny" that none is ("filter" may be conservative).

Patterns are drawn over {a, b, c, $x, *, >} with at most 4 tokens (rule patterns over {a, b, $x,
*, >} with at most 3, so that the rules of a set meet often). Topics are enumerated over {a, b,
c, $x} plus a fresh token ``z`` (something a wildcard matches that no literal names), with up to
5 tokens: a topic one token longer than a pattern is what tells ``*.*.*.*`` from ``a.b.c.>``, so
that is the longest witness any question about these patterns can need. ``_INBOX`` first tokens
are checked exhaustively on a smaller alphabet.
"""

from __future__ import annotations

import functools
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostbus import topics
from hostbusd.core.acl import Policy, Principals, covers, overlaps

TOKENS = ("a", "b", "c", "$x")
FRESH = "z"
MAX_PATTERN_TOKENS = 4

ALL_TOPICS: tuple[str, ...] = tuple(
    ".".join(t) for n in range(1, MAX_PATTERN_TOKENS + 2) for t in itertools.product((*TOKENS, FRESH), repeat=n)
)
INBOX_TOPICS = ("_INBOX.a", "_INBOX.a.b", "_INBOX.z.1.2")


@functools.cache
def topics_of(pattern: str) -> frozenset[str]:
    """Every enumerated topic that ``pattern`` matches (reference definition)."""
    return frozenset(t for t in ALL_TOPICS if topics.matches(pattern, t))


# ---- strategies ------------------------------------------------------------------------------------


@st.composite
def patterns(draw: st.DrawFn, alphabet: tuple[str, ...] = TOKENS, max_tokens: int = MAX_PATTERN_TOKENS) -> str:
    toks = draw(st.lists(st.sampled_from((*alphabet, "*")), min_size=1, max_size=max_tokens))
    if draw(st.booleans()):
        toks[-1] = ">"
    pattern = ".".join(toks)
    assert topics.pattern_problem(pattern) is None
    return pattern


@st.composite
def instances(draw: st.DrawFn, pattern: str) -> str:
    """A topic built from ``pattern`` by filling its wildcards (it may not match: '$' first tokens)."""
    out: list[str] = []
    for tok in pattern.split("."):
        if tok == "*":
            out.append(draw(st.sampled_from((*TOKENS, FRESH))))
        elif tok == ">":
            out += draw(st.lists(st.sampled_from((*TOKENS, FRESH)), min_size=1, max_size=2))
        else:
            out.append(tok)
    return ".".join(out)


@st.composite
def generalisations(draw: st.DrawFn, pattern: str) -> str:
    """A pattern near ``pattern``: some tokens made ``*``, perhaps cut short with ``>``."""
    toks = [t if t == ">" or not draw(st.booleans()) else "*" for t in pattern.split(".")]
    cut = draw(st.integers(0, len(toks)))
    if cut < len(toks):
        toks = [*toks[:cut], ">"]
    return ".".join(toks)


ENTRIES = ("*", "user:alice", "user:bob", "group:staff", "uid:7", "!*", "!user:alice", "!user:bob", "!group:staff")
PEER_NAMES = ("user:alice", "user:bob", "group:staff", "uid:7")
ACTIONS = ("publish", "subscribe", "manage")

# Rule patterns over fewer tokens, so that the rules of a set often meet.
rule_patterns = patterns(("a", "b", "$x"), 3)
entry_lists = st.none() | st.lists(st.sampled_from(ENTRIES), max_size=3)  # None: the rule does not name it
Rules = list[tuple[str, dict[str, list[str] | None]]]
rule_sets: st.SearchStrategy[Rules] = st.lists(
    st.tuples(rule_patterns, st.fixed_dictionaries({a: entry_lists for a in ACTIONS})),
    max_size=6,
    unique_by=lambda r: r[0],  # two rules may not have the same pattern
)
# For whole-pattern decisions: only subscribe matters, named by two rules in three.
subscribe_rule_sets: st.SearchStrategy[Rules] = st.lists(
    st.tuples(rule_patterns, st.fixed_dictionaries({"subscribe": st.lists(st.sampled_from(ENTRIES), max_size=3)
                                                 | st.lists(st.sampled_from(ENTRIES), min_size=1, max_size=3)
                                                 | st.none()})),
    min_size=1,
    max_size=6,
    unique_by=lambda r: r[0],
)
peers = st.sets(st.sampled_from(PEER_NAMES)).map(lambda s: frozenset({"*", *s}))


# ---- (1) covers and overlaps -----------------------------------------------------------------------


@st.composite
def neighbours(draw: st.DrawFn, pattern: str) -> str:
    """A pattern like ``pattern`` with a few tokens changed, added or dropped: random pairs of
    patterns rarely differ in just the one place that matters (``a.*`` against ``a.>``)."""
    toks = pattern.split(".")
    for _ in range(draw(st.integers(1, 2))):
        i = draw(st.integers(0, len(toks) - 1))
        change = draw(st.sampled_from(("token", "more", "less")))
        if change == "token":
            toks[i] = draw(st.sampled_from((*TOKENS, "*", ">")))
        elif change == "more" and len(toks) < MAX_PATTERN_TOKENS:
            toks.insert(i, draw(st.sampled_from((*TOKENS, "*"))))
        elif change == "less" and len(toks) > 1:
            del toks[i]
        toks = [t for k, t in enumerate(toks) if t != ">" or k == len(toks) - 1]  # '>' only last
    return ".".join(toks)


# Several patterns at a time, every ordered pair checked: the checks are cheap set operations.
pattern_groups = patterns().flatmap(lambda p: st.lists(st.just(p) | neighbours(p) | patterns(), min_size=2,
                                                       max_size=6))


@given(group=pattern_groups)
def test_covers_is_exact(group: list[str]) -> None:
    for outer, inner in itertools.product(group, repeat=2):
        inner_topics = topics_of(inner)
        assert inner_topics  # every pattern matches something: otherwise "covers" would be vacuous
        outside = sorted(inner_topics - topics_of(outer))
        if covers(outer, inner):
            assert not outside, f"covers({outer!r}, {inner!r}) but {outside[0]!r} matches only the inner pattern"
        else:
            assert outside, f"not covers({outer!r}, {inner!r}) yet every topic of {inner!r} matches {outer!r}"


@given(group=pattern_groups)
def test_overlaps_is_exact(group: list[str]) -> None:
    for a, b in itertools.product(group, repeat=2):
        common = sorted(topics_of(a) & topics_of(b))
        assert overlaps(a, b) is overlaps(b, a)
        if overlaps(a, b):
            assert common, f"overlaps({a!r}, {b!r}) but no topic matches both"
        else:
            assert not common, f"not overlaps({a!r}, {b!r}) yet {common[0]!r} matches both"


@given(p=patterns())
def test_a_pattern_covers_and_overlaps_itself(p: str) -> None:
    assert covers(p, p)
    assert overlaps(p, p)


# Exhaustively, on a tiny alphabet with "_INBOX": a one-token topic "_INBOX" is no inbox (those
# start with "_INBOX."), so wildcards match it, while "_INBOX.x" is matched by no wildcard-first pattern.
INBOX_ALPHABET = ("_INBOX", "$x", "a")
INBOX_PATTERNS = tuple(
    ".".join((*t, *tail))
    for n in range(1, 4) for t in itertools.product((*INBOX_ALPHABET, "*"), repeat=n) for tail in ((), (">",))
    if len(t) + len(tail) <= 3
)
INBOX_TOPICS_ALL = tuple(
    ".".join(t) for n in range(1, 5) for t in itertools.product((*INBOX_ALPHABET, FRESH), repeat=n))


def test_covers_and_overlaps_are_exact_with_inbox_tokens() -> None:
    matching = {p: frozenset(t for t in INBOX_TOPICS_ALL if topics.matches(p, t)) for p in INBOX_PATTERNS}
    for a, b in itertools.product(INBOX_PATTERNS, repeat=2):
        assert covers(a, b) is (matching[b] <= matching[a]), (a, b)
        assert overlaps(a, b) is bool(matching[a] & matching[b]), (a, b)


@pytest.mark.parametrize("wild", ["*", ">"])
def test_one_token_inbox_pattern_meets_wildcards(wild: str) -> None:
    assert topics.matches(wild, "_INBOX")
    assert overlaps(wild, "_INBOX")
    assert overlaps("_INBOX", wild)
    assert covers(wild, "_INBOX")
    assert not overlaps(wild, "_INBOX.>")
    assert not covers(wild, "_INBOX.a")


def test_decide_pattern_sound_for_one_token_inbox_pattern() -> None:
    p = Policy([(">", {"subscribe": []})], True)
    assert not p.decide(frozenset({"*"}), "subscribe", "_INBOX").allowed
    assert p.decide_pattern(frozenset({"*"}), "subscribe", "_INBOX")[0] == "deny"


# ---- (2) decide against a brute-force reading of the rule ------------------------------------------

_KIND = {">": 0, "*": 1}


def more_specific(p: str, q: str) -> int:
    """>0 if ``p`` is more specific than ``q``: token by token from the left, literal > '*' > '>'."""
    for x, y in zip(p.split("."), q.split("."), strict=False):
        kx, ky = _KIND.get(x, 2), _KIND.get(y, 2)
        if kx != ky:
            return kx - ky
    return 0


def reference_decide(rules: Rules, default: bool, names: frozenset[str], action: str,
                     topic: str) -> tuple[bool, int | None]:
    """(allowed, index of the deciding rule or None) by the definition in acl's docstring."""
    if action == "publish" and topic.startswith("_INBOX."):
        return True, None
    candidates = [(i, pattern, acts[action]) for i, (pattern, acts) in enumerate(rules)
                  if acts.get(action) is not None and topics.matches(pattern, topic)]
    if not candidates:
        return default, None
    Candidate = tuple[int, str, list[str] | None]

    def order(c: Candidate, d: Candidate) -> int:
        return more_specific(c[1], d[1])

    best = max(candidates, key=functools.cmp_to_key(order))
    # "exactly one is the most specific"
    assert all(more_specific(best[1], c[1]) > 0 for c in candidates if c is not best), (topic, candidates)
    index, _, entries = best
    assert entries is not None
    if any(e.startswith("!") and e[1:] in names for e in entries):
        return False, index
    return any(e in names for e in entries if not e.startswith("!")), index


@st.composite
def cases(draw: st.DrawFn) -> tuple[Rules, bool, frozenset[str], list[str]]:
    rules = draw(rule_sets)
    some_topics = st.sampled_from(ALL_TOPICS) | st.sampled_from(INBOX_TOPICS)
    if rules:
        some_topics |= st.sampled_from([r[0] for r in rules]).flatmap(instances)
    return rules, draw(st.booleans()), draw(peers), draw(st.lists(some_topics, min_size=1, max_size=25))


@given(case=cases())
def test_decide_equals_the_definition(case: tuple[Rules, bool, frozenset[str], list[str]]) -> None:
    rules, default, names, some_topics = case
    policy = Policy(rules, default)
    for topic in some_topics:
        for action in ACTIONS:
            allowed, index = reference_decide(rules, default, names, action, topic)
            d = policy.decide(names, action, topic)
            assert d.allowed is allowed, (action, topic, d)
            if index is not None:
                assert f"acl rule {index} (topic {rules[index][0]!r})" in d.rule
            elif action == "publish" and topics.is_inbox(topic):
                assert "inbox" in d.rule
            else:
                assert d is policy.default
                assert d.rule.startswith("access.default")


@given(case=cases())
def test_access_agrees_with_policy(case: tuple[Rules, bool, frozenset[str], list[str]]) -> None:
    rules, default, names, some_topics = case
    policy = Policy(rules, default)
    access = policy.access(Principals(-1, -1, (), None, (), None, names))
    if access is None:  # only when nothing is ever refused
        assert policy.open
        return
    for topic in some_topics * 2:  # the second time from the cache
        got, want = access.publish(topic), policy.decide(names, "publish", topic)
        assert got.allowed is want.allowed
        if not want.allowed:  # a refusal keeps the words of the rule that decided
            assert got == want
        assert access.may_receive(topic) is policy.decide(names, "subscribe", topic).allowed


# ---- (3) decide_pattern is sound -------------------------------------------------------------------


@st.composite
def pattern_cases(draw: st.DrawFn) -> tuple[Rules, bool, frozenset[str], list[str]]:
    """Rules and subscription patterns, most of them near a rule's so that the rules meet inside them."""
    rules = draw(subscribe_rule_sets | rule_sets)
    near = st.sampled_from([r[0] for r in rules]).flatmap(generalisations) if rules else patterns()
    some = st.lists(near | patterns() | st.sampled_from([">", "*.>", "*", "a.>", "$x.>"]), min_size=1, max_size=8)
    return rules, draw(st.booleans()), draw(peers), draw(some)


@given(case=pattern_cases())
def test_decide_pattern_is_sound(case: tuple[Rules, bool, frozenset[str], list[str]]) -> None:
    rules, default, names, subscriptions = case
    policy = Policy(rules, default)
    decided: dict[str, bool] = {}  # topic -> allowed, decided once for all the patterns
    for pattern in subscriptions:
        verdict, decision = policy.decide_pattern(names, "subscribe", pattern)
        assert verdict in ("allow", "deny", "filter")
        if verdict == "filter":  # may be conservative: each message is decided on its own anyway
            continue
        assert decision.allowed is (verdict == "allow")
        for topic in sorted(topics_of(pattern)):
            allowed = decided.get(topic)
            if allowed is None:
                d = policy.decide(names, "subscribe", topic)
                allowed = decided[topic] = d.allowed
            assert allowed is (verdict == "allow"), f"{pattern!r} is {verdict!r} but {topic!r} is not"
