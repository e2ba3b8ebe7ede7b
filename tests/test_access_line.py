"""The access line encoded from the record (proxy/access_line.py) is the line the fields' dict
gives (`access_fields`, then `log_access`): member by member for any record, and through the
real writer with and without the app's secret scrubber, a secret in any field or none, words
to redact or none. And the usual record really takes the record's way (no dict built)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import access_line
from proxy.access_line import log_record, record_json_line
from proxy.logs import _access_json_line, _ms, access_fields, configure_logging, log_access
from proxy.logwriter import BackgroundHandler
from proxy.outcome import RequestRecord
from proxy.secrets import Secrets, install_log_scrubber, remove_log_scrubber
from proxy.tracing.context import TraceIds
from tests.metrics_support import make_record
from tests.test_logs_fields import _record

_words = st.sampled_from(["Bearer abc", "sk-abcdef123", "\u017fk-abcdef1", "apiKey: v", "key"])
_text = st.lists(st.one_of(_words, st.text(max_size=6)), max_size=3).map("".join)
_free_text = st.fixed_dictionaries(
    {},
    optional={
        "error_message": st.none() | _text,
        "path": _text,
        "request_id": _text,
        "model": st.none() | _text,
        "user_agent": st.none() | _text,
    },
)
_small = st.integers(0, 3) | st.integers(2**40, 2**70)
# The record's other members `tests.test_logs_fields._record` leaves at make_record's values.
_members = st.fixed_dictionaries(
    {},
    optional={
        "method": st.sampled_from(["POST", "GET"]),
        "client": st.none() | st.just("alice"),
        "client_address": st.none() | st.just("127.0.0.1"),
        "route": st.none() | st.just("batch"),
        "endpoint": st.sampled_from(["chat.completions", "embeddings", "other"]),
        "stream": st.booleans(),
        "status": st.none() | st.sampled_from([200, 499, 502]),
        "upstream_status": st.none() | st.sampled_from([200, 500]),
        "bytes_from_client": _small,
        "bytes_to_client": _small,
        "upstream_attempts": _small,
        "trace": st.none()
        | st.builds(TraceIds, st.integers(0, 2**128 - 1), st.just(1), st.none(), st.booleans()),
    },
)


@settings(max_examples=1500, deadline=None)
@given(_record, _free_text, _members, st.booleans())
def test_the_record_line_is_the_fields_line(
    record: RequestRecord, free_text: dict[str, str | None], members: dict[str, Any], error: bool
) -> None:
    record = msgspec.structs.replace(record, **free_text, **members)
    ts = "2026-12-01T03:50:00.123Z"
    general = _access_json_line(ts, error, access_fields(record))
    line = record_json_line(ts, error, record)
    if line is None:  # only when a free-text member may need redacting
        low = general.casefold()
        assert "[redacted]" in general or "bearer" in low or "sk-" in low or "key" in low
    else:
        assert line == general


def test_the_usual_record_takes_the_record_way() -> None:
    assert record_json_line("t", False, make_record()) is not None


def _written(write: Callable[[], None], secrets: list[str]) -> list[str]:
    """The lines `configure_logging` (JSON) writes for `write()`, with the real writer thread
    and, as the app installs it, a scrubber of `secrets`; each line without its timestamp."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure_logging("INFO", stream)
        scrubber = install_log_scrubber(Secrets(secrets))
        try:
            write()
        finally:
            remove_log_scrubber(scrubber)
        for handler in root.handlers:
            handler.close()
    finally:
        root.handlers[:], root.level = saved
    lines = []
    for line in stream.getvalue().splitlines():
        out = json.loads(line)
        out.pop("ts")
        lines.append(json.dumps(out))
    return lines


SECRET = "zz-upstream-secret-42"
QUOTED = 'zz"quoted\\secret'  # JSON escapes both: not found in the line as it is


