"""RetainedStore.matching agrees with the reference definition of pattern matching."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hostbus import topics
from hostbusd.core.identity import Identity
from hostbusd.core.retained import RetainedStore
from tests.property.test_wire_properties import small_patterns, small_topics

ME = Identity(1, 1000, 100, 42)


@given(stored=st.lists(small_topics, max_size=15), pattern=small_patterns())
def test_matching_agrees_with_the_reference(stored: list[str], pattern: str) -> None:
    store = RetainedStore(100, 1 << 20)
    for t in stored:
        store.put(t, ME, t.encode(), 1)
    got = sorted(b.decode() for _, b in store.matching(pattern))
    assert got == sorted({t for t in stored if topics.matches(pattern, t)})
