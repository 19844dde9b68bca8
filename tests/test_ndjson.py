from __future__ import annotations

import orjson
import pytest

from gateway.ndjson import LineTooLong, NDJSONDecoder


def test_lines_split_across_reads_are_reassembled() -> None:
    decoder = NDJSONDecoder()
    assert list(decoder.feed(b'{"a": 1}\n{"b"')) == [{"a": 1}]
    assert list(decoder.feed(b": 2}")) == []
    assert list(decoder.feed(b"\n")) == [{"b": 2}]


def test_blank_lines_are_skipped_and_a_last_line_without_newline_flushes() -> None:
    decoder = NDJSONDecoder()
    assert list(decoder.feed(b'\n\n{"a": 1}\n  \n{"z": 0}')) == [{"a": 1}]
    assert decoder.flush() == [{"z": 0}]
    assert decoder.flush() == []


def test_malformed_lines_raise_after_the_lines_before_them() -> None:
    values = NDJSONDecoder().feed(b'{"a": 1}\n{"b": 2}\nnot json\n{"c": 3}\n')
    assert next(values) == {"a": 1}
    assert next(values) == {"b": 2}
    with pytest.raises(orjson.JSONDecodeError):
        next(values)


def test_an_endless_line_is_cut_off() -> None:
    decoder = NDJSONDecoder(max_line=10)
    with pytest.raises(LineTooLong):
        decoder.feed(b'{"a": "aaaaaaaaaaaaaaaa')
    complete_first = NDJSONDecoder(max_line=10).feed(b'{"a": 1}\n{"b": "bbbbbbbbbbbbbbbb')
    assert next(complete_first) == {"a": 1}
    with pytest.raises(LineTooLong):
        next(complete_first)


def test_a_line_growing_in_many_reads_is_kept_whole_until_its_newline() -> None:
    decoder = NDJSONDecoder(max_line=10_000)
    parts = [b'{"a": "', *[b"x" * 1000] * 5, b'"}\n']
    values = [value for part in parts for value in decoder.feed(part)]
    assert values == [{"a": "x" * 5000}]
    with pytest.raises(LineTooLong):
        for _ in range(20):
            decoder.feed(b"y" * 1000)
