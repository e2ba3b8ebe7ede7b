"""Logging keeps secrets out: `redact` on its own, and the JSON formatter on access lines,
plain messages and exception tracebacks."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from collections.abc import Callable

import pytest

from proxy.logs import JsonFormatter, access_fields, configure_logging, log_access, redact
from proxy.secrets import Secrets, install_log_scrubber, remove_log_scrubber
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


def _written(fmt: str, write: Callable[[], None]) -> str:
    """What `configure_logging(fmt=...)` writes for `write()`, with the real writer thread."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure_logging("INFO", stream, fmt=fmt)
        write()
        for handler in root.handlers:
            handler.close()
    finally:
        root.handlers[:], root.level = saved
    return stream.getvalue()


def _without_ts(line: str, fmt: str) -> str:
    if fmt == "json":
        out = json.loads(line)
        assert isinstance(out, dict)
        out.pop("ts")
        return json.dumps(out)
    return line.split(" ", 1)[1]  # the text line starts with its timestamp


CONFIGURED = "zz-upstream-secret-42"  # a configured key: scrubbed by value, whatever its shape


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("error", [False, True])
@pytest.mark.parametrize("configured_secret", [False, True])
def test_access_fast_path_writes_the_line_the_formatter_writes(
    fmt: str, error: bool, configured_secret: bool
) -> None:
    """`log_access` builds the line without a LogRecord when the writer thread is the only
    handler; it must be the very line a `logging` call gives (timestamps aside), secrets
    redacted (the configured ones by the scrubber the app installs), newlines escaped."""
    record = make_record(
        request_id=f"id-{KEY}",
        path=f"/v1/chat/completions?api_key={KEY}",
        model=f"Bearer {KEY} {CONFIGURED}",
        error_message=f"upstream said:\nbad key {KEY} {CONFIGURED}",
    )
    fields = access_fields(record)
    level = logging.ERROR if error else logging.INFO

    def scrubbed(write: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            scrubber = install_log_scrubber(Secrets([CONFIGURED] if configured_secret else []))
            try:
                write()
            finally:
                remove_log_scrubber(scrubber)

        return run

    def logged() -> None:
        logging.getLogger("hangup.access").log(level, "request", extra={"fields": fields})

    fast = _written(fmt, scrubbed(lambda: log_access(fields, error=error)))
    slow = _written(fmt, scrubbed(logged))
    assert fast.count("\n") == slow.count("\n") == 1
    assert KEY not in fast
    assert (CONFIGURED in fast) is not configured_secret
    assert _without_ts(fast, fmt) == _without_ts(slow, fmt)
    stamp = fast.split('"ts":"')[1][:19] if fmt == "json" else fast[:19]
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) >= stamp  # a real, current one
    assert (
        abs(time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) - time.mktime(time.gmtime()))
        < 60
    )


def test_access_fast_path_leaves_other_handlers_their_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With any other handler on the way (here pytest's capture), the access line is an
    ordinary logging call, so that handler sees it as before."""
    fields = access_fields(make_record())
    caplog.set_level(logging.INFO, logger="hangup.access")

    def with_capture_beside_the_writer() -> None:
        logging.getLogger().addHandler(caplog.handler)  # configure_logging replaced it
        log_access(fields)

    written = _written("json", with_capture_beside_the_writer)
    (captured,) = [r for r in caplog.records if r.name == "hangup.access"]
    assert getattr(captured, "fields", None) == fields
    assert json.loads(written)["request_id"] == fields["request_id"]


def test_access_fast_path_respects_the_level() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure_logging("WARNING", stream)
        log_access(access_fields(make_record()))
        log_access(access_fields(make_record()), error=True)
        for handler in root.handlers:
            handler.close()
    finally:
        root.handlers[:], root.level = saved
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["level"] == "error"


def test_access_fast_path_builds_no_log_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the fast path: no `logging` call (LogRecord, caller lookup) on the loop."""

    def no_record(*args: object, **kwargs: object) -> None:
        raise AssertionError("the access line went through logging")

    fields = access_fields(make_record())
    monkeypatch.setattr(logging.getLogger("hangup.access"), "log", no_record)

    def with_a_configured_secret() -> None:  # as in production: the app's scrubber is there
        scrubber = install_log_scrubber(Secrets([CONFIGURED]))
        try:
            log_access(fields)
        finally:
            remove_log_scrubber(scrubber)

    written = _written("json", with_a_configured_secret)
    assert json.loads(written)["request_id"] == fields["request_id"]
