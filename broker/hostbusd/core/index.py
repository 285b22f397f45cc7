"""TopicIndex: which subscriptions match a topic, in time independent of the non-matching ones.

A token trie: each node has literal children, a ``*`` child, and the entries subscribed at that
node exactly or with a trailing ``>``. Matching walks at most two branches per topic token
(the literal and ``*``), so its cost depends on the topic's depth and on the subscriptions that
do match, never on the number that don't. Results are cached per topic (most traffic repeats a
small set of topics); any change to the index empties the cache, which is the price of a
subscribe or unsubscribe (rare next to publishes) instead of a per-publish cost.

Entries are opaque objects (subscriptions or queue groups); the index only stores them.
Topics whose first token starts with ``$`` are not matched by a leading wildcard.
"""

from __future__ import annotations

from typing import Generic, TypeVar

E = TypeVar("E")


class _Node(Generic[E]):
    __slots__ = ("children", "exact", "star", "tail")

    def __init__(self) -> None:
        self.children: dict[str, _Node[E]] = {}
        self.star: _Node[E] | None = None
        self.exact: list[E] = []  # pattern ends at this node
        self.tail: list[E] = []  # pattern ends with '>' after this node

    def empty(self) -> bool:
        return not (self.children or self.star or self.exact or self.tail)


class TopicIndex(Generic[E]):
    """Maps patterns to entries; ``match(topic)`` returns the entries whose pattern matches."""

    def __init__(self, cache_size: int = 65536) -> None:
        self._root: _Node[E] = _Node()
        self._cache: dict[str, tuple[E, ...]] = {}
        self._cache_size = cache_size
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: str, entry: E) -> None:
        node = self._root
        tokens = pattern.split(".")
        for i, tok in enumerate(tokens):
            if tok == ">" and i == len(tokens) - 1:
                node.tail.append(entry)
                break
            if tok == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                nxt = node.children.get(tok)
                if nxt is None:
                    nxt = node.children[tok] = _Node()
                node = nxt
        else:
            node.exact.append(entry)
        self._count += 1
        self._cache.clear()

    def remove(self, pattern: str, entry: E) -> bool:
        """Remove one entry; prunes empty nodes. False if it was not there."""
        tokens = pattern.split(".")
        path: list[tuple[_Node[E], str]] = []
        node = self._root
        for i, tok in enumerate(tokens):
            if tok == ">" and i == len(tokens) - 1:
                bucket = node.tail
                break
            nxt = node.star if tok == "*" else node.children.get(tok)
            if nxt is None:
                return False
            path.append((node, tok))
            node = nxt
        else:
            bucket = node.exact
        try:
            bucket.remove(entry)
        except ValueError:
            return False
        self._count -= 1
        self._cache.clear()
        while path and node.empty():
            parent, tok = path.pop()
            if tok == "*":
                parent.star = None
            else:
                del parent.children[tok]
            node = parent
        return True

    def match(self, topic: str) -> tuple[E, ...]:
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        out: list[E] = []
        tokens = topic.split(".")
        last = len(tokens) - 1
        # Nodes reached after consuming tokens[:i]; '$' topics skip the root's wildcards.
        level: list[_Node[E]] = [self._root]
        for i, tok in enumerate(tokens):
            nxt: list[_Node[E]] = []
            for node in level:
                if node.tail and not (i == 0 and tok.startswith("$")):
                    out.extend(node.tail)
                child = node.children.get(tok)
                if child is not None:
                    nxt.append(child)
                if node.star is not None and not (i == 0 and tok.startswith("$")):
                    nxt.append(node.star)
            if not nxt:
                break
            level = nxt
            if i == last:
                for node in level:
                    out.extend(node.exact)
        result = tuple(out)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[topic] = result
        return result
