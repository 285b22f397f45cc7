"""RetainedStore: the last retained message of each topic, bounded by topic count and bytes.

A publish with the retain flag replaces the topic's stored message; one with an empty payload
deletes it (the MQTT convention). New plain subscriptions receive the stored messages that
match their pattern before anything else.

The store is a token trie, so finding the messages for a pattern walks only the branches the
pattern can match: a subscription that matches nothing costs a few dictionary lookups however
many topics are retained, and one that matches k topics costs about k steps (``*`` and ``>``
visit the children they match, which are exactly the candidates).
"""

from __future__ import annotations

from collections.abc import Iterator

from hostbus.errors import ErrorCode, LimitExceededError
from hostbusd.core.identity import Identity

Item = tuple[Identity, bytes]


class _Node:
    __slots__ = ("children", "item")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.item: Item | None = None


class RetainedStore:
    """``max_topics_per_uid``/``max_bytes_per_uid`` bound what the publishers of one uid hold
    (a topic belongs to the uid that retained its current message), so one user cannot fill
    the store for the others."""

    def __init__(self, max_topics: int, max_bytes: int, max_topics_per_uid: int | None = None,
                 max_bytes_per_uid: int | None = None) -> None:
        self.max_topics = max_topics
        self.max_bytes = max_bytes
        self.max_topics_per_uid = max_topics if max_topics_per_uid is None else max_topics_per_uid
        self.max_bytes_per_uid = max_bytes if max_bytes_per_uid is None else max_bytes_per_uid
        self.nbytes = 0
        self._count = 0
        self._root = _Node()
        self.per_uid: dict[int, list[int]] = {}  # uid -> [topics, bytes]

    def _charge(self, uid: int, topics: int, nbytes: int) -> None:
        used = self.per_uid.setdefault(uid, [0, 0])
        used[0] += topics
        used[1] += nbytes
        if not used[0]:
            del self.per_uid[uid]

    def __len__(self) -> int:
        return self._count

    def _find(self, topic: str) -> _Node | None:
        node: _Node | None = self._root
        for tok in topic.split("."):
            node = node.children.get(tok) if node is not None else None
        return node

    def put(self, topic: str, ident: Identity, block: bytes, payload_len: int) -> None:
        """Store (or with an empty payload, delete); raises LimitExceededError when full."""
        node = self._find(topic)
        old = node.item if node is not None else None
        old_size = len(old[1]) if old else 0
        if payload_len == 0:
            if old:
                self._delete(topic)
                self.nbytes -= old_size
                self._charge(old[0].uid, -1, -old_size)
            return
        uid = ident.uid
        same_owner = old is not None and old[0].uid == uid
        used_topics, used_bytes = self.per_uid.get(uid, (0, 0))
        if not same_owner and used_topics >= self.max_topics_per_uid:
            raise LimitExceededError(
                f"uid {uid} already retains {used_topics} topics, the limit (retained.max_topics_per_uid); "
                f"{topic!r} was delivered but not retained",
                code=ErrorCode.LIMIT,
            )
        if used_bytes - (old_size if same_owner else 0) + len(block) > self.max_bytes_per_uid:
            raise LimitExceededError(
                f"uid {uid} would retain more than {self.max_bytes_per_uid} bytes (retained.max_bytes_per_uid); "
                f"{topic!r} was delivered but not retained",
                code=ErrorCode.LIMIT,
            )
        if old is None and self._count >= self.max_topics:
            raise LimitExceededError(
                f"retained store holds {self._count} topics, the limit (retained.max_topics); "
                f"{topic!r} was delivered but not retained",
                code=ErrorCode.LIMIT,
            )
        if self.nbytes - old_size + len(block) > self.max_bytes:
            raise LimitExceededError(
                f"retained store would exceed {self.max_bytes} bytes (retained.max_bytes); "
                f"{topic!r} was delivered but not retained",
                code=ErrorCode.LIMIT,
            )
        if node is None:
            node = self._root
            for tok in topic.split("."):
                child = node.children.get(tok)
                if child is None:
                    child = node.children[tok] = _Node()
                node = child
        if old is None:
            self._count += 1
        else:
            self._charge(old[0].uid, -1, -old_size)
        node.item = (ident, block)
        self.nbytes += len(block) - old_size
        self._charge(uid, 1, len(block))

    def _delete(self, topic: str) -> None:
        path: list[tuple[_Node, str]] = []
        node = self._root
        for tok in topic.split("."):
            path.append((node, tok))
            node = node.children[tok]
        node.item = None
        self._count -= 1
        while path and node.item is None and not node.children:  # prune empty branches
            parent, tok = path.pop()
            del parent.children[tok]
            node = parent

    def matching(self, pattern: str) -> Iterator[Item]:
        """The stored messages whose topic matches ``pattern`` (a leading wildcard skips '$')."""
        tokens = pattern.split(".")
        last = len(tokens) - 1
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            tok = tokens[i]
            if tok == ">":
                below = [c for name, c in node.children.items() if not (i == 0 and name.startswith("$"))]
                while below:  # every topic under here, at least one token deeper
                    n = below.pop()
                    if n.item is not None:
                        yield n.item
                    below.extend(n.children.values())
                continue
            if tok == "*":
                children = [c for name, c in node.children.items() if not (i == 0 and name.startswith("$"))]
            else:
                child = node.children.get(tok)
                children = [child] if child is not None else []
            for child in children:
                if i == last:
                    if child.item is not None:
                        yield child.item
                else:
                    stack.append((child, i + 1))
