"""Logging keeps secrets out: `redact` on its own, and the JSON formatter on access lines,
plain messages and exception tracebacks."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from proxy.logs import JsonFormatter, access_fields, configure_logging, redact
from tests.metrics_support import make_record

KEY = "sk-proj-Abc123_def-456ghi"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Authorization: Bearer {KEY}", "Authorization: Bearer [redacted]"),
        ("authorization: bearer abc.def.ghi", "authorization: bearer [redacted]"),
        (f"upstream said: invalid key {KEY}.", "upstream said: invalid key [redacted]."),
        (f'{{"api_key": "{KEY}"}}', '{"api_key": "[redacted]"}'),
        ("api-key=s3cret more", "api-key=[redacted] more"),
        ("APIKEY: s3cret", "APIKEY: [redacted]"),
        ("gpt-4o-mini took 3 s", "gpt-4o-mini took 3 s"),  # nothing secret: untouched
        ("task-sk-ab", "task-sk-ab"),  # 'sk-' needs a word start and 6+ characters
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def _line(record: logging.LogRecord) -> dict[str, object]:
    out = json.loads(JsonFormatter().format(record))
    assert isinstance(out, dict)
    return out


def _record(msg: str, *, fields: dict[str, object] | None = None) -> logging.LogRecord:
    record = logging.LogRecord("hangup.test", logging.INFO, __file__, 1, msg, None, None)
    if fields is not None:
        record.fields = fields
    return record


def test_plain_messages_are_redacted() -> None:
    line = _line(_record(f"upstream answered 401: bad key {KEY}"))
    assert KEY not in json.dumps(line)
    assert line["msg"] == "upstream answered 401: bad key [redacted]"
    assert (line["level"], line["logger"]) == ("info", "hangup.test")


def test_access_lines_redact_the_fields_clients_and_upstreams_choose() -> None:
    record = make_record(
        request_id=f"id-{KEY}",
        path=f"/v1/chat/completions?api_key={KEY}",
        model=f"Bearer {KEY}",
        error_message=f"upstream said: bad key {KEY}",
    )
    line = _line(_record(f"request with {KEY}", fields=access_fields(record)))
    assert KEY not in json.dumps(line)
    assert line["path"] == "/v1/chat/completions?api_key=[redacted]"
    assert line["error"] == "upstream said: bad key [redacted]"
    assert line["route"] == "chat" and line["status"] == 200  # the rest is kept as is


def test_exception_text_is_redacted_in_both_kinds_of_line() -> None:
    try:
        raise RuntimeError(f"connect failed with key {KEY}")
    except RuntimeError:
        exc_info = sys.exc_info()
    with_fields: dict[str, object] = {"request_id": "r1"}
    for fields in (None, with_fields):
        record = _record("failed", fields=fields)
        record.exc_info = exc_info
        line = _line(record)
        assert KEY not in json.dumps(line)
        assert "Traceback" in str(line["exc"]) and "[redacted]" in str(line["exc"])


def test_access_fields_carry_no_headers_or_bodies() -> None:
    fields = access_fields(make_record())
    assert not {"headers", "body", "authorization", "api_key"} & set(fields)


def test_configure_logging_writes_json_lines_and_silences_aiohttp_access() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    access = logging.getLogger("aiohttp.access")
    saved_disabled = access.disabled
    stream = io.StringIO()
    try:
        configure_logging("WARNING", stream)
        logging.getLogger("hangup.x").warning("bearer %s", KEY)
        logging.getLogger("hangup.x").info("not at WARNING")
        assert access.disabled
        for handler in root.handlers:
            handler.close()  # lines are written off the loop: closing writes what is held
    finally:
        root.handlers[:], root.level = saved
        access.disabled = saved_disabled
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["msg"] == "bearer [redacted]"
