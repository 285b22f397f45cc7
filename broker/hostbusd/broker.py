"""Broker: the running daemon inside an event loop -- listeners, peers, housekeeping, draining.

``Broker(config, listeners)`` takes already-bound listening sockets and reads no files, signals
or environment, so a test can build one in-process. ``main`` does the outer work (arguments,
configuration file, directories, binding, signals) and hands the result here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from typing import Any

from hostbus.errors import ErrorCode
from hostbusd.config import Config, FifoSinkConfig
from hostbusd.core.hub import Hub, PeerErrorSink
from hostbusd.net.fifo import FifoIngress, FifoSink, OpenedFifo
from hostbusd.net.unix import UnixPeer

#: Seconds between two housekeeping passes (handshake and partial-frame timeouts).
HOUSEKEEPING_INTERVAL = 0.25


class Broker:
    def __init__(self, config: Config, listeners: Sequence[socket.socket], fifos: Sequence[OpenedFifo] = (),
                 on_peer_error: PeerErrorSink | None = None) -> None:
        self.config = config
        self.hub = Hub(config, on_peer_error) if on_peer_error else Hub(config)
        self.listeners = list(listeners)
        self.fifos = list(fifos)
        self.peers: set[UnixPeer] = set()
        self.ingress: list[FifoIngress] = []
        self.sinks: list[FifoSink] = []
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        """Accept on every listener and read every publish FIFO. Returns once they all do."""
        loop = asyncio.get_running_loop()
        for f in self.fifos:
            if isinstance(f.spec, FifoSinkConfig):
                self.sinks.append(FifoSink(self.hub, f.path, f.spec.subjects, f.spec.format, f.spec.max_queued_msgs))
            else:
                assert f.fd is not None
                ingress = FifoIngress(self.hub, f.path, f.fd, f.spec.format, f.spec.topic_prefix)
                f.fd = None  # the ingress owns it now
                ingress.start()
                self.ingress.append(ingress)
        for sock in self.listeners:
            server = await loop.create_unix_server(lambda: UnixPeer(self.hub, self.peers), sock=sock)
            self._servers.append(server)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain and close everything."""
        await self.start()
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HOUSEKEEPING_INTERVAL)
            now = loop.time()
            for peer in list(self.peers):
                peer.check_timeouts(now)
            for ingress in self.ingress:
                ingress.check_timeouts(now)
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, deliver what is queued within ``shutdown.drain_timeout``, close every peer."""
        for server in self._servers:
            server.close()
        for ingress in self.ingress:
            ingress.close()
        self.ingress.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown.drain_timeout
        while loop.time() < deadline and any(self._has_output(p) for p in self.peers):
            for peer in list(self.peers):
                peer.flush()
            await asyncio.sleep(0.01)
        for peer in list(self.peers):
            if peer.core is not None:
                peer.core.fail(ErrorCode.SHUTTING_DOWN, "the broker is stopping", peer_fault=False)
        waits = [asyncio.ensure_future(p.closed.wait()) for p in list(self.peers)]
        if waits:
            await asyncio.wait(waits, timeout=self.config.limits.close_timeout + 1)
            for w in waits:
                w.cancel()
        for sink in self.sinks:
            sink.stop()
        self.sinks.clear()
        for server in self._servers:
            await server.wait_closed()

    @staticmethod
    def _has_output(peer: UnixPeer) -> bool:
        core = peer.core
        if core is None or peer.transport is None or peer.transport.is_closing():
            return False
        return core.session.pending_output or peer.write_buffer_size > 0

    def stats(self) -> dict[str, Any]:
        return self.hub.stats()
