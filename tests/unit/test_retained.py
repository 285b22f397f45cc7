"""RetainedStore: replace, delete, bounds, and pattern lookup through its trie."""

from __future__ import annotations

import pytest

from hostbus.errors import LimitExceededError
from hostbusd.core.identity import Identity
from hostbusd.core.retained import RetainedStore

ME = Identity(1, 1000, 100, 42)


def test_put_replace_delete_and_prune() -> None:
    store = RetainedStore(10, 1000)
    store.put("a.b.c", ME, b"one", 3)
    store.put("a.b.c", ME, b"three", 5)
    assert len(store) == 1 and store.nbytes == 5
    assert [b for _, b in store.matching("a.>")] == [b"three"]
    store.put("a.b.c", ME, b"", 0)  # empty payload deletes
    assert len(store) == 0 and store.nbytes == 0
    assert store._root.children == {}  # the empty branch is gone
    store.put("a.b", ME, b"x", 1)  # deleting what is not there is a no-op
    store.put("a.b.c", ME, b"", 0)
    assert [b for _, b in store.matching("a.b")] == [b"x"]


def test_bounds_refuse_new_topics_and_oversize() -> None:
    store = RetainedStore(2, 10)
    store.put("a", ME, b"12345", 5)
    store.put("b", ME, b"1", 1)
    with pytest.raises(LimitExceededError, match=r"retained\.max_topics"):
        store.put("c", ME, b"1", 1)
    store.put("a", ME, b"123456789", 9)  # replacing is allowed within bytes
    with pytest.raises(LimitExceededError, match=r"retained\.max_bytes"):
        store.put("b", ME, b"12", 2)
    assert len(store) == 2 and store.nbytes == 10


def test_a_pattern_that_matches_nothing_visits_no_topics() -> None:
    store = RetainedStore(20_000, 1 << 30)
    for i in range(10_000):
        store.put(f"sensor.{i}.temp", ME, b"x", 1)
    assert list(store.matching("other.>")) == []
    assert list(store.matching("sensor.5.humidity")) == []
    assert len(list(store.matching("sensor.*.temp"))) == 10_000
    assert len(list(store.matching("sensor.77.*"))) == 1


def test_leading_wildcards_skip_broker_topics() -> None:
    store = RetainedStore(10, 1000)
    store.put("$SYS.x", ME, b"s", 1)
    store.put("app.x", ME, b"a", 1)
    assert [b for _, b in store.matching(">")] == [b"a"]
    assert [b for _, b in store.matching("*.x")] == [b"a"]
    assert [b for _, b in store.matching("$SYS.>")] == [b"s"]
