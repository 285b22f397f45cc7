"""Transports: thin asyncio shells that move bytes between the kernel and the sans-IO core."""

import asyncio


class LoopEgress:
    """The Egress of a subscriber inside the daemon: flush at the end of the iteration, or now."""

    loop: asyncio.AbstractEventLoop

    def flush(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def wake(self, urgent: bool) -> None:
        if urgent:
            self.flush()
        else:
            self.loop.call_soon(self.flush)

    def close(self) -> None:
        self.stop()
