"""Unit tests of topic and pattern validation and the reference matcher: hostbus.topics."""

from __future__ import annotations

import pytest

from hostbus import topics
from hostbus.errors import InvalidTopicError
from hostbus.topics import MAX_TOPIC_BYTES, matches, pattern_problem, topic_problem

# ---- topics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "a",
        "sensors.kitchen.temp",
        "$SYS.stats",  # valid as a name; whether a client may publish on it is the broker's call
        "_INBOX.abc.1",
        "ünïcødé.тема.主题",
        "a-b_c:d/e@f#g!h",
        "x" * MAX_TOPIC_BYTES,
        "é" * (MAX_TOPIC_BYTES // 2),  # 2 bytes each: exactly the limit
    ],
)
def test_valid_topics(topic: str) -> None:
    assert topic_problem(topic) is None
    assert topics.check_topic(topic) == topic


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("", "topic is empty"),
        (".a", "empty token in '.a' (leading, trailing or doubled '.')"),
        ("a.", "empty token in 'a.' (leading, trailing or doubled '.')"),
        ("a..b", "empty token in 'a..b' (leading, trailing or doubled '.')"),
        (".", "empty token in '.' (leading, trailing or doubled '.')"),
        ("a.*", "wildcard '*' is not allowed in a topic to publish on (in 'a.*')"),
        ("a.>", "wildcard '>' is not allowed in a topic to publish on (in 'a.>')"),
        ("a*b", "wildcard '*' is not allowed in a topic to publish on (in 'a*b')"),
        ("a.b>", "wildcard '>' is not allowed in a topic to publish on (in 'a.b>')"),
        ("a b", "whitespace or control character ' ' in 'a b'"),
        ("a\tb", "whitespace or control character '\\t' in 'a\\tb'"),
        ("a\nb", "whitespace or control character '\\n' in 'a\\nb'"),
        ("a\x00b", "whitespace or control character '\\x00' in 'a\\x00b'"),
        ("a\x1fb", "whitespace or control character '\\x1f' in 'a\\x1fb'"),
        ("a\x7fb", "whitespace or control character '\\x7f' in 'a\\x7fb'"),
        ("a\u00a0b", "whitespace or control character '\\xa0' in 'a\\xa0b'"),
        ("a\u2028b", "whitespace or control character '\\u2028' in 'a\\u2028b'"),
        ("x" * (MAX_TOPIC_BYTES + 1), f"topic is {MAX_TOPIC_BYTES + 1} bytes long; the limit is {MAX_TOPIC_BYTES}"),
        (
            "é" * (MAX_TOPIC_BYTES // 2) + "x",
            f"topic is {MAX_TOPIC_BYTES + 1} bytes long; the limit is {MAX_TOPIC_BYTES}",
        ),
    ],
)
def test_invalid_topics(topic: str, expected: str) -> None:
    assert topic_problem(topic) == expected
    with pytest.raises(InvalidTopicError, match="invalid topic") as info:
        topics.check_topic(topic)
    assert expected in str(info.value)


@pytest.mark.parametrize("ch", ["\x80", "\x85", "\x9f"])
def test_c1_control_characters_are_not_allowed_in_topics(ch: str) -> None:
    """The module docstring: "whitespace and control characters are not allowed anywhere".

    U+0080..U+009F are control characters (Unicode category Cc), like U+0000..U+001F.
    """
    assert topic_problem(f"a{ch}b") is not None
    assert pattern_problem(f"a{ch}b") is not None


def test_unencodable_topic_is_refused() -> None:
    """A str with a lone surrogate cannot be encoded as UTF-8, so it cannot be a topic on the wire."""
    assert topic_problem("a.\ud800") is not None


def test_unencodable_pattern_is_refused_not_raised() -> None:
    """pattern_problem must answer with a reason, not raise UnicodeEncodeError: the broker calls it
    on patterns taken from a client's SUB JSON, where "\\ud800" is a legal JSON string escape."""
    assert pattern_problem("a.\ud800") is not None


