"""hostbus: the thin client library for the hostbus broker (standard library only).

    import hostbus
    with hostbus.connect() as bus:
        sub = bus.subscribe("sensors.>")
        bus.publish("sensors.kitchen.temp", b"21.5")
        msg = sub.next(timeout=1)

The asyncio flavour is :mod:`hostbus.aio`, with the same names.
"""

from typing import TYPE_CHECKING, Any

from hostbus.errors import (
    BrokerError,
    ClosedError,
    ConnectionLostError,
    ErrorCode,
    HostbusError,
    InvalidHeadersError,
    InvalidTopicError,
    LimitExceededError,
    LocalProtocolError,
    MessageTooLargeError,
    NoRespondersError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    QueueFullError,
    RemoteProtocolError,
    RingClosedError,
    ShuttingDownError,
    SlowConsumerError,
    StorageError,
    TimeoutError,
)
from hostbus.message import Message, QueueMessage, Sender

__version__ = "0.1.0"

#: Imported on first use (PEP 562), so that a process which needs only the wire format, the
#: topics and the errors (the broker does) does not load the client and its dependencies.
_CLIENT_NAMES = frozenset({"Bus", "Consumption", "Subscription", "connect"})

if TYPE_CHECKING:
    from hostbus.client import Bus, Consumption, Subscription, connect
else:
    def __getattr__(name: str) -> Any:
        if name in _CLIENT_NAMES:
            from hostbus import client  # noqa: PLC0415 - on first use, see _CLIENT_NAMES

            return getattr(client, name)
        raise AttributeError(f"module 'hostbus' has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(globals()) | _CLIENT_NAMES)

__all__ = [
    "BrokerError",
    "Bus",
    "ClosedError",
    "ConnectionLostError",
    "Consumption",
    "ErrorCode",
    "HostbusError",
    "InvalidHeadersError",
    "InvalidTopicError",
    "LimitExceededError",
    "LocalProtocolError",
    "Message",
    "MessageTooLargeError",
    "NoRespondersError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "QueueFullError",
    "QueueMessage",
    "RemoteProtocolError",
    "RingClosedError",
    "Sender",
    "ShuttingDownError",
    "SlowConsumerError",
    "StorageError",
    "Subscription",
    "TimeoutError",
    "connect",
]
