"""Message and Sender: what a subscriber receives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class Sender(NamedTuple):
    """Who published a message, as the broker saw it (the kernel's SO_PEERCRED for socket peers).

    ``origin`` is empty for Unix-socket peers; other ingress points name themselves there.
    """

    uid: int
    gid: int
    pid: int
    origin: str = ""


class Message:
    """One delivered message. ``data`` is bytes; ``headers`` a dict of str to str.

    A message from a topic queue (``bus.consume``) also has ``seq`` (its sequence number in the
    queue), ``delivery_count`` (1 the first time), ``stored_at`` (Unix seconds) and the answers
    :meth:`ack`, :meth:`nak`, :meth:`term` and :meth:`in_progress`. They are sent with the next
    write (they never block, in either client); :meth:`Bus.flush` waits until the broker has
    them. Other messages have ``seq = 0``.
    """

    __slots__ = ("_respond", "data", "headers", "reply_to", "retained", "sender", "sid", "topic")

    # A topic queue's message (QueueMessage) has its own values; every other message these.
    seq = 0
    delivery_count = 0
    stored_ns = 0
    _answer: Callable[[int, int, int, int], None] | None = None

    def __init__(
        self,
        topic: str,
        data: bytes,
        headers: dict[str, str],
        sender: Sender,
        reply_to: str | None,
        sid: int,
        retained: bool,
        respond: Callable[..., Any] | None = None,
    ) -> None:
        self.topic = topic
        self.data = data
        self.headers = headers
        self.sender = sender
        self.reply_to = reply_to
        self.sid = sid
        self.retained = retained
        self._respond = respond

    @property
    def stored_at(self) -> float:
        """When the topic queue stored it (Unix seconds; 0 for other messages)."""
        return self.stored_ns / 1e9

    def _send_answer(self, kind: int, delay: float | None = None) -> None:
        if self._answer is None:
            raise ValueError(f"message on {self.topic!r} is not from a topic queue: there is nothing to acknowledge")
        delay_ms = 0xFFFFFFFF if delay is None else max(0, min(int(delay * 1000), 0xFFFFFFFE))
        self._answer(self.sid, kind, self.seq, delay_ms)

    def ack(self) -> None:
        """Done: the queue will not deliver it to this consumer again."""
        self._send_answer(0)

    def nak(self, delay: float | None = None) -> None:
        """Not done: deliver it again after ``delay`` seconds (default: the consumer's backoff, else at once)."""
        self._send_answer(1, delay)

    def term(self) -> None:
        """Never deliver it again to this consumer (it is not dead-lettered)."""
        self._send_answer(2)

    def in_progress(self) -> None:
        """Still working on it: its redelivery deadline moves ``ack_wait`` from now."""
        self._send_answer(3)

    def respond(self, data: bytes | str, headers: dict[str, str] | None = None) -> Any:
        """Publish ``data`` to this message's ``reply_to`` (with the asyncio client: await it)."""
        if not self.reply_to or self._respond is None:
            raise ValueError(f"message on {self.topic!r} has no reply_to: it was not sent as a request")
        return self._respond(self.reply_to, data, headers)

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def __repr__(self) -> str:
        data = self.data if len(self.data) <= 40 else self.data[:40] + b"..."
        return f"<Message {self.topic!r} {data!r} from uid={self.sender.uid} pid={self.sender.pid}>"


class QueueMessage(Message):
    """A message of a topic queue's consumer: its ``seq``, ``delivery_count``, ``stored_at``, and
    the answers (ack, nak, term, in_progress) go back to the broker."""

    __slots__ = ("_answer", "delivery_count", "seq", "stored_ns")

    def __init__(self, topic: str, data: bytes, headers: dict[str, str], sender: Sender, reply_to: str | None,
                 sid: int, seq: int, delivery_count: int, stored_ns: int,
                 answer: Callable[[int, int, int, int], None] | None, respond: Callable[..., Any] | None = None,
                 ) -> None:
        super().__init__(topic, data, headers, sender, reply_to, sid, False, respond)
        self.seq = seq
        self.delivery_count = delivery_count
        self.stored_ns = stored_ns
        self._answer = answer


#: A run of plain messages to one subscription, kept as its payloads until they are taken:
#: (payloads, topic, headers or None, sender, sid, respond). Waiting messages are then a few
#: objects per run for the garbage collector, not one per message, and a message is made only
#: when a consumer takes it (docs/protocol.md, "Runs").
Run = tuple[list[bytes], str, dict[str, str] | None, Sender, int, Callable[..., Any] | None]
#: What a subscription's queue holds: single messages and runs.
Entry = Message | Run
