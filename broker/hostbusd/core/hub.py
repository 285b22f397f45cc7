"""Hub: what all peers share -- the router, the session registry, limits, counters, identities.

Built from a :class:`Config` alone, with no I/O, so tests can drive it without an event loop.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from hostbus import topics, wire
from hostbus.errors import ErrorCode, PermissionDeniedError
from hostbusd import __version__
from hostbusd.config import Config
from hostbusd.core.acl import ACTIONS, Policy, Principals
from hostbusd.core.fifo import FifoEntry
from hostbusd.core.identity import Identity
from hostbusd.core.outbound import OutboundQueue
from hostbusd.core.router import Router
from hostbusd.core.session import Account, Session

PeerErrorSink = Callable[..., Any]


def _ignore(kind: str, **fields: Any) -> None:
    pass


def build_policy(config: Config, system: bool) -> Policy:
    """The access policy of ``config``; ``system``: this is the system instance (default deny)."""
    default = config.access.default
    allow = (not system) if default is None else default == "allow"
    return Policy(((r.topic, {"publish": r.publish, "subscribe": r.subscribe, "manage": r.manage})
                   for r in config.acl), allow)


class Hub:
    def __init__(self, config: Config, on_peer_error: PeerErrorSink = _ignore, *, system: bool = False) -> None:
        self.config = config
        self.system = system
        self.policy = build_policy(config, system)
        self.accounts: dict[int, Account] = {}
        self.denied: Counter[str] = Counter()  # publish, subscribe, ended (by a reload), connection_limit
        lim = config.limits
        self.router = Router(
            max_subscriptions=lim.max_subscriptions_per_connection,
            max_subscriptions_per_uid=lim.max_subscriptions_per_uid,
            retained_max_topics=config.retained.max_topics,
            retained_max_bytes=config.retained.max_bytes,
            stats_max_topics=config.stats.max_topics,
        )
        self.router.retained.max_topics_per_uid = config.retained.max_topics_per_uid
        self.router.retained.max_bytes_per_uid = config.retained.max_bytes_per_uid
        self.sessions: set[Session] = set()
        self.on_peer_error = on_peer_error
        self._refs = itertools.count(1)
        self.started = time.time()
        self.connections_total = 0
        self.rejected_connections = 0
        self.peer_errors = 0
        self.closed_totals = {"msgs_out": 0, "bytes_out": 0, "dropped": 0}
        self.fifos: dict[str, FifoEntry] = {}  # path -> publish FIFO or sink, for the stats
        self.gateways: dict[str, Any] = {}  # name -> ZeroMQ gateway (has describe() and a session)
        self.rings: Any = None  # net.ring.RingService, once the broker runs
        self.queues: Any = None  # core.queues.QueueService, once the broker runs (it needs a loop)

    def apply_config(self, config: Config) -> None:
        """A reloaded configuration: new bounds and rules for the router and every open session.

        Subscriptions the new rules no longer allow are ended, each with an ERR naming the rule.
        """
        self.config = config
        lim = config.limits
        router = self.router
        router.max_subscriptions = lim.max_subscriptions_per_connection
        router.max_subscriptions_per_uid = lim.max_subscriptions_per_uid
        self.policy = build_policy(config, self.system)
        for session in [*self.sessions, *(gw.session for gw in self.gateways.values())]:
            session.account_max_queued = lim.max_queued_bytes_per_uid
            if session.principals is not None:
                session.access = self.policy.access(session.principals)
                self._recheck_subscriptions(session)
                if session.members and self.queues is not None:
                    self.queues.recheck(session)
            for ring in session.rings.values():
                if ring.session is not None:
                    ring.session.account_max_queued = lim.max_queued_bytes_per_uid
        router.retained.max_topics = config.retained.max_topics
        router.retained.max_bytes = config.retained.max_bytes
        router.retained.max_topics_per_uid = config.retained.max_topics_per_uid
        router.retained.max_bytes_per_uid = config.retained.max_bytes_per_uid
        router.stats_max_topics = config.stats.max_topics
        for session in [*self.sessions, *self._sink_sessions()]:
            session.batch_bytes = lim.write_batch_bytes
            session.max_queued_bytes = lim.max_queued_bytes_per_connection
        if self.queues is not None:
            self.queues.apply_config(config)

    def _sink_sessions(self) -> list[Session]:
        """Subscribers inside the daemon: FIFO sinks and ZeroMQ gateways."""
        return [*(e.session for e in self.fifos.values() if e.session is not None),
                *(gw.session for gw in self.gateways.values())]

    def _recheck_subscriptions(self, session: Session) -> None:
        """The session's subscriptions, socket and ring ones, under its new rules: filters
        recomputed, the refused ones ended and told on its connection."""
        held = [(sid, sub, session) for sid, sub in session.subs.items()]
        for sid, ring in session.ring_sids.items():
            if ring.session is not None and sid in ring.session.subs:
                held.append((sid, ring.session.subs[sid], ring.session))
        for sid, sub, holder in held:
            try:
                sub.acl = self.router.subscribe_filter(session, sub.pattern, sub.group)
            except PermissionDeniedError as exc:
                self.router.unsubscribe(holder, sid)
                session.ring_sids.pop(sid, None)
                self.denied["ended"] += 1
                self.peer_error("subscription_ended", session, sid=sid, pattern=sub.pattern, reason=str(exc))
                session.send(wire.encode_err(ErrorCode.PERMISSION_DENIED, sid,
                                             f"subscription ended by new access rules: {exc}", fatal=False))

    def _ring_sessions(self) -> list[Session]:
        return [r.session for s in self.sessions for r in s.rings.values() if r.session is not None]

    def account(self, uid: int) -> Account:
        acct = self.accounts.get(uid)
        if acct is None:
            acct = self.accounts[uid] = Account(uid)
        return acct

    def admit(self, session: Session, principals: Principals) -> str | None:
        """A new Unix-socket peer: charge its uid and give it its rules; else why it is refused."""
        lim = self.config.limits
        acct = self.account(principals.uid)
        if acct.connections >= lim.max_connections_per_uid:
            self.denied["connection_limit"] += 1
            return (f"uid {principals.uid} already has {acct.connections} connections, the limit "
                    "(limits.max_connections_per_uid)")
        acct.connections += 1
        session.account = acct
        session.account_max_queued = lim.max_queued_bytes_per_uid
        session.principals = principals
        session.access = self.policy.access(principals)
        return None

    def release(self, session: Session) -> None:
        """The peer's connection is gone: give back what it held (after :meth:`close`)."""
        acct = session.account
        if acct is None:
            return
        session.release()
        acct.connections -= 1
        session.account = None
        if acct.idle:
            del self.accounts[acct.uid]

    def identity(self, uid: int, gid: int, pid: int, origin: str = "") -> Identity:
        return Identity(next(self._refs), uid, gid, pid, origin)

    def new_session(self, ident: Identity) -> Session:
        lim = self.config.limits
        return Session(ident, batch_bytes=lim.write_batch_bytes, max_queued_bytes=lim.max_queued_bytes_per_connection)

    def open(self, session: Session) -> str:
        """A session finished its handshake; returns its inbox prefix."""
        self.sessions.add(session)
        self.connections_total += 1
        lim = self.config.limits  # a reload during the handshake: the session gets today's rules and bounds
        session.batch_bytes = lim.write_batch_bytes
        session.max_queued_bytes = lim.max_queued_bytes_per_connection
        if session.principals is not None:
            session.account_max_queued = lim.max_queued_bytes_per_uid
            session.access = self.policy.access(session.principals)
        subs = self.config.subscriptions
        return self.router.attach(session, OutboundQueue(subs.policy, subs.max_queued_msgs, subs.max_queued_bytes))

    def close(self, session: Session) -> None:
        if session.rings and self.rings is not None:
            self.rings.close_session(session)
        if session.members and self.queues is not None:
            self.queues.session_closed(session)
        if session in self.sessions:
            self.sessions.discard(session)
            self.router.detach(session)
            totals = self.closed_totals
            totals["msgs_out"] += session.msgs_out
            totals["bytes_out"] += session.bytes_out
            totals["dropped"] += session.dropped

    def peer_error(self, kind: str, session: Session | None, **fields: Any) -> None:
        self.peer_errors += 1
        if session is not None:
            ident = session.ident
            fields.update(peer=ident.ref, uid=ident.uid, pid=ident.pid)
            if session.name:
                fields["name"] = session.name
        self.on_peer_error(kind, **fields)

    def welcome(self, session: Session, inbox: str) -> dict[str, Any]:
        ident = session.ident
        lim = self.config.limits
        return {
            "protocol": wire.PROTOCOL_VERSION,
            "server": f"hostbusd {__version__}",
            "client_id": ident.ref,
            "identity": {"uid": ident.uid, "gid": ident.gid, "pid": ident.pid,
                         **(session.principals.describe() if session.principals is not None else {})},
            "inbox": inbox,
            "features": [wire.FEATURE_RUNS],
            "limits": {
                "max_frame_bytes": lim.max_frame_bytes,
                "max_subscriptions": lim.max_subscriptions_per_connection,
                "max_topic_bytes": topics.MAX_TOPIC_BYTES,
                "max_headers_bytes": wire.frames.MAX_HEADERS_BYTES,
                "max_queued_bytes_per_connection": lim.max_queued_bytes_per_connection,
            },
        }

    def may(self, session: Session, topic: str) -> dict[str, Any]:
        """What the session's peer may do on ``topic`` (a pattern: what it may subscribe), and why."""
        names = session.principals.names if session.principals is not None else frozenset({"*"})
        wild = any(t in ("*", ">") for t in topic.split("."))
        out: dict[str, Any] = {}
        for action in ACTIONS:
            if action == "subscribe" and topic.split(".", maxsplit=1)[0] == topics.INBOX_PREFIX[:-1]:
                out[action] = {"allowed": False, "rule": "inbox topics are delivered only to the connection "
                               "that owns them"}
            elif wild:
                verdict, decision = self.policy.decide_pattern(names, action, topic)
                out[action] = {"allowed": {"allow": True, "deny": False}.get(verdict, "some topics"),
                               "rule": decision.rule}
            else:
                decision = self.policy.decide(names, action, topic)
                out[action] = {"allowed": decision.allowed, "rule": decision.rule}
        return out

    def stats(self, viewer: Session | None = None) -> dict[str, Any]:
        """The counters; under access rules, ``viewer`` sees only the topic names and patterns it
        may subscribe to, and only its own uid's holdings."""
        r = self.router
        st = r.stats
        live = [*self.sessions, *self._sink_sessions(), *self._ring_sessions()]  # sinks and rings are subscribers too
        msgs_out = self.closed_totals["msgs_out"] + sum(s.msgs_out for s in live)
        bytes_out = self.closed_totals["bytes_out"] + sum(s.bytes_out for s in live)
        dropped = self.closed_totals["dropped"] + sum(s.dropped for s in live)
        access = viewer.access if viewer is not None else None
        per_topic = dict(sorted(st.topics.items(), key=lambda kv: -kv[1]))
        if access is not None:
            per_topic = {t: n for t, n in per_topic.items() if t == "_INBOX" or access.may_receive(t)}
        if st.topics_other:
            per_topic["(other)"] = st.topics_other
        accounts = self.accounts
        if access is not None and viewer is not None and viewer.account is not None:
            accounts = {viewer.account.uid: viewer.account}
        gateways = {name: gw.describe() for name, gw in self.gateways.items()}
        if access is not None:
            for desc in gateways.values():
                desc["patterns"] = [p for p in desc["patterns"] if access.subscribe(p)[0] != "deny"]
        return {
            "server": f"hostbusd {__version__}",
            "uptime_s": round(time.time() - self.started, 3),
            "connections": len(self.sessions),
            "connections_total": self.connections_total,
            "connections_rejected": self.rejected_connections,
            "subscriptions": sum(len(s.subs) + len(s.ring_sids) for s in self.sessions),
            "queue_groups": len(r.groups),
            "retained": {"topics": len(r.retained), "bytes": r.retained.nbytes},
            "messages": {
                "in": st.msgs_in,
                "bytes_in": st.bytes_in,
                "out": msgs_out,
                "bytes_out": bytes_out,
                "dropped": dropped,
                "no_responders": st.no_responders,
            },
            "queued_bytes": sum(s.queued_bytes for s in self.sessions),
            "peer_errors": self.peer_errors,
            "access": {"default": "allow" if self.policy.default_allow else "deny", "rules": len(self.policy.rules),
                       "denied": dict(self.denied)},
            "uids": {str(uid): {"connections": a.connections, "subscriptions": a.subscriptions,
                                "queued_bytes": a.queued_bytes, "written_bytes": a.written_bytes,
                                "consumers": a.consumers, "rings": a.rings}
                     for uid, a in sorted(accounts.items())},
            "fifos": {path: entry.describe() for path, entry in self.fifos.items()},
            "zmq": gateways,
            "rings": [r for r in (self.rings.stats() if self.rings is not None else [])
                      if access is None or viewer is None or r["uid"] == viewer.ident.uid],
            "queues": self.queues.stats(viewer if access is not None else None) if self.queues is not None else {},
            "topics": per_topic,
        }
