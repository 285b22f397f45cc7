"""Topic names and subscription patterns: validation and matching, shared by client and broker.

A topic is a sequence of non-empty tokens separated by ``.``: ``sensors.kitchen.temp``. A token
is any run of printable characters except ``.``, ``*`` and ``>``; whitespace and control
characters are not allowed anywhere. A pattern may use two wildcards, each a whole token:
``*`` matches exactly one token and ``>`` (only as the last token) matches one or more.

Two prefixes are special:

* ``$`` -- topics whose first token starts with ``$`` belong to the broker (``$SYS.…``). Clients
  may subscribe to them but not publish on them, and a pattern that starts with a wildcard does
  not match them (so ``>`` is "every application topic").
* ``_INBOX.`` -- reply inboxes. A message on ``_INBOX.<token>.…`` is delivered only to the
  connection that owns ``<token>`` (announced in the handshake); no pattern of any other
  connection matches it, and clients do not subscribe to inbox patterns themselves.
"""

from __future__ import annotations

import re

from hostbus.errors import InvalidTopicError

#: Longest topic or pattern, in UTF-8 bytes. Long enough for deep hierarchies with UUIDs in
#: them, short enough that the broker's per-topic caches stay small.
MAX_TOPIC_BYTES = 512

INBOX_PREFIX = "_INBOX."

_TOKEN = r"[^\s.*>\x00-\x1f\x7f-\x9f\ud800-\udfff]+"  # no whitespace, controls, DEL or lone surrogates
_TOPIC_RE = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")
_PATTERN_TOKEN_RE = re.compile(rf"{_TOKEN}|\*|>")


def show(name: str, limit: int = 64) -> str:
    """``repr(name)``, shortened: error texts must stay small whatever a peer sent."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name)} characters)"


def topic_problem(topic: str) -> str | None:
    """Why ``topic`` is not a valid topic to publish on, or None if it is."""
    if not topic:
        return "topic is empty"
    if _TOPIC_RE.fullmatch(topic) is None:
        return _token_problem(topic, wildcards=False)
    # A str of n characters is at most 4n UTF-8 bytes: encode only when it could be too long.
    if len(topic) > MAX_TOPIC_BYTES // 4 and len(topic.encode()) > MAX_TOPIC_BYTES:
        return f"topic is {len(topic.encode())} bytes long; the limit is {MAX_TOPIC_BYTES}"
    return None


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid subscription pattern, or None if it is."""
    if not pattern:
        return "pattern is empty"
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if _PATTERN_TOKEN_RE.fullmatch(token) is None:
            return _token_problem(pattern, wildcards=True)
        if token == ">" and i != len(tokens) - 1:
            return f"'>' may only be the last token (in {show(pattern)})"
    if len(pattern.encode()) > MAX_TOPIC_BYTES:
        return f"pattern is {len(pattern.encode())} bytes long; the limit is {MAX_TOPIC_BYTES}"
    return None


def _token_problem(name: str, *, wildcards: bool) -> str:
    for token in name.split("."):
        if not token:
            return f"empty token in {show(name)} (leading, trailing or doubled '.')"
        if wildcards and token in ("*", ">"):
            continue
        for ch in token:
            if ch in "*>":
                if wildcards:
                    return f"wildcard {ch!r} must be a whole token (in {show(name)})"
                return f"wildcard {ch!r} is not allowed in a topic to publish on (in {show(name)})"
            if ch.isspace() or ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
                return f"whitespace or control character {ch!r} in {show(name)}"
            if 0xD800 <= ord(ch) <= 0xDFFF:
                return f"lone surrogate {ch!r} in {show(name)} (not encodable as UTF-8)"
    return f"{show(name)} is not a valid name"  # pragma: no cover - the regexes and this loop agree


def check_topic(topic: str) -> str:
    """Return ``topic`` if valid, else raise :class:`InvalidTopicError` saying why."""
    problem = topic_problem(topic)
    if problem is not None:
        raise InvalidTopicError(f"invalid topic: {problem}")
    return topic


def check_pattern(pattern: str) -> str:
    """Return ``pattern`` if valid, else raise :class:`InvalidTopicError` saying why."""
    problem = pattern_problem(pattern)
    if problem is not None:
        raise InvalidTopicError(f"invalid pattern: {problem}")
    return pattern


def is_reserved(topic: str) -> bool:
    """True for broker topics (first token starts with ``$``)."""
    return topic.startswith("$")


def is_inbox(topic: str) -> bool:
    return topic.startswith(INBOX_PREFIX)


def matches(pattern: str, topic: str) -> bool:
    """True if ``topic`` (a valid topic) matches ``pattern`` (a valid pattern).

    This is the reference definition; the broker's index gives the same answers faster.
    """
    ptoks = pattern.split(".")
    ttoks = topic.split(".")
    if ptoks[0] in ("*", ">") and (topic.startswith("$") or topic.startswith(INBOX_PREFIX)):
        return False
    for i, p in enumerate(ptoks):
        if p == ">":
            return len(ttoks) > i
        if i >= len(ttoks):
            return False
        if p != "*" and p != ttoks[i]:
            return False
    return len(ptoks) == len(ttoks)
