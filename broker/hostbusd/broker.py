"""Broker: the running daemon inside an event loop -- listeners, peers, housekeeping, draining.

``Broker(config, listeners)`` takes already-bound listening sockets and reads no files, signals
or environment, so a test can build one in-process. ``main`` does the outer work (arguments,
configuration file, directories, binding, signals) and hands the result here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostbus.errors import ErrorCode, HostbusError
from hostbusd.config import Config, FifoSinkConfig
from hostbusd.core.hub import Hub, PeerErrorSink
from hostbusd.core.peer import State
from hostbusd.core.queues import QueueService
from hostbusd.net.fifo import FifoIngress, FifoSink, OpenedFifo
from hostbusd.net.ring import RingService
from hostbusd.net.unix import UnixPeer

if TYPE_CHECKING:
    from hostbusd.net.zmq_gateway import ZmqGateway

#: Seconds between two housekeeping passes (handshake and partial-frame timeouts).
HOUSEKEEPING_INTERVAL = 0.25
#: The interpreter's thread switch interval while the broker runs (see Broker.start).
FSYNC_SWITCH_INTERVAL = 0.0005


class _LoopScheduler:
    """The event loop as the topic queues see it: callbacks, timers, and fsyncs on threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: concurrent.futures.Executor) -> None:
        self.loop = loop
        self.threads = threads
        self.call_soon = loop.call_soon
        self.call_later = loop.call_later

    def fdatasync(self, fd: int, done: Callable[[BaseException | None], None]) -> None:
        def run() -> None:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

        fut = self.loop.run_in_executor(self.threads, run)
        fut.add_done_callback(lambda f: done(None if f.cancelled() else f.exception()))


