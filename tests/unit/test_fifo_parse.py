"""FifoParser: lines, JSON, frames; every bad unit skipped and counted, chunking does not matter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostbus import wire
from hostbus.errors import ErrorCode, InvalidTopicError
from hostbusd.config import Config
from hostbusd.core.fifo import FifoFault, FifoParser
from hostbusd.core.router import Router


def make(fmt: str = "auto", prefix: str = "", max_line: int = 100) -> tuple[FifoParser, list[FifoFault]]:
    faults: list[FifoFault] = []
    router = Router(max_subscriptions=10, retained_max_topics=10, retained_max_bytes=1000, stats_max_topics=10)
    parser = FifoParser(fmt, max_line_bytes=max_line, max_frame_bytes=Config().limits.max_frame_bytes,
                        topic_prefix=prefix, check_topic=router.topic_from_wire, check_block=router.check_block,
                        on_fault=faults.append)
    return parser, faults


def payloads(parsed: list[tuple[str, bytes, int, int]]) -> list[tuple[str, bytes]]:
    out = []
    for topic, block, _, _ in parsed:
        view = wire.split_block(block)
        assert view.topic == topic
        out.append((topic, block[view.headers_end:]))
    return out


def test_lines_crlf_blank_and_split_across_feeds() -> None:
    p, faults = make("lines")
    assert payloads(p.feed(b"a.b one two\r\n\nc x")) == [("a.b", b"one two")]
    assert p.partial
    assert payloads(p.feed(b"yz\n")) == [("c", b"xyz")]
    assert not p.partial and faults == []


def test_too_long_line_is_skipped_even_when_it_arrives_in_pieces() -> None:
    p, faults = make("lines", max_line=20)
    assert p.feed(b"a " + b"x" * 30) == []  # already over the limit without its newline
    assert p.feed(b"x" * 30) == []  # still the same line: skipped silently
    assert payloads(p.feed(b"tail\na.ok 1\n")) == [("a.ok", b"1")]
    assert [f.kind for f in faults] == ["too_long"]
    assert payloads(p.feed(b"b " + b"y" * 40 + b"\nb.ok 2\n")) == [("b.ok", b"2")]
    assert [f.kind for f in faults] == ["too_long", "too_long"]


@pytest.mark.parametrize(("line", "kind"), [
    (b"nospace", "malformed"),
    (b" leading-space", "malformed"),
    (b"a..b x", "invalid_topic"),
    (b"$SYS.x y", "invalid_topic"),
    (b"\xff\xfe x", "invalid_topic"),
    (b"{not json", "invalid_json"),
    (b"[1]", "malformed"),  # not starting with '{': a lines line without a space
    (b'{"data": 1}', "invalid_json"),
    (b'{"topic": "a", "headers": {"k": 1}}', "invalid_json"),
    (b'{"topic": "a", "headers": []}', "invalid_json"),
    (b'{"topic": "a\\ud800"}', "invalid_json"),
    (b"[" * 5000 + b"]" * 5000, "malformed"),
])
def test_bad_lines_are_faults_and_the_next_line_parses(line: bytes, kind: str) -> None:
    p, faults = make("auto", max_line=20_000)
    assert payloads(p.feed(line + b"\nok.topic fine\n")) == [("ok.topic", b"fine")]
    assert [f.kind for f in faults] == [kind]


def test_json_data_and_headers() -> None:
    p, faults = make("json", max_line=10_000)
    parsed = p.feed(b'{"topic": "j", "data": "t", "headers": {"k": "v"}}\n{"topic": "j", "data": null}\n'
                    b'{"topic": "j"}\n')
    assert payloads(parsed) == [("j", b"t"), ("j", b"null"), ("j", b"")]
    view = wire.split_block(parsed[0][1])
    assert wire.decode_headers(parsed[0][1][view.headers_start:view.headers_end]) == {"k": "v"}
    assert faults == []
    p.feed(b"{" * 3000 + b"\n")  # absurd nesting is a fault, not a crash
    assert [f.kind for f in faults] == ["invalid_json"]


def test_topic_prefix() -> None:
    p, faults = make("lines", prefix="alerts.")
    assert payloads(p.feed(b"alerts.disk full\nother.x y\n")) == [("alerts.disk", b"full")]
    assert [f.kind for f in faults] == ["denied_topic"]


def test_partial_line_dropped_on_request() -> None:
    p, faults = make("lines")
    p.feed(b"a.b half")
    p.drop_partial()
    assert [f.kind for f in faults] == ["partial"]
    assert payloads(p.feed(b"c.d whole\n")) == [("c.d", b"whole")]


def test_frames_and_a_broken_stream() -> None:
    p, faults = make("frames")
    good = wire.encode_pub(b"f.a", b"1", flags=wire.PUB_RETAIN | wire.PUB_REQUEST, reply=b"r.x")
    parsed = p.feed(good + wire.encode_pub(b"a..b", b"x") + wire.encode_pub(b"f.b", b"2"))
    assert [(t, flags) for t, _, flags, _ in parsed] == [("f.a", wire.PUB_RETAIN), ("f.b", 0)]
    assert [f.kind for f in faults] == ["invalid_topic"]
    assert p.feed(b"\xff" * 10) == [] and p.broken
    assert [f.kind for f in faults] == ["invalid_topic", "broken_stream"]
    p.reset()
    assert [t for t, *_ in p.feed(good)] == ["f.a"]


def test_the_router_check_refuses_reserved_topics() -> None:
    router = Router(max_subscriptions=1, retained_max_topics=1, retained_max_bytes=1, stats_max_topics=1)
    with pytest.raises(InvalidTopicError) as info:
        router.topic_from_wire(b"$SYS.x")
    assert info.value.code == ErrorCode.INVALID_TOPIC


@given(lines=st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b), max_size=20),
       cuts=st.lists(st.integers(0, 700), max_size=6), fmt=st.sampled_from(["lines", "json", "auto"]))
def test_chunking_never_changes_the_result_and_nothing_raises(lines: list[bytes], cuts: list[int], fmt: str) -> None:
    data = b"".join(line + b"\n" for line in lines)
    whole, whole_faults = make(fmt)
    expected = payloads(whole.feed(data))
    pieces, piece_faults = make(fmt)
    got: list[tuple[str, bytes]] = []
    prev = 0
    for cut in [*sorted(c for c in cuts if c <= len(data)), len(data)]:
        got += payloads(pieces.feed(data[prev:cut]))
        prev = cut
    assert got == expected
    assert [f.kind for f in piece_faults] == [f.kind for f in whole_faults]
