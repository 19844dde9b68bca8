from __future__ import annotations

import random

import pytest

from gateway.ndjson import LineTooLong
from gateway.sse import Event, SSEDecoder, encode


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_every_line_ending_dispatches(eol: str) -> None:
    decoder = SSEDecoder()
    text = f"data: one{eol}{eol}data: two{eol}{eol}"
    # A final lone CR may be half of a CRLF, so it is only settled when the stream ends.
    assert [e.data for e in decoder.feed(text) + decoder.flush()] == ["one", "two"]


def test_crlf_split_between_reads_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed("data: x\r") == []
    assert decoder.feed("\n\r\n") == [Event("x")]


def test_multiline_data_comments_and_fields() -> None:
    events = SSEDecoder().feed(": keep-alive\nevent: update\nid: 7\nretry: 50\ndata: a\ndata:b\n\n")
    assert events == [Event("a\nb", "update", "7", 50)]


def test_event_without_data_is_not_dispatched() -> None:
    assert SSEDecoder().feed("event: ping\n\n") == []


def test_partial_events_wait_for_the_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a"') == []
    assert decoder.feed(b": 1}\n") == []
    assert decoder.feed(b"\n") == [Event('{"a": 1}')]


def test_flush_reads_a_last_unterminated_line_but_does_not_dispatch_it() -> None:
    decoder = SSEDecoder()
    decoder.feed("data: x\n\ndata: tail")
    assert decoder.flush() == []
    assert decoder.cut  # and says the stream ended inside an event


@pytest.mark.parametrize(
    ("text", "cut"),
    [
        ('data: {"a": 1}\r\n\r\n', False),
        ('data: {"a": 1}\n\n: bye', False),  # a comment is no event
        ('data: {"a": 1}\n\nevent: end\n', False),  # nor a type without data
        ('data: {"a": 1}\r\n\r\ndata: {"b', True),
        ('data: {"a": 1}\n\ndata: {"b": 2}\n', True),  # no blank line dispatched it
        ('data: {"a": 1}\r\n\r\ndata: {"b": 2}\r', True),
    ],
)
def test_flush_says_whether_the_stream_ended_inside_an_event(text: str, cut: bool) -> None:
    decoder = SSEDecoder()
    assert [event.data for event in decoder.feed(text) + decoder.flush()] == ['{"a": 1}']
    assert decoder.cut is cut


def test_an_endless_line_is_cut_off() -> None:
    with pytest.raises(LineTooLong):
        SSEDecoder(max_line=8).feed("data: 0123456789")


def test_encode_frames_one_json_event() -> None:
    assert encode({"a": 1}) == b'data: {"a":1}\n\n'


def test_a_character_split_between_two_reads_arrives_whole() -> None:
    decoder = SSEDecoder()
    encoded = 'data: {"content": "año 東京"}\n\n'.encode()
    cut = encoded.index("東".encode()) + 1  # inside the three bytes of one character
    events = decoder.feed(encoded[:cut]) + decoder.feed(encoded[cut:])
    assert [event.data for event in events] == ['{"content": "año 東京"}']


def test_a_line_growing_in_many_reads_is_cut_at_the_limit() -> None:
    decoder = SSEDecoder(max_line=1000)
    decoder.feed(b"data: ")
    with pytest.raises(LineTooLong):
        for _ in range(20):
            decoder.feed(b"x" * 100)
    assert SSEDecoder(max_line=1000).feed(b"data: " + b"x" * 900 + b"\n\n")[0].data == "x" * 900


def test_an_event_of_endless_short_data_lines_is_cut_at_the_limit() -> None:
    # No line is long, but with no blank line the one event would grow without end.
    decoder = SSEDecoder(max_line=1000)
    with pytest.raises(LineTooLong, match="event longer than 1000"):
        for _ in range(200):
            decoder.feed(b"data: xxxxxxxxx\n")
    again = SSEDecoder(max_line=1000)
    for _ in range(10):  # events under the limit, each dispatched, never add up
        events = again.feed(b"data: " + b"x" * 90 + b"\n" + b"data: " + b"y" * 90 + b"\n\n")
        assert [event.data for event in events] == ["x" * 90 + "\n" + "y" * 90]


STREAM = (
    ": keep-alive\n\n"
    'data: {"a": 1}\n\n'
    "data:no space\n\n"
    "event: error\ndata: first\ndata: second\n\n"
    "id: 7\nretry: 1500\ndata: with id\n\n"
    "data: after id\n\n"
    "event: ping\n\n"  # no data: not dispatched
    "\n\n"
    "data\n\n"  # a field name alone: empty data
    "data: caf\u00e9 \u2603\n\n"
)


def events_of(decoder: SSEDecoder, reads: list[bytes]) -> list[Event]:
    return [event for read in reads for event in decoder.feed(read)] + decoder.flush()


@pytest.mark.parametrize("seed", range(20))
def test_whole_events_in_one_read_decode_as_they_do_a_byte_at_a_time(seed: int) -> None:
    raw = STREAM.encode()
    one_by_one = events_of(SSEDecoder(), [raw[i : i + 1] for i in range(len(raw))])
    assert [e.data for e in one_by_one] == [
        '{"a": 1}',
        "no space",
        "first\nsecond",
        "with id",
        "after id",
        "",
        "caf\u00e9 \u2603",
    ]
    cuts = sorted(random.Random(seed).sample(range(1, len(raw)), 3))  # some reads end between events
    reads = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert events_of(SSEDecoder(), reads) == one_by_one
    assert events_of(SSEDecoder(), [raw]) == one_by_one
