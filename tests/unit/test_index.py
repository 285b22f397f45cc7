"""Unit tests of the topic trie: hostbusd.core.index.TopicIndex."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from hostbusd.core.index import TopicIndex, _Node


def names(result: tuple[Any, ...]) -> Counter[Any]:
    """Match results as a multiset: the index does not promise an order."""
    return Counter(result)


def build(*patterns: str) -> TopicIndex[str]:
    index: TopicIndex[str] = TopicIndex()
    for p in patterns:
        index.add(p, p)
    return index


# ---- add / match -----------------------------------------------------------------------------------


def test_empty_index_matches_nothing() -> None:
    index: TopicIndex[str] = TopicIndex()
    assert index.match("a") == ()
    assert index.match("a.b.c") == ()
    assert len(index) == 0


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("a", {">", "*", "a"}),
        ("a.b", {">", "*.b", "a.b", "a.*", "a.>", "*.>", "*.*"}),
        ("a.c", {">", "a.*", "a.>", "*.>", "*.*"}),
        ("a.b.c", {">", "a.>", "*.>", "a.b.c", "a.*.c", "a.b.>"}),
        ("x.b", {">", "*.b", "*.>", "*.*"}),
        ("a.b.c.d", {">", "a.>", "*.>", "a.b.>"}),
        ("b", {">", "*"}),
    ],
)
def test_match(topic: str, expected: set[str]) -> None:
    index = build(">", "*", "a", "a.b", "*.b", "a.*", "a.>", "*.>", "*.*", "a.b.c", "a.*.c", "a.b.>")
    assert names(index.match(topic)) == Counter(expected)


def test_tail_needs_at_least_one_token() -> None:
    index = build("a.>", "a.b.>")
    assert index.match("a") == ()
    assert index.match("a.b") == ("a.>",)
    assert names(index.match("a.b.c")) == Counter(["a.>", "a.b.>"])


def test_several_entries_on_one_pattern() -> None:
    index: TopicIndex[int] = TopicIndex()
    for i in range(5):
        index.add("a.*", i)
    assert len(index) == 5
    assert sorted(index.match("a.b")) == [0, 1, 2, 3, 4]


def test_dollar_topics_are_not_matched_by_a_leading_wildcard() -> None:
    index = build(">", "*", "*.x", "*.>", "*.*", "$SYS.>", "$SYS.*", "$SYS.x", "$SYS")
    assert names(index.match("$SYS.x")) == Counter(["$SYS.>", "$SYS.*", "$SYS.x"])
    assert index.match("$SYS") == ("$SYS",)
    assert index.match("$other.x") == ()


def test_dollar_only_matters_in_the_first_token() -> None:
    index = build("a.*", "a.>", "*.$b", ">")
    assert names(index.match("a.$b")) == Counter(["a.*", "a.>", "*.$b", ">"])


# ---- remove and the cache --------------------------------------------------------------------------


def test_remove() -> None:
    index = build("a.b", "a.*", ">")
    assert index.remove("a.*", "a.*") is True
    assert len(index) == 2
    assert names(index.match("a.b")) == Counter(["a.b", ">"])
    assert index.remove("a.*", "a.*") is False  # already gone
    assert len(index) == 2


@pytest.mark.parametrize(
    ("pattern", "entry"),
    [("x.y", "a.b"), ("a.b", "other"), ("a", "a.b"), ("a.b.c", "a.b"), ("a.>", "a.b"), ("*.b", "a.b")],
)
def test_remove_what_is_not_there(pattern: str, entry: str) -> None:
    index = build("a.b")
    assert index.remove(pattern, entry) is False
    assert len(index) == 1
    assert index.match("a.b") == ("a.b",)


def test_remove_one_of_several_entries() -> None:
    index: TopicIndex[int] = TopicIndex()
    index.add("a", 1)
    index.add("a", 2)
    assert index.remove("a", 1)
    assert index.match("a") == (2,)


def test_cache_is_invalidated_by_add_and_remove() -> None:
    index = build("a.b")
    assert index.match("a.c") == ()
    first = index.match("a.b")
    assert first == ("a.b",)
    assert index.match("a.b") is first  # served from the cache
    index.add("a.*", "a.*")
    assert names(index.match("a.b")) == Counter(["a.b", "a.*"])
    assert index.match("a.c") == ("a.*",)
    index.remove("a.b", "a.b")
    assert index.match("a.b") == ("a.*",)
    index.remove("a.*", "a.*")
    assert index.match("a.b") == ()
    assert index.match("a.c") == ()


def test_failed_remove_keeps_answers_correct() -> None:
    index = build("a.b")
    assert index.match("a.b") == ("a.b",)
    index.remove("a.b", "nope")
    assert index.match("a.b") == ("a.b",)


def test_cache_is_bounded() -> None:
    index: TopicIndex[str] = TopicIndex(cache_size=3)
    index.add(">", ">")
    for i in range(50):
        assert index.match(f"t{i}") == (">",)
        assert len(index._cache) <= 3


# ---- pruning ---------------------------------------------------------------------------------------


PATTERNS = ["a", "a.b", "a.b.c", "a.*", "a.*.c", "a.>", "*", "*.b", "*.*.>", ">", "x.y.z.>", "x.*.*.w"]


def test_removing_everything_leaves_an_empty_root() -> None:
    index = build(*PATTERNS)
    for p in reversed(PATTERNS):
        assert index.remove(p, p)
    root = index._root
    assert root.empty()
    assert root.children == {}
    assert root.star is None
    assert root.exact == []
    assert root.tail == []
    assert len(index) == 0


@pytest.mark.parametrize("order", [PATTERNS, list(reversed(PATTERNS)), sorted(PATTERNS)])
def test_pruning_in_any_order(order: list[str]) -> None:
    index = build(*PATTERNS)
    for p in order:
        index.remove(p, p)
    assert index._root.empty()


def test_pruning_keeps_nodes_still_in_use() -> None:
    index = build("a.b", "a.b.c.d", "a.*.c")
    assert index.remove("a.b.c.d", "a.b.c.d")
    b = index._root.children["a"].children["b"]
    assert b.children == {}  # c and d pruned
    assert b.exact == ["a.b"]
    assert index._root.children["a"].star is not None
    assert index.remove("a.*.c", "a.*.c")
    assert index._root.children["a"].star is None
    assert index.match("a.b") == ("a.b",)


def test_a_pattern_can_be_added_again_after_pruning() -> None:
    index = build("a.b.c")
    index.remove("a.b.c", "a.b.c")
    index.add("a.b.c", "again")
    assert index.match("a.b.c") == ("again",)


# ---- cost does not depend on non-matching subscriptions (no timing) ---------------------------------


class _CountingDict(dict):  # type: ignore[type-arg]
    """A node's children map that counts its use: a lookup costs 1, a scan costs its length.

    Matching looks up each topic token in the children of every node it reaches, so the count
    measures the work of a match without a clock; a match that scanned children would show too.
    """

    lookups = 0

    def get(self, key: Any, default: Any = None) -> Any:
        _CountingDict.lookups += 1
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        _CountingDict.lookups += 1
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        _CountingDict.lookups += 1
        return super().__contains__(key)

    def __iter__(self) -> Any:
        _CountingDict.lookups += len(self)
        return super().__iter__()

    def keys(self) -> Any:
        _CountingDict.lookups += len(self)
        return super().keys()

    def values(self) -> Any:
        _CountingDict.lookups += len(self)
        return super().values()

    def items(self) -> Any:
        _CountingDict.lookups += len(self)
        return super().items()


def _instrument(node: _Node[Any]) -> None:
    node.children = _CountingDict(node.children)
    for child in node.children.values():
        _instrument(child)
    if node.star is not None:
        _instrument(node.star)


def _visits(index: TopicIndex[Any], topic: str) -> tuple[int, tuple[Any, ...]]:
    _instrument(index._root)
    _CountingDict.lookups = 0
    result = index.match(topic)
    return _CountingDict.lookups, result


MATCHING = ["sensors.kitchen.temp", "sensors.*.temp", "sensors.>", "*.kitchen.>", ">"]


def _with_noise(n: int) -> TopicIndex[str]:
    index = build(*MATCHING)
    for i in range(n):
        index.add(f"other{i}.kitchen.temp", "noise")  # other first tokens
        index.add(f"sensors.room{i}.temp", "noise")  # same prefix, other second token
        index.add(f"sensors.kitchen.temp{i}", "noise")  # siblings of the matching leaf
        index.add(f"sensors.kitchen.temp.x{i}", "noise")  # deeper than the topic
    return index


def test_match_visits_the_same_nodes_with_many_non_matching_subscriptions() -> None:
    small_visits, small = _visits(_with_noise(0), "sensors.kitchen.temp")
    big_index = _with_noise(25_000)
    assert len(big_index) == len(MATCHING) + 100_000
    big_visits, big = _visits(big_index, "sensors.kitchen.temp")
    assert names(small) == names(big) == Counter(MATCHING)
    assert big_visits == small_visits
    # One lookup per (node reached, token): root, sensors, sensors.kitchen/sensors.*, and the
    # '*' branch from the root for the first two tokens.
    assert 0 < small_visits <= 10


def test_match_is_right_among_100k_non_matching_subscriptions() -> None:
    index = _with_noise(25_000)
    assert names(index.match("sensors.kitchen.temp")) == Counter(MATCHING)
    assert names(index.match("sensors.room7.temp")) == Counter(["sensors.*.temp", "sensors.>", ">", "noise"])
    assert index.match("nothing.here.at.all") == (">",)
