"""Access control: who may publish, subscribe and manage which topics.

A peer is a set of *principals* (``*``, ``uid:N``, ``user:NAME``, ``group:NAME`` for its primary
and supplementary groups, ``unit:NAME`` for its systemd unit, ``zmq:NAME`` for a ZeroMQ
endpoint). A *rule* has a topic pattern and, for each action it names, a list of principals;
an entry written ``!PRINCIPAL`` refuses instead of allowing.

How one (peer, action, topic) is decided -- the whole definition:

1. Take the rules that name the action and whose pattern matches the topic (the same matching
   as subscriptions: ``*`` one token, ``>`` one or more; wildcards in the first token never match
   ``$`` topics).
2. The most specific of them decides: patterns are compared token by token from the left, a
   literal token beats ``*``, and ``*`` beats ``>``. Two rules may not have the same pattern, so
   exactly one is the most specific.
3. In that rule a ``!`` entry matching the peer refuses; otherwise an entry matching the peer
   allows; otherwise the action is refused (a rule that names an action lists everyone allowed).
4. No rule names the action for the topic: ``access.default`` decides.

Replies to a request's ``_INBOX.`` subject need no rule: only the requester's connection
receives them and the subject is known only to the request's recipients.

A subscription pattern is decided as a whole when every topic it can match gets the same
answer; otherwise it is accepted with a per-message filter, so a ``>`` subscriber sees exactly
the topics it may see and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from hostbus import topics

Action = Literal["publish", "subscribe", "manage"]
ACTIONS: tuple[Action, ...] = ("publish", "subscribe", "manage")

#: Topics whose decision an :class:`Access` remembers per action before it starts over. Small:
#: one Access is shared by every connection with the same principals, and each entry is a
#: reference to a topic string the router already holds and a bool.
DECISION_CACHE = 1024
#: Distinct principal sets whose :class:`Access` a policy keeps for sharing.
ACCESS_CACHE = 4096



# ---- principals ----------------------------------------------------------------------------------


def principal_problem(entry: str) -> str | None:
    """Why ``entry`` (a rule's principal, optionally ``!``-prefixed) is not valid, or None."""
    name = entry[1:] if entry.startswith("!") else entry
    if name == "*":
        return None
    kind, sep, value = name.partition(":")
    if not sep or kind not in ("uid", "user", "group", "unit", "zmq"):
        return "must be '*', uid:N, user:NAME, group:NAME, unit:NAME or zmq:NAME (prefix '!' to refuse)"
    if not value or any(c.isspace() for c in value):
        return "needs a name without spaces after the ':'"
    if kind == "uid" and not (value.isascii() and value.isdigit() and str(int(value)) == value):
        return "uid: takes a number, written without leading zeros"
    return None


def unit_of_cgroup(text: str) -> str | None:
    """The systemd unit in the contents of ``/proc/PID/cgroup``, or None.

    The systemd hierarchy (``name=systemd``, cgroup v1/hybrid) is read if present, else the
    unified one (``0::``). The unit is the first path component that is not a slice:
    ``/system.slice/nginx.service`` -> ``nginx.service``; a user's process gives its session
    scope or ``user@UID.service``.
    """
    path = None
    for line in text.splitlines():
        _, controllers, cg = ([*line.split(":", 2), "", ""])[:3]
        if controllers == "name=systemd":
            path = cg
            break
        if controllers == "" and line.startswith("0::"):
            path = cg
    if not path:
        return None
    for part in path.strip("/").split("/"):
        if not part or part.endswith(".slice"):
            continue
        if "." in part and part.rsplit(".", 1)[1] in ("service", "scope", "socket", "mount", "swap", "timer"):
            return part
        return None
    return None


@dataclass(frozen=True, slots=True)
class Principals:
    """Who a peer is, resolved once at connect."""

    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary, kernel-verified
    user: str | None
    group_names: tuple[str, ...]
    unit: str | None
    names: frozenset[str]
    unknown: frozenset[str] = frozenset()  # kinds that could not be found out: "user", "group", "unit"

    @classmethod
    def of_peer(cls, uid: int, gid: int, groups: Sequence[int], user: str | None, group_names: Sequence[str],
                unit: str | None, unknown: frozenset[str] = frozenset()) -> Principals:
        """A Unix-socket peer, from its credentials and the names looked up for them."""
        names = {"*", f"uid:{uid}", *(f"group:{g}" for g in group_names)}
        if user is not None:
            names.add(f"user:{user}")
        if unit is not None:
            names.add(f"unit:{unit}")
        if unknown:  # "?" and "?KIND": what Rule.decide needs to refuse by an unknown kind of name
            names |= {"?", *(f"?{kind}" for kind in unknown)}
        return cls(uid, gid, tuple(groups), user, tuple(group_names), unit, frozenset(names), unknown)

    @classmethod
    def named(cls, name: str) -> Principals:
        """A principal without a kernel identity, such as ``zmq:NAME``."""
        return cls(-1, -1, (), None, (), None, frozenset({"*", name}))

    def describe(self) -> dict[str, object]:
        return {"uid": self.uid, "user": self.user, "gid": self.gid, "groups": list(self.group_names),
                "unit": self.unit, "principals": sorted(n for n in self.names if not n.startswith("?")),
                "unknown": sorted(self.unknown)}


# ---- rules and patterns ----------------------------------------------------------------------------

_KIND = {">": 0, "*": 1}


def specificity(pattern: str) -> tuple[int, ...]:
    """Sort key: higher is more specific (literal 2 > ``*`` 1 > ``>`` 0, from the left)."""
    return tuple(_KIND.get(t, 2) for t in pattern.split("."))


def _first_excludes(wild: list[str], other: list[str]) -> bool:
    """A pattern starting with a wildcard never matches ``$`` topics, nor inbox topics (``_INBOX.…``)."""
    first = other[0]
    return wild[0] in ("*", ">") and first not in ("*", ">") and (
        first.startswith("$") or (first == "_INBOX" and len(other) > 1))


def overlaps(a: str, b: str) -> bool:
    """True if some topic matches both patterns."""
    ta, tb = a.split("."), b.split(".")
    if _first_excludes(ta, tb) or _first_excludes(tb, ta):
        return False
    for i in range(max(len(ta), len(tb))):
        x = ta[i] if i < len(ta) else None
        y = tb[i] if i < len(tb) else None
        if x == ">" or y == ">":
            return x is not None and y is not None
        if x is None or y is None:
            return False
        if x != "*" and y not in ("*", x):
            return False
    return True


def covers(outer: str, inner: str) -> bool:
    """True if every topic matching ``inner`` matches ``outer``."""
    to, ti = outer.split("."), inner.split(".")
    if _first_excludes(to, ti):
        return False
    for i, o in enumerate(to):
        if o == ">":
            return len(ti) > i
        if i >= len(ti):
            return False
        t = ti[i]
        if t == ">":
            return False
        if o == "*":
            continue
        if t != o:
            return False
    return len(to) == len(ti)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str  # what decided, for errors and logs: "acl rule 2 (topic 'sensors.>')" or "access.default"


@dataclass(frozen=True, slots=True)
class Rule:
    index: int
    pattern: str
    key: tuple[int, ...]
    actions: dict[str, tuple[frozenset[str], frozenset[str]]]  # action -> (allowed, refused)

    def decide(self, names: frozenset[str], action: str) -> Decision:
        allow, refuse = self.actions[action]
        where = f"acl rule {self.index} (topic {topics.show(self.pattern)})"
        if refuse & names:
            return Decision(False, f"{where}: {action} refused to {sorted(refuse & names)[0]}")
        if refuse and "?" in names:  # fail closed: a refusal by a kind of name the peer's is unknown
            for entry in sorted(refuse):
                if f"?{entry.partition(':')[0]}" in names:
                    return Decision(False, f"{where}: {action} refused to {entry}, and this peer's "
                                    f"{entry.partition(':')[0]} could not be found out")
        if allow & names:
            return Decision(True, f"{where}: {action} allowed to {sorted(allow & names)[0]}")
        return Decision(False, f"{where}: {action} not granted to this peer")


class Policy:
    """The rules of one configuration, and the default."""

    def __init__(self, rules: Iterable[tuple[str, dict[str, list[str] | None]]], default_allow: bool) -> None:
        self.rules: list[Rule] = []
        for i, (pattern, acts) in enumerate(rules):
            parsed: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
            for action, entries in acts.items():
                if entries is None:
                    continue
                parsed[action] = (frozenset(e for e in entries if not e.startswith("!")),
                                  frozenset(e[1:] for e in entries if e.startswith("!")))
            self.rules.append(Rule(i, pattern, specificity(pattern), parsed))
        self.default_allow = default_allow
        self.default = Decision(default_allow, f"access.default ({'allow' if default_allow else 'deny'}): "
                                "no rule names this action for this topic")
        self._accesses: dict[frozenset[str], Access] = {}
        self.by_action: dict[str, list[Rule]] = {
            a: sorted((r for r in self.rules if a in r.actions), key=lambda r: r.key, reverse=True) for a in ACTIONS}

    @property
    def open(self) -> bool:
        """Everything is allowed to everyone: no check is needed at all."""
        return self.default_allow and not self.rules

    def decide(self, names: frozenset[str], action: str, topic: str) -> Decision:
        if topics.is_inbox(topic) and action == "publish":
            return Decision(True, "a reply to a request's inbox needs no rule")
        for rule in self.by_action[action]:  # most specific first
            if topics.matches(rule.pattern, topic):
                return rule.decide(names, action)
        return self.default

    def decide_pattern(self, names: frozenset[str], action: str, pattern: str) -> tuple[str, Decision]:
        """("allow" | "deny" | "filter", the decision for the pattern as a whole).

        "filter": the rules may decide topics of the pattern differently (a more specific rule
        that overlaps it disagrees with the one that covers it); each message is then decided on
        its own. The test is conservative: "filter" may be returned where every topic turns out
        to get the same answer, never "allow" or "deny" where they do not.
        """
        rules = self.by_action[action]
        base = self.default
        base_key: tuple[int, ...] = ()
        for rule in rules:
            if covers(rule.pattern, pattern):
                base = rule.decide(names, action)
                base_key = rule.key
                break
        mixed = False
        for rule in rules:
            if rule.key <= base_key:
                break  # sorted most specific first: no later rule can override the base
            if covers(rule.pattern, pattern) or not overlaps(rule.pattern, pattern):
                continue
            if rule.decide(names, action).allowed != base.allowed:
                mixed = True
                break
        if mixed:
            return "filter", base
        return ("allow" if base.allowed else "deny"), base

    def access(self, principals: Principals) -> Access | None:
        """The checker for one peer (shared by peers with the same principals); None when
        nothing is ever refused."""
        if self.open:
            return None
        names = principals.names
        acc = self._accesses.get(names)
        if acc is None:
            if len(self._accesses) >= ACCESS_CACHE:
                self._accesses.clear()
            acc = self._accesses[names] = Access(self, names)
        return acc


_ALLOWED = Decision(True, "allowed")


class Access:
    """A peer's view of a policy (shared by the peers with the same principals), with its
    decisions cached per topic as bools; the words of a refusal are found again when needed."""

    __slots__ = ("_pub", "_sub", "names", "policy")

    def __init__(self, policy: Policy, names: frozenset[str]) -> None:
        self.policy = policy
        self.names = names
        self._pub: dict[str, bool] = {}
        self._sub: dict[str, bool] = {}

    def publish(self, topic: str) -> Decision:
        """The decision on publishing ``topic`` (the rule's words only when refused)."""
        if topic.startswith(topics.INBOX_PREFIX):  # replies: one topic per request, never cached
            return _ALLOWED
        ok = self._pub.get(topic)
        if ok is None:
            ok = self.policy.decide(self.names, "publish", topic).allowed
            if len(self._pub) >= DECISION_CACHE:
                self._pub.clear()
            self._pub[topic] = ok
        return _ALLOWED if ok else self.policy.decide(self.names, "publish", topic)

    def may_receive(self, topic: str) -> bool:
        """For a subscription under a filter: may this message reach it?"""
        ok = self._sub.get(topic)
        if ok is None:
            ok = self.policy.decide(self.names, "subscribe", topic).allowed
            if len(self._sub) >= DECISION_CACHE:
                self._sub.clear()
            self._sub[topic] = ok
        return ok

    def subscribe(self, pattern: str) -> tuple[str, Decision]:
        return self.policy.decide_pattern(self.names, "subscribe", pattern)

    def decide(self, action: str, topic: str) -> Decision:
        return self.policy.decide(self.names, action, topic)