# ---- patterns --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    ["a", "a.b.c", "*", ">", "a.*", "*.b", "a.>", "*.*.>", "$SYS.>", "a.*.c.>", "x" * MAX_TOPIC_BYTES],
)
def test_valid_patterns(pattern: str) -> None:
    assert pattern_problem(pattern) is None
    assert topics.check_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("", "pattern is empty"),
        ("a..b", "empty token in 'a..b' (leading, trailing or doubled '.')"),
        (".a", "empty token in '.a' (leading, trailing or doubled '.')"),
        ("a.", "empty token in 'a.' (leading, trailing or doubled '.')"),
        ("a.>.b", "'>' may only be the last token (in 'a.>.b')"),
        (">.a", "'>' may only be the last token (in '>.a')"),
        ("a*", "wildcard '*' must be a whole token (in 'a*')"),
        ("a.b*c", "wildcard '*' must be a whole token (in 'a.b*c')"),
        ("a.>b", "wildcard '>' must be a whole token (in 'a.>b')"),
        ("**", "wildcard '*' must be a whole token (in '**')"),
        ("a b.>", "whitespace or control character ' ' in 'a b.>'"),
        ("a.\x00", "whitespace or control character '\\x00' in 'a.\\x00'"),
        ("x" * (MAX_TOPIC_BYTES + 1), f"pattern is {MAX_TOPIC_BYTES + 1} bytes long; the limit is {MAX_TOPIC_BYTES}"),
    ],
)
def test_invalid_patterns(pattern: str, expected: str) -> None:
    assert pattern_problem(pattern) == expected
    with pytest.raises(InvalidTopicError, match="invalid pattern") as info:
        topics.check_pattern(pattern)
    assert expected in str(info.value)


def test_invalid_topic_error_is_a_value_error_with_a_hint() -> None:
    with pytest.raises(ValueError) as info:
        topics.check_topic("a..b")
    assert isinstance(info.value, InvalidTopicError)
    assert info.value.hint
    assert info.value.hint in str(info.value)


# ---- special prefixes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("topic", "reserved"), [("$SYS.x", True), ("$x", True), ("a.$SYS", False), ("SYS", False)])
def test_is_reserved(topic: str, reserved: bool) -> None:
    assert topics.is_reserved(topic) is reserved


@pytest.mark.parametrize(
    ("topic", "inbox"), [("_INBOX.a.b", True), ("_INBOX.a", True), ("_INBOX", False), ("a._INBOX.b", False)]
)
def test_is_inbox(topic: str, inbox: bool) -> None:
    assert topics.is_inbox(topic) is inbox


# ---- matches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b", False),
        ("a.b", "a.b.c", False),
        ("a.b.c", "a.b.d", False),
        ("a.b", "a.bb", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*.b", "a.b", True),
        ("*.b", "a.c", False),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.x.y.c", False),
        ("*.*", "a.b", True),
        # '>' needs at least one token
        (">", "a", True),
        (">", "a.b.c", True),
        ("a.>", "a", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "b.c", False),
        ("a.b.>", "a.b", False),
        ("*.>", "a", False),
        ("*.>", "a.b", True),
        ("a.*.>", "a.b.c", True),
        ("a.*.>", "a.b", False),
        # '$' topics: not matched by a leading wildcard, but by literal first tokens
        (">", "$SYS.x", False),
        ("*.x", "$SYS.x", False),
        ("*", "$SYS", False),
        ("*.>", "$SYS.x", False),
        ("$SYS.>", "$SYS.x", True),
        ("$SYS.*", "$SYS.x", True),
        ("$SYS.x", "$SYS.x", True),
        ("a.>", "a.$b", True),  # only the first token is special
        ("a.*", "a.$b", True),
        # '_INBOX.' topics: not matched by a leading wildcard
        (">", "_INBOX.abc.1", False),
        ("*.abc.1", "_INBOX.abc.1", False),
        ("*.>", "_INBOX.abc.1", False),
        ("_INBOX.>", "_INBOX.abc.1", True),
        ("_INBOX.abc.1", "_INBOX.abc.1", True),
        (">", "_INBOX", True),  # no dot: an ordinary topic
        (">", "_INBOXx.a", True),
        ("*", "_INBOX", True),
    ],
)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected
