"""The sans-I/O request-body inflater: bounds, encodings, and any chunking."""

from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.edge.inflate import (
    RATIO_GRACE_BYTES,
    InflateError,
    InflateLimit,
    Inflater,
    parse_encoding,
)
from tests.connection_support import big_bomb

TEXT = b'{"model": "m", "messages": [{"role": "user", "content": "%s"}]}' % (b"hello " * 2000)
MIB = 1024 * 1024


def inflate(encoding: str, data: bytes, step: int, **bounds: float) -> bytes:
    inflater = Inflater(
        encoding, max_size=int(bounds.get("max_size", 64 * MIB)), max_ratio=bounds.get("ratio", 100)
    )
    out = b"".join(inflater.feed(data[i : i + step]) for i in range(0, len(data), step))
    return out + inflater.finish()


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("gzip", gzip.compress(TEXT)),
        ("deflate", zlib.compress(TEXT)),
        ("deflate", b""),  # raw deflate, built below
    ],
    ids=["gzip", "zlib-deflate", "raw-deflate"],
)
def test_round_trip(encoding: str, data: bytes) -> None:
    if not data:  # raw deflate (no zlib header), which some clients send as "deflate"
        c = zlib.compressobj(wbits=-15)
        data = c.compress(TEXT) + c.flush()
    assert inflate(encoding, data, 1000) == TEXT


@settings(max_examples=50, deadline=None)
@given(step=st.integers(min_value=1, max_value=4096))
def test_any_chunking_gives_the_same_body(step: int) -> None:
    assert inflate("gzip", gzip.compress(TEXT), step) == TEXT


def test_the_size_bound_stops_inflating_one_byte_past_it() -> None:
    data = zlib.compress(bytes(3 * MIB))
    inflater = Inflater("deflate", max_size=2 * MIB, max_ratio=1e9)
    with pytest.raises(InflateLimit) as caught:
        inflater.feed(data)
    assert caught.value.what == "size"
    assert inflater.inflated == 2 * MIB + 1


def test_the_ratio_bound_stops_a_bomb_early() -> None:
    bomb = big_bomb(256)  # ~1000:1
    inflater = Inflater("deflate", max_size=1024 * MIB, max_ratio=100)
    with pytest.raises(InflateLimit) as caught:
        for i in range(0, len(bomb), 65536):
            inflater.feed(bomb[i : i + 65536])
    assert caught.value.what == "ratio"
    # Stopped within one step of the bound: never more than ratio x what was fed.
    assert inflater.inflated <= max(RATIO_GRACE_BYTES, inflater.compressed * 100) + 1


@pytest.mark.parametrize(
    "data",
    [gzip.compress(TEXT)[:-10], gzip.compress(TEXT) + b"junk", b"not gzip at all"],
    ids=["truncated", "trailing-junk", "garbage"],
)
def test_broken_streams_are_errors(data: bytes) -> None:
    inflater = Inflater("gzip", max_size=64 * MIB, max_ratio=100)
    with pytest.raises(InflateError):
        inflater.feed(data)
        inflater.finish()


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        (None, None),
        ("identity", None),
        ("GZIP", "gzip"),
        ("x-gzip", "gzip"),
        ("deflate", "deflate"),
        ("gzip, gzip", "gzip, gzip"),
        ("br", "br"),
    ],
)
def test_parse_encoding(header: str | None, parsed: str | None) -> None:
    assert parse_encoding(header) == parsed
