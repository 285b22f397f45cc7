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
import contextlib
import ipaddress
import os
import socket
import stat
from collections import Counter
from typing import Any, cast
from urllib.parse import urlsplit

import zmq

from hostbus.errors import HostbusError
from hostbus.topics import MAX_TOPIC_BYTES, show
from hostbusd.config import ZmqConfig
from hostbusd.core.acl import Principals
from hostbusd.core.hub import Hub
from hostbusd.core.identity import Identity
from hostbusd.core.outbound import OutboundQueue
from hostbusd.core.router import SubscribeOptions
from hostbusd.core.sink import BlockSession
from hostbusd.core.zmqmap import ZmqFault, multipart_of, parse_multipart, patterns_for_prefix
from hostbusd.errors import StartupError
from hostbusd.net import LoopEgress

#: Messages handled per socket per wake-up before the loop serves others.
BATCH = 10_000
#: Seconds between two tries to hand ZeroMQ what it refused at its high-water mark (besides the
#: tries its descriptor's wake-ups bring).
RETRY_SECONDS = 0.05
#: Prefixes kept waiting for room under the subscription limit.
MAX_REFUSED = 1024
NO_ID = 0xFFFFFFFF


def _fd(sock: zmq.Socket[bytes]) -> int:
    return cast(int, sock.getsockopt(zmq.FD))


def _events(sock: zmq.Socket[bytes]) -> int:
    return cast(int, sock.getsockopt(zmq.EVENTS))


def check_endpoint(endpoint: str, allow_remote: bool) -> bool:
    """Refuse what the configuration does not allow; True if the endpoint is reachable off this host."""
    scheme = endpoint.split("://", 1)[0]
    if scheme == "ipc":
        if endpoint.startswith("ipc://@"):
            raise StartupError(f"zmq endpoint {endpoint!r} is an abstract socket, which has no file mode: any "
                               "local user could connect. Use an ipc:// path")
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


