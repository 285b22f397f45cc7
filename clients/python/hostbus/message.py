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
    """One delivered message. ``data`` is bytes; ``headers`` a dict of str to str."""

    __slots__ = ("_respond", "data", "headers", "reply_to", "retained", "sender", "sid", "topic")

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
