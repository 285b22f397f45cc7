"""hostbus: the thin client library for the hostbus broker (standard library only).

    import hostbus
    with hostbus.connect() as bus:
        sub = bus.subscribe("sensors.>")
        bus.publish("sensors.kitchen.temp", b"21.5")
        msg = sub.next(timeout=1)

The asyncio flavour is :mod:`hostbus.aio`, with the same names.
"""

from hostbus.client import Bus, Consumption, Subscription, connect
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