def _claim_ipc_path(endpoint: str) -> None:
    """ZeroMQ's ipc bind replaces whatever is at the path: refuse a non-socket and a live endpoint."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://"):]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"zmq endpoint {endpoint!r}: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale
    else:
        raise StartupError(f"zmq endpoint {endpoint!r} is in use by another process")
    finally:
        probe.close()


class ZmqGateway(LoopEgress):
    def __init__(self, hub: Hub, cfg: ZmqConfig, xsub_endpoint: str, xpub_endpoint: str, mode: int) -> None:
        self.hub = hub
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.endpoints = (xsub_endpoint, xpub_endpoint)
        for endpoint in self.endpoints:
            _claim_ipc_path(endpoint)
        self.ctx = zmq.Context()
        self.xsub = self.ctx.socket(zmq.XSUB)
        self.xpub = self.ctx.socket(zmq.XPUB)
        for s in (self.xsub, self.xpub):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, cfg.hwm)
            s.setsockopt(zmq.RCVHWM, cfg.hwm)
        self.xsub.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        # SUB peers only send subscriptions: at most a topic (ZMTP 3.1 adds a 9-byte command name).
        self.xpub.setsockopt(zmq.MAXMSGSIZE, MAX_TOPIC_BYTES + 16)
        self.xpub.setsockopt(zmq.XPUB_NODROP, 1)
        self.owned: list[tuple[str, int]] = []  # ipc files we made: (path, inode)
        old = os.umask(0o777 & ~mode)  # ipc:// files are born with the configured mode
        try:
            for sock, endpoint in ((self.xsub, xsub_endpoint), (self.xpub, xpub_endpoint)):
                sock.bind(endpoint)
                if endpoint.startswith("ipc://"):
                    path = endpoint[len("ipc://"):]
                    self.owned.append((path, os.lstat(path).st_ino))
        except zmq.ZMQError as exc:
            self.close_sockets()
            raise StartupError(f"cannot bind the ZeroMQ gateway: {exc}") from None
        finally:
            os.umask(old)
        self.xsub.send(b"\x01")  # subscribe to everything the PUB peers send
        self.ident = hub.identity(NO_ID, NO_ID, 0, f"zmq:{cfg.name}")
        lim = hub.config.limits
        subs = hub.config.subscriptions
        self.session = BlockSession(Identity(0, os.getuid(), os.getgid(), os.getpid(), f"zmq:{cfg.name}"),
                                    batch_bytes=lim.write_batch_bytes,
                                    max_queued_bytes=lim.max_queued_bytes_per_connection)
        self.session.egress = self
        # The endpoint is a principal of its own for the access rules (zmq:NAME).
        self.session.principals = Principals.named(f"zmq:{cfg.name}")
        self.session.access = hub.policy.access(self.session.principals)
        # One queue for all the gateway's patterns, so messages leave in the order they came; a
        # shared gateway cannot be "disconnected", so its policy always drops (and counts).
        policy = subs.policy if subs.policy != "disconnect" else "drop-oldest"
        self.queue = OutboundQueue(policy, subs.max_queued_msgs, subs.max_queued_bytes)
        self.prefix_patterns: dict[bytes, tuple[int, list[str]]] = {}  # prefix -> (SUBs, patterns held)
        self.refused: dict[bytes, int] = {}  # prefixes waiting for room (bounded), with their SUB count
        self.pattern_sids: dict[str, int] = {}
        self.pattern_refs: Counter[str] = Counter()
        self.next_sid = 1
        self.pending: list[bytes] = []  # blocks ZeroMQ did not take yet (at its high-water mark)
        self.msgs_in = 0
        self.discarded = 0  # dropped at stop
        self.errors: Counter[str] = Counter()
        self._scheduled = False
        self._retry: asyncio.TimerHandle | None = None
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
        if self.closed:
            return
        if _events(self.xpub) & zmq.POLLIN:
            more |= self._read_subscriptions()
        if self.pending:
            # XPUB reports POLLOUT even at its high-water mark under NODROP: just try again (on a
            # wake-up of its descriptor, or the slow retry timer), never in a busy loop.
            self._send_pending()
        if more or _events(self.xsub) & zmq.POLLIN or _events(self.xpub) & zmq.POLLIN:
            self._schedule()  # edge-triggered: nothing else would wake us for what is already there

    def _read_publishers(self) -> bool:
        router = self.hub.router
        cfg = self.cfg
        for _ in range(BATCH):
            if self.closed:
                return False
            try:
                frames = self.xsub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            try:
                topic, block, payload_len = parse_multipart(
                    frames, max_bytes=cfg.max_message_bytes, topic_prefix=cfg.topic_prefix,
                    check_topic=router.topic_from_wire)
            except ZmqFault as fault:
                self._fault(fault.kind, str(fault))
                continue
            access = self.session.access
            if access is not None:
                decision = access.publish(topic)
                if not decision.allowed:
                    self._fault("denied", f"may not publish to {show(topic)}: {decision.rule}")
                    continue
            router.publish(self.ident, topic, block, 0, "", payload_len, None)
            self.msgs_in += 1
        return True

    def _fault(self, kind: str, error: str) -> None:
        self.errors[kind] += 1
        self.hub.peer_error("zmq_bad_input", None, gateway=self.cfg.name, fault=kind, error=error)

    def _read_subscriptions(self) -> bool:
        for _ in range(BATCH):
            try:
                msg = self.xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            if not msg or msg[0] not in (0, 1):
                continue  # not a subscription message
            if msg[0] == 1:
                self._subscribe(msg[1:])
            else:
                self._unsubscribe(msg[1:])
        return True

    def _subscribe(self, prefix: bytes) -> None:
        held = self.prefix_patterns.get(prefix)
        if held is not None:
            self.prefix_patterns[prefix] = (held[0] + 1, held[1])
            return
        if prefix in self.refused:
            self.refused[prefix] += 1
            return
        patterns = patterns_for_prefix(prefix, self.cfg.topic_prefix) if len(prefix) <= MAX_TOPIC_BYTES else []
        if not patterns:
            return  # no topic can start with it: nothing to hold
        acquired = self._acquire(patterns)
        if acquired is None:
            if len(self.refused) < MAX_REFUSED:
                self.refused[prefix] = 1
            self._fault("prefix_refused", f"no room for the patterns of prefix {prefix[:64]!r} "
                                          "(limits.max_subscriptions_per_connection)")
            return
        self.prefix_patterns[prefix] = (1, acquired)

    def _unsubscribe(self, prefix: bytes) -> None:
        if prefix in self.refused:
            self.refused[prefix] -= 1
            if not self.refused[prefix]:
                del self.refused[prefix]
            return
        held = self.prefix_patterns.get(prefix)
        if held is None:
            return
        if held[0] > 1:
            self.prefix_patterns[prefix] = (held[0] - 1, held[1])
            return
        del self.prefix_patterns[prefix]
        for pattern in held[1]:
            self._release(pattern)
        for waiting, count in list(self.refused.items()):  # room may have freed up
            acquired = self._acquire(patterns_for_prefix(waiting, self.cfg.topic_prefix))
            if acquired is not None:
                del self.refused[waiting]
                self.prefix_patterns[waiting] = (count, acquired)

    def _acquire(self, patterns: list[str]) -> list[str] | None:
        """Hold every pattern (new ones subscribed), or none of them."""
        new = [p for p in patterns if not self.pattern_refs[p]]
        limit = self.hub.config.limits.max_subscriptions_per_connection
        if len(self.pattern_sids) + len(new) > limit:
            return None
        for i, pattern in enumerate(new):
            sid = self.next_sid
            self.next_sid += 1
            try:
                self.hub.router.subscribe(self.session, sid,
                                          SubscribeOptions(pattern, retained=False, queue=self.queue))
            except HostbusError as exc:  # not a pattern hostbus lets anyone subscribe: refuse the prefix
                for done in new[:i]:
                    self.hub.router.unsubscribe(self.session, self.pattern_sids.pop(done))
                self._fault("subscribe_refused", f"cannot subscribe {pattern!r}: {exc}")
                return None
            self.pattern_sids[pattern] = sid
        for pattern in patterns:
            self.pattern_refs[pattern] += 1
        return patterns

    def _release(self, pattern: str) -> None:
        self.pattern_refs[pattern] -= 1
        if self.pattern_refs[pattern] > 0:
            return
        del self.pattern_refs[pattern]
        sid = self.pattern_sids.pop(pattern, None)
        if sid is not None:
            self.hub.router.unsubscribe(self.session, sid)  # the shared queue stays for the others

    # ---- Egress (for the gateway's session) ---------------------------------------------------------------

    def flush(self) -> None:
        """Hand ZeroMQ what the session has, batch after batch, until it is empty or ZeroMQ is full."""
        session = self.session
        session.flush_pending = False
        for _ in range(64):  # then let others have the loop; flush_pending brings us back
            if self.pending or self.closed:
                return
            out = session.take_output()
            if not out:
                return
            self._send(out)
        if session.has_backlog and not session.flush_pending:
            session.flush_pending = True
            self.loop.call_soon(self.flush)

    def _send(self, blocks: list[bytes]) -> None:
        for i, block in enumerate(blocks):
            try:
                self.xpub.send_multipart(multipart_of(block), zmq.NOBLOCK)
            except zmq.Again:  # the high-water mark: keep the rest, let new messages queue (bounded)
                self.pending = blocks[i:]
                self.session.paused = True
                if self._retry is None:
                    self._retry = self.loop.call_later(RETRY_SECONDS, self._retry_pending)
                return
        self._schedule()  # sends change the descriptor's state: look again

    def _retry_pending(self) -> None:
        self._retry = None
        if self.pending and not self.closed:
            self._send_pending()

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
                "out": s.msgs_out - len(self.pending) - self.discarded, "dropped": s.dropped,
                "errors": dict(self.errors), "prefixes": len(self.prefix_patterns),
                "patterns": sorted(self.pattern_sids)}

    def stop(self) -> None:
        """Hand ZeroMQ what it takes now, let it deliver for up to ``shutdown.drain_timeout``,
        and count what is left as dropped."""
        if self.closed:
            return
        if self.pending:
            self._send_pending()
        self.flush()
        # What was written for ZeroMQ but never taken, and what still waited in the queue: dropped.
        self.discarded = len(self.pending) + len(self.session.out)
        self.session.dropped += self.discarded + len(self.queue)
        self.pending = []
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        self.session.closing = True
        self.hub.router.detach(self.session)
        for s in (self.xsub, self.xpub):
            if not s.closed:
                self.loop.remove_reader(_fd(s))
        self.xpub.setsockopt(zmq.LINGER, int(self.hub.config.shutdown.drain_timeout * 1000))
        self.close_sockets()

    def close_sockets(self) -> None:
        for s in (self.xsub, self.xpub):
            if not s.closed:
                s.close()
        self.ctx.term()
        for path, inode in self.owned:
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)
