"""The exception tree of hostbus and the one table that maps wire error codes to it.

Every error the library raises derives from :class:`HostbusError`. Errors that came from the
broker carry the numeric wire ``code`` (see ``docs/protocol.md``); errors raised locally carry
``code = None``. Each error has a ``hint``: what to do about it.
"""

from __future__ import annotations

import builtins
import enum


class ErrorCode(enum.IntEnum):
    """Stable numeric error codes carried by ERR frames. Never renumber: clients depend on them."""

    PROTOCOL = 1  # malformed frame
    FRAME_TOO_LARGE = 2
    UNKNOWN_FRAME = 3
    HANDSHAKE = 4
    INVALID_TOPIC = 5
    INVALID_HEADERS = 6
    LIMIT = 7
    SLOW_CONSUMER = 8
    PERMISSION_DENIED = 9
    SHUTTING_DOWN = 10
    TIMEOUT = 11
    DUPLICATE_ID = 12
    CONNECTION_LIMIT = 13
    INVALID_ARGUMENT = 14
    INTERNAL = 15
    RING_ENDED = 16  # a shared-memory ring ended (its error names the ring and why)
    STORAGE = 17  # a topic queue could not store a message (disk full, I/O error)
    QUEUE_FULL = 18  # a topic queue with discard = new is at a limit
    NOT_FOUND = 19  # no topic queue (or consumer) of that name


class HostbusError(Exception):
    """Root of every hostbus error."""

    code: ErrorCode | None = None
    hint: str = ""

    def __init__(self, message: str, *, code: int | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            try:
                self.code = ErrorCode(code)
            except ValueError:
                self.code = None
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.hint})" if self.hint else text


class ProtocolError(HostbusError):
    """A party broke the wire protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The other side sent bytes that are not valid protocol; the connection cannot continue."""

    def __init__(self, message: str, *, code: int = ErrorCode.PROTOCOL, hint: str | None = None) -> None:
        super().__init__(message, code=code, hint=hint)


class InvalidTopicError(HostbusError, ValueError):
    """A topic or subscription pattern is not well formed."""

    hint = "topics are dot-separated tokens of printable characters without spaces"


class InvalidHeadersError(HostbusError, ValueError):
    """Message headers are not a mapping of non-empty strings to strings within the size limit."""


class MessageTooLargeError(HostbusError, ValueError):
    """A message does not fit in one frame under the broker's limit."""

    hint = "split the payload, or raise limits.max_frame_bytes in the broker configuration"


class LimitExceededError(HostbusError):
    """A broker limit was reached (subscriptions per connection, retained topics, ...)."""


class PermissionDeniedError(HostbusError, PermissionError):
    """The broker refused the operation for this peer."""


class NoRespondersError(HostbusError):
    """A request found no subscriber for its topic; raised at once, not after the timeout."""

    hint = "start a responder subscribed to the topic, or check the topic name"


class TimeoutError(HostbusError, builtins.TimeoutError):
    """Nothing arrived within the given timeout."""


class ConnectionLostError(HostbusError, ConnectionError):
    """The connection broke under us (broker stopped, socket error, protocol violation)."""


class ClosedError(HostbusError):
    """The connection or subscription was closed by this side; it cannot be used any more."""


class SlowConsumerError(HostbusError):
    """The broker ended the connection because this client did not read fast enough."""


class ShuttingDownError(ConnectionLostError):
    """The broker is stopping."""


class BrokerError(HostbusError):
    """An error reported by the broker that has no more specific class."""


class RingClosedError(HostbusError):
    """A shared-memory ring is closed: by its owner, by the broker (the message says why), or
    because the connection it belongs to is lost."""


class StorageError(HostbusError):
    """A topic queue could not store a message (the disk is full, a write failed): it was not
    confirmed; what was confirmed before is kept."""

    hint = "free disk space or check the broker's log; the message was not stored"


class QueueFullError(LimitExceededError):
    """A topic queue that refuses new messages at its limit (discard = new) is full."""

    hint = "consume and acknowledge messages, or raise the queue's max_msgs / max_bytes"


class NotFoundError(HostbusError, LookupError):
    """No topic queue or consumer of that name."""


_CODE_TO_CLASS: dict[int, type[HostbusError]] = {
    ErrorCode.PROTOCOL: RemoteProtocolError,
    ErrorCode.FRAME_TOO_LARGE: MessageTooLargeError,
    ErrorCode.UNKNOWN_FRAME: RemoteProtocolError,
    ErrorCode.HANDSHAKE: RemoteProtocolError,
    ErrorCode.INVALID_TOPIC: InvalidTopicError,
    ErrorCode.INVALID_HEADERS: InvalidHeadersError,
    ErrorCode.LIMIT: LimitExceededError,
    ErrorCode.SLOW_CONSUMER: SlowConsumerError,
    ErrorCode.PERMISSION_DENIED: PermissionDeniedError,
    ErrorCode.SHUTTING_DOWN: ShuttingDownError,
    ErrorCode.TIMEOUT: RemoteProtocolError,
    ErrorCode.DUPLICATE_ID: BrokerError,
    ErrorCode.CONNECTION_LIMIT: LimitExceededError,
    ErrorCode.INVALID_ARGUMENT: BrokerError,
    ErrorCode.INTERNAL: BrokerError,
    ErrorCode.RING_ENDED: RingClosedError,
    ErrorCode.STORAGE: StorageError,
    ErrorCode.QUEUE_FULL: QueueFullError,
    ErrorCode.NOT_FOUND: NotFoundError,
}


def error_from_code(code: int, message: str) -> HostbusError:
    """The exception for an ERR frame received from the broker."""
    cls = _CODE_TO_CLASS.get(code, BrokerError)
    if cls is RemoteProtocolError:
        return RemoteProtocolError(message, code=code)
    return cls(message, code=code)