@pytest.mark.parametrize("secret", [SECRET, QUOTED, ""])
@pytest.mark.parametrize("field", [None, "model", "error_message", "path", "user_agent"])
@pytest.mark.parametrize("error", [False, True])
def test_log_record_writes_what_log_access_writes(
    secret: str, field: str | None, error: bool
) -> None:
    configured = [secret] if secret else []
    record = make_record()
    if field is not None and secret:
        record = msgspec.structs.replace(record, **{field: f"upstream said {secret}!"})
    fast = _written(lambda: log_record(record, error=error), configured)
    slow = _written(lambda: log_access(access_fields(record), error=error), configured)
    assert len(fast) == 1
    assert fast == slow
    if secret:
        assert secret not in fast[0] and json.dumps(secret)[1:-1] not in fast[0]


@pytest.mark.parametrize("word", ["Bearer abc", "sk-abcdef123", "\u017fk-abcdef1", "apiKey: v"])
@pytest.mark.parametrize("field", ["model", "error_message", "path", "request_id", "user_agent"])
def test_log_record_leaves_text_to_redact_to_the_fields_way(word: str, field: str) -> None:
    """`log_record`'s look for redact's words (`_record_json_bytes`') sends such a line the
    dict's way, which redacts it."""
    record = msgspec.structs.replace(make_record(), **{field: f"said {word}!"})
    fast = _written(lambda: log_record(record), [])
    assert fast == _written(lambda: log_access(access_fields(record)), [])
    assert word not in fast[0]


def test_log_record_keeps_the_writers_bound() -> None:
    """The line `log_record` queues is bounded by the writer (`emit_line`): past `max_pending`
    waiting, it is dropped and counted (the writer then says how many)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", io.StringIO())
        (writer,) = root.handlers
        assert isinstance(writer, BackgroundHandler)
        writer.max_pending = 0
        log_record(make_record())
        assert writer.dropped == 1
        writer.max_pending = 10_000
        log_record(make_record())
        assert writer.dropped == 1
        writer.close()
    finally:
        root.handlers[:], root.level = saved


def test_log_record_builds_no_dict_for_the_usual_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the app's scrubber on the way, as in production: the line comes from the record."""

    def no_fields(record: RequestRecord) -> None:
        raise AssertionError("the fields' dict was built")

    monkeypatch.setattr(access_line, "access_fields", no_fields)
    record = make_record()
    (line,) = _written(lambda: log_record(record), [SECRET])
    assert json.loads(line)["request_id"] == record.request_id


def test_the_line_is_encoded_into_a_buffer_as_large_as_a_usual_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`encode` grows its own output from small several times: the usual line is encoded
    into a buffer it fits, with no growth (it is truncated to the line)."""
    seen: list[int] = []
    encode_into = access_line._encode_into

    def spied(line: object, buffer: bytearray) -> None:
        capacity = len(buffer)
        encode_into(line, buffer)
        seen.append(len(buffer))
        assert capacity == access_line._LINE_BUFFER > len(buffer)

    monkeypatch.setattr(access_line, "_encode_into", spied)
    line = record_json_line("2026-12-01T00:00:00.000Z", False, make_record(upstream="u"))
    assert line is not None and json.loads(line)["upstream"] == "u"
    assert seen == [len(line)]


@pytest.mark.parametrize(
    "duration",
    [0.0028, 0.0031415, 0.0000005, 0.0000015, 2.5e-7, 1.2345675, 2e9, 0.0, -0.25, 1e-320],
)
@pytest.mark.parametrize("waited", [0.0, 0.001, 0.0027995, 5.0])
def test_the_lines_durations_are_ms_of_the_records(duration: float, waited: float) -> None:
    """`_line`'s inline `_ms` of the duration and the overhead gives `_ms`' value in its
    usual case and in every other one (ties, zero, negatives, past 2**40, no overhead)."""
    record = make_record(started_at=1000.0, upstream_wait_s=waited)
    record.ended_at = record.started_at + duration
    line = access_line._line(record, "t", "info")
    exact = record.ended_at - record.started_at
    assert msgspec.json.encode(line.duration_ms) == msgspec.json.encode(_ms(exact))
    overhead = max(0.0, exact - waited)
    assert msgspec.json.encode(line.overhead_ms) == msgspec.json.encode(_ms(overhead))
