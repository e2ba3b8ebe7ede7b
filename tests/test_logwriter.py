"""The background log writer (proxy/logwriter.py): off the caller's thread, in order, bounded,
and nothing lost on flush or close."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.logs import _SECRET, JsonFormatter, redact
from proxy.logwriter import BackgroundHandler


class RecordingStream(io.StringIO):
    """Remembers which threads wrote; can be made to block until released."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[str] = set()
        self.writes = 0
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        assert self.open.wait(10), "the test never released the stream"
        self.writers.add(threading.current_thread().name)
        self.writes += 1
        return super().write(s)


@pytest.fixture
def stream() -> RecordingStream:
    return RecordingStream()


@pytest.fixture
def logger(stream: RecordingStream) -> Iterator[tuple[logging.Logger, BackgroundHandler]]:
    target: logging.StreamHandler[RecordingStream] = logging.StreamHandler(stream)
    target.setFormatter(JsonFormatter())
    handler = BackgroundHandler(target, max_pending=50)  # type: ignore[arg-type]
    log = logging.getLogger(f"test.logwriter.{id(handler)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield log, handler
    stream.open.set()
    handler.close()
    log.removeHandler(handler)


def lines(stream: RecordingStream) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_written_by_the_writer_thread_in_order_and_batched(
    logger: tuple[logging.Logger, BackgroundHandler], stream: RecordingStream
) -> None:
    log, handler = logger
    for i in range(40):
        log.info("line %d", i)
    handler.flush()
    assert [line["msg"] for line in lines(stream)] == [f"line {i}" for i in range(40)]
    assert stream.writers == {"hangup-log-writer"}
    assert stream.writes < 40  # batches, not one write per line


def test_a_steady_trickle_is_written_in_batches_not_a_line_at_a_time(
    logger: tuple[logging.Logger, BackgroundHandler], stream: RecordingStream
) -> None:
    """Lines that come a millisecond apart (a few connections' access lines) never fill a large
    batch; the writer must still not wake for each one, or it takes the GIL at every syscall
    of the loop's thread (perf: ~140 us a request at 4 connections)."""
    log, handler = logger
    handler.max_pending = 10_000
    lines_sent = 0
    started = time.monotonic()
    while time.monotonic() - started < 0.4:
        log.info("line %d", lines_sent)
        lines_sent += 1
        time.sleep(0.001)  # pacing the producer, not waiting for the writer
    elapsed = time.monotonic() - started
    handler.flush()
    assert [line["msg"] for line in lines(stream)] == [f"line {i}" for i in range(lines_sent)]
    # one batch per 50 ms at most, the first at once, plus the flush's
    assert stream.writes <= elapsed / 0.05 + 3, (stream.writes, lines_sent)


def test_full_queue_drops_and_says_so_without_blocking_the_caller(
    logger: tuple[logging.Logger, BackgroundHandler], stream: RecordingStream
) -> None:
    log, handler = logger
    stream.open.clear()
    log.info("first")
    assert stream.entered.wait(5)  # the writer is now stuck in write()
    for i in range(200):  # returns at once although nothing can be written
        log.info("queued %d", i)
    assert handler.dropped == 200 - 50
    stream.open.set()
    handler.flush()
    got = [str(line["msg"]) for line in lines(stream)]
    assert got[0] == "first"
    assert got[1] == "log queue full: 150 log lines dropped"
    assert got[2:] == [f"queued {i}" for i in range(50)]


def test_close_writes_what_is_left(
    logger: tuple[logging.Logger, BackgroundHandler], stream: RecordingStream
) -> None:
    log, handler = logger
    for i in range(30):
        log.info("bye %d", i)
    handler.close()
    assert len(lines(stream)) == 30


def test_message_arguments_are_frozen_at_the_call(
    logger: tuple[logging.Logger, BackgroundHandler], stream: RecordingStream
) -> None:
    log, handler = logger
    stream.open.clear()
    log.info("warm")
    assert stream.entered.wait(5)
    state = ["before"]
    log.info("state %s", state)
    state[0] = "after"
    stream.open.set()
    handler.flush()
    assert lines(stream)[-1]["msg"] == "state ['before']"


def test_flush_returns_when_the_lines_are_out(
    logger: tuple[logging.Logger, BackgroundHandler], stream: RecordingStream
) -> None:
    log, handler = logger
    handler.flush_timeout_s = 60.0
    stream.open.clear()
    log.info("slow")
    assert stream.entered.wait(5)
    flusher = threading.Thread(target=handler.flush)
    flusher.start()
    log.info("after the flush began")  # not waited for
    assert flusher.is_alive()  # the write is still blocked, so the flush must be too
    stream.open.set()
    flusher.join(10)  # by the marker, long before the 60 s bound
    assert not flusher.is_alive()
    assert lines(stream)[0]["msg"] == "slow"


# with the two letters IGNORECASE matches beyond ASCII: long s and the Kelvin sign
_ODD = ["\u017fk-", "s\u212a-", "\u212aey"]
_PIECES = [*"aBkK -_:='\"sS", "bearer ", "Bearer", "sk-", "SK-", "api_key", "KEY", *_ODD]
_TEXT = st.lists(st.sampled_from(_PIECES), max_size=20).map("".join)


@settings(max_examples=500, deadline=None)
@given(_TEXT)
def test_redact_shortcut_changes_nothing(text: str) -> None:
    """redact() skips the regex when no alternative can match: same answer as the regex."""
    assert redact(text) == _full_redact(text)


def _full_redact(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return m.group(1) + "[redacted]"
        if m.group(3):
            return m.group(3) + "[redacted]"
        return "[redacted]"

    return _SECRET.sub(sub, text)


def test_redact_still_redacts() -> None:
    assert redact("Authorization: Bearer abc123") == "Authorization: Bearer [redacted]"
    assert redact("key sk-abcdefgh1234") == "key [redacted]"
    assert redact("/v1/chat/completions") == "/v1/chat/completions"
    assert redact("\u017fk-abcdefgh1") == "[redacted]"  # long s: the regex matches, so must we


class TextLayer(io.TextIOWrapper):
    """A std stream's layers over memory, its text writes counted."""

    def __init__(self, encoding: str) -> None:
        super().__init__(io.BytesIO(), encoding=encoding, errors="backslashreplace", newline="\n")
        self.text_writes: list[str] = []

    def write(self, s: str) -> int:
        self.text_writes.append(s)
        return super().write(s)

    def written(self) -> bytes:
        self.flush()
        raw = self.buffer
        assert isinstance(raw, io.BufferedWriter | io.BytesIO)
        return raw.getvalue() if isinstance(raw, io.BytesIO) else b""


def _write_mixed(stream: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record's line, two encoded lines (one not ASCII) and a record's line with a lone
    surrogate, through a writer on `stream` as the process's stderr."""
    monkeypatch.setattr(sys, "__stderr__", stream)
    target: logging.StreamHandler[TextIO] = logging.StreamHandler(stream)
    target.setFormatter(logging.Formatter("%(message)s"))
    handler = BackgroundHandler(target)
    try:
        stream.write("before\n")  # held by the text layer: it must come out first
        handler.emit(logging.LogRecord("t", logging.INFO, __file__, 0, "first é", None, None))
        handler.emit_line(bytearray('{"a":"ü"}'.encode()))
        handler.emit_line("text line")
        handler.emit_line(bytearray(b'{"b":2}'))
        handler.emit(logging.LogRecord("t", logging.INFO, __file__, 0, "sur\udc80", None, None))
        handler.flush()
    finally:
        handler.close()


EXPECTED = 'before\nfirst é\n{"a":"ü"}\ntext line\n{"b":2}\nsur\\udc80\n'


def test_encoded_lines_go_below_a_utf8_std_streams_text_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """To the process's own UTF-8 stderr, lines that come encoded are written as they are
    (no decode, no text write), in order with the others and after what the text layer held."""
    stream = TextLayer("utf-8")
    monkeypatch.setattr(TextLayer, "close", lambda self: None)  # (read after the handler)
    _write_mixed(stream, monkeypatch)
    assert stream.written() == EXPECTED.encode()
    assert not any("{" in text for text in stream.text_writes)


@pytest.mark.parametrize("kind", ["latin-1", "not std", "StringIO"])
def test_any_other_stream_gets_the_encoded_lines_as_text(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another encoding, a stream that is not the process's own (it may translate newlines)
    or one without bytes below: the same lines, written as text."""
    monkeypatch.setattr(TextLayer, "close", lambda self: None)
    if kind == "StringIO":
        text = io.StringIO()
        _write_mixed(text, monkeypatch)
        assert text.getvalue() == EXPECTED.replace("\\udc80", "\udc80")
        return
    stream = TextLayer("latin-1" if kind == "latin-1" else "utf-8")
    if kind == "not std":
        monkeypatch.setattr(sys, "__stderr__", io.StringIO())
        target: logging.StreamHandler[TextIO] = logging.StreamHandler(stream)
        handler = BackgroundHandler(target)
        handler.emit_line(bytearray(b'{"b":2}'))
        handler.flush()
        handler.close()
        assert stream.written() == b'{"b":2}\n' and stream.text_writes == ['{"b":2}\n']
        return
    _write_mixed(stream, monkeypatch)
    assert stream.written() == EXPECTED.encode("latin-1", "backslashreplace")
    assert any('{"a":"ü"}' in text for text in stream.text_writes)
