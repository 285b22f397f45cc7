"""OutboundQueue: the bounded backlog of one subscription, and its overflow policies.

Messages wait here only while the subscriber's connection cannot take more (the transport asked
us to pause writing). The queue is bounded by message count and bytes; the connection adds a
third bound shared by all its subscriptions. When a bound would be exceeded the policy decides:

* ``drop-oldest`` - drop queued messages from the head until the new one fits (freshest data
  wins; the usual choice for telemetry),
* ``drop-new`` - drop the incoming message (what was queued first is delivered first),
* ``disconnect`` - the subscriber's connection is closed with a SLOW_CONSUMER error.

Every drop increments ``missed``; the subscriber receives a GAP frame with that count before the
next message it gets, so loss is never silent.
"""

from __future__ import annotations

from collections import deque
from typing import Any

#: What a queue stores: (sender identity, message block, MSG flags). Kept opaque here.
Item = tuple[Any, bytes, int]

DROP_OLDEST = "drop-oldest"
DROP_NEW = "drop-new"
DISCONNECT = "disconnect"


class Overflow(Exception):
    """Raised by :meth:`OutboundQueue.push` under the ``disconnect`` policy."""


class OutboundQueue:
    __slots__ = ("items", "max_bytes", "max_msgs", "missed", "nbytes", "policy")

    def __init__(self, policy: str, max_msgs: int, max_bytes: int) -> None:
        self.items: deque[Item] = deque()
        self.nbytes = 0
        self.missed = 0  # dropped since the last GAP notice
        self.policy = policy
        self.max_msgs = max_msgs
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.items)

    def push(self, item: Item, size: int, room: int) -> int:
        """Queue ``item`` of ``size`` bytes, given ``room`` bytes left in the connection budget.

        Returns the change in queued bytes (negative when drops freed more than was added), so
        the connection can keep its own total. Raises :class:`Overflow` under ``disconnect``.
        """
        items = self.items
        if len(items) < self.max_msgs and self.nbytes + size <= self.max_bytes and size <= room:
            items.append(item)
            self.nbytes += size
            return size
        if self.policy == DISCONNECT:
            raise Overflow
        if self.policy == DROP_NEW or size > self.max_bytes:
            self.missed += 1
            return 0
        # drop-oldest: make room in this queue (the connection budget counts it too).
        freed = 0
        while items and (
            len(items) >= self.max_msgs or self.nbytes + size > self.max_bytes or size > room + freed
        ):
            _, block, _ = items.popleft()
            self.nbytes -= len(block)
            freed += len(block)
            self.missed += 1
        if size > room + freed:  # other subscriptions hold the connection budget
            self.missed += 1
            return -freed
        items.append(item)
        self.nbytes += size
        return size - freed

    def pop(self) -> Item:
        item = self.items.popleft()
        self.nbytes -= len(item[1])
        return item

    def clear(self) -> int:
        """Drop everything (the subscription ended); returns the bytes freed."""
        freed = self.nbytes
        self.items.clear()
        self.nbytes = 0
        return freed
