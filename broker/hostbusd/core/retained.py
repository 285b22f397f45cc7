"""RetainedStore: the last retained message of each topic, bounded by topic count and bytes.

A publish with the retain flag replaces the topic's stored message; one with an empty payload
deletes it (the MQTT convention). New plain subscriptions receive the stored messages that
match their pattern before anything else. Lookup at subscribe time scans the store: it is
bounded by ``retained.max_topics`` and subscribing is rare next to publishing.
"""

from __future__ import annotations

from collections.abc import Iterator

from hostbus import topics
from hostbus.errors import ErrorCode, LimitExceededError
from hostbusd.core.identity import Identity


class RetainedStore:
    def __init__(self, max_topics: int, max_bytes: int) -> None:
        self.max_topics = max_topics
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: dict[str, tuple[Identity, bytes]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def put(self, topic: str, ident: Identity, block: bytes, payload_len: int) -> None:
        """Store (or with an empty payload, delete); raises LimitExceededError when full."""
        old = self._items.get(topic)
        old_size = len(old[1]) if old else 0
        if payload_len == 0:
            if old:
                del self._items[topic]
                self.nbytes -= old_size
            return
        if old is None and len(self._items) >= self.max_topics:
            raise LimitExceededError(
                f"retained store holds {len(self._items)} topics, the limit (retained.max_topics); "
                f"{topic!r} was delivered but not retained",
                code=ErrorCode.LIMIT,
            )
        if self.nbytes - old_size + len(block) > self.max_bytes:
            raise LimitExceededError(
                f"retained store would exceed {self.max_bytes} bytes (retained.max_bytes); "
                f"{topic!r} was delivered but not retained",
                code=ErrorCode.LIMIT,
            )
        self._items[topic] = (ident, block)
        self.nbytes += len(block) - old_size

    def matching(self, pattern: str) -> Iterator[tuple[Identity, bytes]]:
        for topic, item in self._items.items():
            if topics.matches(pattern, topic):
                yield item