class Broker:
    def __init__(self, config: Config, listeners: Sequence[socket.socket], fifos: Sequence[OpenedFifo] = (),
                 on_peer_error: PeerErrorSink | None = None, zmq_endpoints: tuple[str, str] | None = None,
                 zmq_mode: int = 0o600, system: bool = False, state_dir: Path | None = None,
                 log: Any = None) -> None:
        self.hub = (Hub(config, on_peer_error, system=system) if on_peer_error is not None
                    else Hub(config, system=system))
        self.listeners = list(listeners)
        self._initial_fifos = list(fifos)
        self.peers: set[UnixPeer] = set()
        self.ingress: dict[Path, FifoIngress] = {}
        self.sinks: dict[Path, FifoSink] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._zmq_endpoints = zmq_endpoints
        self._zmq_mode = zmq_mode
        self.gateway: ZmqGateway | None = None
        self.rings: RingService | None = None
        self.queues: QueueService | None = None
        self._state_dir = state_dir  # None: topic queues keep nothing on disk (file storage acts as memory)
        self._log = log
        self._fsync_threads = concurrent.futures.ThreadPoolExecutor(max_workers=4,
                                                                    thread_name_prefix="hostbusd-fsync")

    @property
    def config(self) -> Config:
        return self.hub.config

    async def start(self) -> None:
        """Read every publish FIFO and accept on every listener. Returns once they all do."""
        loop = asyncio.get_running_loop()
        for f in self._initial_fifos:
            self.add_fifo(f)
        self._initial_fifos = []
        self.rings = RingService(self.hub, loop)
        # An fsync of a topic queue ends on a worker thread that must take the GIL back to hand its
        # result to the loop; with the default switch interval (5 ms) a busy loop keeps it waiting
        # that long, and every confirm of a durability = always queue with it. 0.5 ms: confirms
        # follow the disk, at the cost of more GIL hand-overs while a worker waits.
        sys.setswitchinterval(FSYNC_SWITCH_INTERVAL)
        self.queues = QueueService(self.hub, _LoopScheduler(loop, self._fsync_threads), self._state_dir, self._log)
        self.hub.queues = self.hub.router.queues = self.queues
        self.queues.start()
        if self._zmq_endpoints is not None:
            from hostbusd.net.zmq_gateway import ZmqGateway  # noqa: PLC0415 - pyzmq only when the gateway is on

            self.gateway = ZmqGateway(self.hub, self.config.zmq, *self._zmq_endpoints, self._zmq_mode)
        for sock in self.listeners:
            server = await loop.create_unix_server(lambda: UnixPeer(self.hub, self.peers), sock=sock)
            self._servers.append(server)

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Housekeeping (timeouts) until ``stop`` is set."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HOUSEKEEPING_INTERVAL)
            now = loop.time()
            for peer in list(self.peers):
                peer.check_timeouts(now)
            for ingress in self.ingress.values():
                ingress.check_timeouts(now)
            for sink in self.sinks.values():
                sink.check_reader()
            if self.queues is not None:
                self.queues.tick()

    async def run(self, stop: asyncio.Event) -> None:
        """Start, serve until ``stop`` is set, then drain and close everything."""
        await self.start()
        await self.serve_until(stop)
        await self.shutdown()

    # ---- FIFOs -------------------------------------------------------------------------------------

    def add_fifo(self, f: OpenedFifo) -> None:
        """Start serving a FIFO the outer layer prepared (and, for a publish FIFO, opened)."""
        if isinstance(f.spec, FifoSinkConfig):
            self.sinks[f.path] = FifoSink(self.hub, f.path, f.spec.subjects, f.spec.format, f.spec.max_queued_msgs)
        else:
            assert f.fd is not None
            ingress = FifoIngress(self.hub, f.path, f.fd, f.spec.format, f.spec.topic_prefix)
            f.fd = None  # the ingress owns the descriptor now
            ingress.start()
            self.ingress[f.path] = ingress

    def check_sink(self, subjects: list[str], config: Config) -> None:
        """Raise if a sink with ``subjects`` could not subscribe under ``config`` (before a reload)."""
        problems = []
        if len(subjects) > config.limits.max_subscriptions_per_connection:
            problems.append(f"{len(subjects)} subjects exceed limits.max_subscriptions_per_connection")
        problems += [f"{p!r}: inbox topics cannot be subscribed" for p in subjects if p.split(".")[0] == "_INBOX"]
        if problems:
            raise HostbusError("FIFO sink: " + "; ".join(problems))

    def remove_fifo(self, path: Path) -> None:
        """Stop serving a FIFO (it left the configuration); the file is the outer layer's business."""
        ingress = self.ingress.pop(path, None)
        if ingress is not None:
            ingress.close()
        sink = self.sinks.pop(path, None)
        if sink is not None:
            sink.stop()
        self.hub.fifos.pop(str(path), None)

    # ---- reload and stop ------------------------------------------------------------------------------

    def reload(self, config: Config) -> list[str]:
        """Apply a new configuration to everything running; returns what could not change live.

        Limits, access rules, defaults, retained bounds and log settings take effect at once (for
        existing connections and subscriptions too: one the new rules refuse is ended). FIFOs are
        added and removed by the caller through :meth:`add_fifo` and :meth:`remove_fifo`. The
        runtime and state directories and the socket's modes and group are fixed for the life of
        the process.
        """
        old = self.hub.config
        needs_restart = [key for key, a, b in (
            ("runtime_dir", old.runtime_dir, config.runtime_dir),
            ("state_dir", old.state_dir, config.state_dir),
            ("socket", old.socket, config.socket),
            ("zmq", old.zmq, config.zmq),
        ) if a != b]
        self.hub.apply_config(config)
        for peer in self.peers:
            if peer.core is not None and peer.core.state is State.OPEN:
                peer.core.decoder.max_frame = config.limits.max_frame_bytes
        for ingress in self.ingress.values():
            ingress.parser.max_line_bytes = config.fifo.max_line_bytes
        return needs_restart

    async def shutdown(self) -> None:
        """Stop accepting, deliver what is queued within ``shutdown.drain_timeout``, close every peer."""
        for server in self._servers:
            server.close()
        for path in list(self.ingress):
            self.remove_fifo(path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown.drain_timeout
        if self.queues is not None:  # what was captured is stored, and its publishers confirmed, first
            self.queues.commit_now()
            while self.queues.busy and loop.time() < deadline:
                await asyncio.sleep(0.005)
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
        for path in list(self.sinks):
            self.remove_fifo(path)
        if self.gateway is not None:
            self.gateway.stop()
        if self.rings is not None:
            self.rings.stop()  # every ring's helper exits; nothing stays in /dev/shm
        if self.queues is not None:
            self.queues.stop()  # what was captured is stored and synced, consumer positions saved
        self._fsync_threads.shutdown(wait=True)
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
