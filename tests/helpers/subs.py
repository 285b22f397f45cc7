"""Reading subscriptions in tests."""

from __future__ import annotations

import hostbus


def drain(sub: hostbus.Subscription, timeout: float = 0.3) -> list[hostbus.Message]:
    """Every message that arrives until none has come for ``timeout`` seconds."""
    out = []
    while True:
        try:
            out.append(sub.next(timeout=timeout))
        except hostbus.TimeoutError:
            return out
