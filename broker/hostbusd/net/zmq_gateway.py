"""The ZeroMQ gateway: ZeroMQ PUB peers publish into hostbus, ZeroMQ SUB peers receive from it.

Two sockets bound by the daemon: an XSUB that PUB peers connect to, and an XPUB that SUB peers
connect to. Both are driven by the event loop through their ``ZMQ_FD`` (no thread, no polling):
that descriptor is edge-triggered, so after every wake-up and every send the gateway re-reads
``ZMQ_EVENTS`` and keeps going while there is something to do, a bounded batch at a time.

What is counted where: a message from a PUB peer is ``in`` once routed (or an error by kind).
Towards SUB peers the XPUB socket runs with ``XPUB_NODROP``: at its high-water mark ``send``
fails instead of dropping, the gateway keeps the rest of the batch, stops writing and lets new
messages wait in its bounded hostbus queue (the ``subscriptions`` settings) -- so a message is
counted ``out`` only once ZeroMQ has taken it, and every loss is a counted drop of that queue.
ZeroMQ then delivers to each SUB whose prefix matches (and holds messages for slow SUBs up to its
own high-water mark, which with NODROP makes the XPUB stop taking more).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections import Counter
from typing import Any, cast
from urllib.parse import urlsplit

import zmq

from hostbus.topics import MAX_TOPIC_BYTES
from hostbusd.config import ZmqConfig
from hostbusd.core.hub import Hub
from hostbusd.core.identity import Identity
from hostbusd.core.router import SubscribeOptions
from hostbusd.core.sink import BlockSession
from hostbusd.core.zmqmap import ZmqFault, multipart_of, parse_multipart, patterns_for_prefix
from hostbusd.errors import StartupError
from hostbusd.net import LoopEgress

#: Messages handled per socket per wake-up before the loop serves others.
BATCH = 10_000
NO_ID = 0xFFFFFFFF


def _fd(sock: zmq.Socket[bytes]) -> int:
    return cast(int, sock.getsockopt(zmq.FD))


def _events(sock: zmq.Socket[bytes]) -> int:
    return cast(int, sock.getsockopt(zmq.EVENTS))


def check_endpoint(endpoint: str, allow_remote: bool) -> bool:
    """Refuse what the configuration does not allow; True if the endpoint is reachable off this host."""
    scheme = endpoint.split("://", 1)[0]
    if scheme == "ipc":
        return False
    if scheme != "tcp":
        raise StartupError(f"zmq endpoint {endpoint!r}: only ipc:// and tcp:// are supported")
    host = urlsplit(endpoint).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise StartupError(f"zmq endpoint {endpoint!r} is not on a loopback address; other hosts could publish "
                           "and subscribe without identity. Bind 127.0.0.1, or set zmq.allow_remote = true")
    return not loopback


class ZmqGateway(LoopEgress):
    def __init__(self, hub: Hub, cfg: ZmqConfig, xsub_endpoint: str, xpub_endpoint: str, sock_mode: int) -> None:
        self.hub = hub
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.ctx = zmq.Context()
        self.xsub = self.ctx.socket(zmq.XSUB)
        self.xpub = self.ctx.socket(zmq.XPUB)
        for s in (self.xsub, self.xpub):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, cfg.hwm)
            s.setsockopt(zmq.RCVHWM, cfg.hwm)
        self.xsub.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        self.xpub.setsockopt(zmq.MAXMSGSIZE, MAX_TOPIC_BYTES + 1)  # SUB peers only send subscriptions
        self.xpub.setsockopt(zmq.XPUB_NODROP, 1)
        self.endpoints = (xsub_endpoint, xpub_endpoint)
        old = os.umask(0o777 & ~sock_mode)  # ipc:// files are born with the socket's mode
        try:
            self.xsub.bind(xsub_endpoint)
            self.xpub.bind(xpub_endpoint)
        except zmq.ZMQError as exc:
            self.close_sockets()
            raise StartupError(f"cannot bind the ZeroMQ gateway: {exc}") from None
        finally:
            os.umask(old)
        self.xsub.send(b"\x01")  # subscribe to everything the PUB peers send
        self.ident = hub.identity(NO_ID, NO_ID, 0, f"zmq:{cfg.name}")
        lim = hub.config.limits
        self.session = BlockSession(Identity(0, os.getuid(), os.getgid(), os.getpid(), f"zmq:{cfg.name}"),
                                    batch_bytes=lim.write_batch_bytes,
                                    max_queued_bytes=lim.max_queued_bytes_per_connection)
        self.session.egress = self
        self.prefixes: Counter[bytes] = Counter()
        self.pattern_sids: dict[str, int] = {}
        self.pattern_refs: Counter[str] = Counter()
        self.next_sid = 1
        self.pending: list[bytes] = []  # blocks ZeroMQ did not take yet (at its high-water mark)
        self.msgs_in = 0
        self.errors: Counter[str] = Counter()
        self._scheduled = False
        self.closed = False
        hub.gateways[cfg.name] = self
        for s in (self.xsub, self.xpub):
            self.loop.add_reader(_fd(s), self._schedule)
        self._schedule()

    # ---- the event loop's side ------------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._scheduled and not self.closed:
            self._scheduled = True
            self.loop.call_soon(self._service)

    def _service(self) -> None:
        """Do what the sockets are ready for, a batch of each; come back if there is more."""
        self._scheduled = False
        if self.closed:
            return
        more = False
        if _events(self.xsub) & zmq.POLLIN:
            more |= self._read_publishers()
        if _events(self.xpub) & zmq.POLLIN:
            more |= self._read_subscriptions()
        if self.pending and _events(self.xpub) & zmq.POLLOUT:
            self._send_pending()
        if more or _events(self.xsub) & zmq.POLLIN or _events(self.xpub) & zmq.POLLIN:
            self._schedule()  # edge-triggered: nothing else would wake us for what is already there

    def _read_publishers(self) -> bool:
        router = self.hub.router
        cfg = self.cfg
        for _ in range(BATCH):
            try:
                frames = self.xsub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            try:
                topic, block, payload_len = parse_multipart(
                    frames, max_bytes=cfg.max_message_bytes, topic_prefix=cfg.topic_prefix,
                    check_topic=router.topic_from_wire)
                router.publish(self.ident, topic, block, 0, "", payload_len, None)
                self.msgs_in += 1
            except ZmqFault as fault:
                self.errors[fault.kind] += 1
                self.hub.peer_error("zmq_bad_input", None, gateway=self.cfg.name, fault=fault.kind, error=str(fault))
        return True

    def _read_subscriptions(self) -> bool:
        for _ in range(BATCH):
            try:
                msg = self.xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            if not msg or msg[0] not in (0, 1):
                continue  # not a subscription message
            prefix = msg[1:]
            if msg[0] == 1:
                if len(prefix) > MAX_TOPIC_BYTES or (
                        prefix not in self.prefixes
                        and len(self.prefixes) >= self.hub.config.limits.max_subscriptions_per_connection):
                    # no topic is longer; and distinct prefixes are bounded like a connection's subscriptions
                    self.errors["prefix_refused"] += 1
                    continue
                self.prefixes[prefix] += 1
                for pattern in patterns_for_prefix(prefix, self.cfg.topic_prefix):
                    self._add_pattern(pattern)
            elif self.prefixes[prefix] > 0:
                self.prefixes[prefix] -= 1
                if not self.prefixes[prefix]:
                    del self.prefixes[prefix]
                for pattern in patterns_for_prefix(prefix, self.cfg.topic_prefix):
                    self._drop_pattern(pattern)
        return True

    def _add_pattern(self, pattern: str) -> None:
        self.pattern_refs[pattern] += 1
        if self.pattern_refs[pattern] > 1:
            return
        sid = self.next_sid
        self.next_sid += 1
        subs = self.hub.config.subscriptions
        opts = SubscribeOptions(pattern, None, subs.policy, subs.max_queued_msgs, subs.max_queued_bytes)
        try:
            self.hub.router.subscribe(self.session, sid, opts)
        except Exception as exc:
            self.errors["subscribe_refused"] += 1
            self.hub.peer_error("zmq_subscribe_refused", None, gateway=self.cfg.name, pattern=pattern, error=str(exc))
            del self.pattern_refs[pattern]
            return
        self.pattern_sids[pattern] = sid

    def _drop_pattern(self, pattern: str) -> None:
        self.pattern_refs[pattern] -= 1
        if self.pattern_refs[pattern] > 0:
            return
        del self.pattern_refs[pattern]
        sid = self.pattern_sids.pop(pattern, None)
        if sid is not None:
            self.hub.router.unsubscribe(self.session, sid)

    # ---- Egress (for the gateway's session) ---------------------------------------------------------------

    def flush(self) -> None:
        session = self.session
        session.flush_pending = False
        if self.pending or self.closed:
            return
        out = session.take_output()
        if out:
            self._send(out)

    def _send(self, blocks: list[bytes]) -> None:
        for i, block in enumerate(blocks):
            try:
                self.xpub.send_multipart(multipart_of(block), zmq.NOBLOCK)
            except zmq.Again:  # the high-water mark: keep the rest, let new messages queue (bounded)
                self.pending = blocks[i:]
                self.session.paused = True
                break
        self._schedule()

    def _send_pending(self) -> None:
        blocks, self.pending = self.pending, []
        self._send(blocks)
        if not self.pending:
            self.session.paused = False
            self.flush()

    # ---- life ------------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        s = self.session
        return {"xsub": self.endpoints[0], "xpub": self.endpoints[1], "in": self.msgs_in,
                "out": s.msgs_out - len(self.pending), "dropped": s.dropped, "errors": dict(self.errors),
                "prefixes": len(self.prefixes), "patterns": sorted(self.pattern_sids)}

    def stop(self) -> None:
        if self.closed:
            return
        if not self.pending:
            self.flush()
        self.closed = True
        self.session.closing = True
        self.hub.router.detach(self.session)
        for s in (self.xsub, self.xpub):
            if not s.closed:
                self.loop.remove_reader(_fd(s))
        self.close_sockets()

    def close_sockets(self) -> None:
        for s in (self.xsub, self.xpub):
            if not s.closed:
                s.close(linger=0)
        self.ctx.term()
        for endpoint in self.endpoints:
            if endpoint.startswith("ipc://"):
                path = endpoint[len("ipc://"):]
                if os.path.exists(path):
                    os.unlink(path)
