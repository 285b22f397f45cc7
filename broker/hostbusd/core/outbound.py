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

An item may be a run (many messages on one topic, delivered as one MSGN frame): it counts as
its number of messages against ``max_msgs`` and in ``missed``, and is kept or dropped whole. A
run that alone exceeds a bound of the queue is dropped (counted), whatever the policy but
``disconnect``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

#: What a queue stores: (sender identity, message block or run, MSG flags, messages in the run
#: or 0 for a single message block). Kept opaque here but for the last field.
Item = tuple[Any, bytes, int, int]

DROP_OLDEST = "drop-oldest"
DROP_NEW = "drop-new"
DISCONNECT = "disconnect"


class Overflow(Exception):
    """Raised by :meth:`OutboundQueue.push` under the ``disconnect`` policy."""


class OutboundQueue:
    __slots__ = ("items", "max_bytes", "max_msgs", "missed", "msgs", "nbytes", "policy")

    def __init__(self, policy: str, max_msgs: int, max_bytes: int) -> None:
        self.items: deque[Item] = deque()
        self.nbytes = 0
        self.msgs = 0  # messages held (a run counts as its messages)
        self.missed = 0  # dropped since the last GAP notice
        self.policy = policy
        self.max_msgs = max_msgs
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return self.msgs

    def push(self, item: Item, size: int, room: int) -> int:
        """Queue ``item`` of ``size`` bytes, given ``room`` bytes left in the connection budget.

        Returns the change in queued bytes (negative when drops freed more than was added), so
        the connection can keep its own total. Raises :class:`Overflow` under ``disconnect``.
        """
        items = self.items
        n = item[3] or 1
        if self.msgs + n <= self.max_msgs and self.nbytes + size <= self.max_bytes and size <= room:
            items.append(item)
            self.nbytes += size
            self.msgs += n
            return size
        if self.policy == DISCONNECT:
            raise Overflow
        if self.policy == DROP_NEW or size > self.max_bytes or n > self.max_msgs:
            self.missed += n
            return 0
        # drop-oldest: make room in this queue (the connection budget counts it too).
        freed = 0
        while items and (
            self.msgs + n > self.max_msgs or self.nbytes + size > self.max_bytes or size > room + freed
        ):
            _, block, _, k = items.popleft()
            self.nbytes -= len(block)
            self.msgs -= k or 1
            freed += len(block)
            self.missed += k or 1
        if size > room + freed:  # other subscriptions hold the connection budget
            self.missed += n
            return -freed
        items.append(item)
        self.nbytes += size
        self.msgs += n
        return size - freed

    def pop(self) -> Item:
        item = self.items.popleft()
        self.nbytes -= len(item[1])
        self.msgs -= item[3] or 1
        return item

    def clear(self) -> int:
        """Drop everything (the subscription ended); returns the bytes freed."""
        freed = self.nbytes
        self.items.clear()
        self.nbytes = 0
        self.msgs = 0
        return freed
