"""Logging: JSON lines (the default, for collectors) or one readable line per event (for
terminals, `logging.format: text`), with secrets kept out by construction.

Records never carry headers or bodies, so there is nothing secret to log; the redaction filter
is a second line of defence for messages built from exceptions (an upstream's error text could
echo a key).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, Final, TextIO

import msgspec

from proxy.attempts import RESULT_OK
from proxy.logwriter import BackgroundHandler
from proxy.outcome import CountSource, RequestRecord
from proxy.secrets import LogScrubber

# One JSON library (msgspec, as for stream chunks); `str()` for anything it cannot encode.
_encoder: Final = msgspec.json.Encoder(enc_hook=str)
_encode: Final = _encoder.encode


def _dumps(line: dict[str, Any]) -> str:
    return _encode(line).decode()


_SECRET = re.compile(
    r"(?i)(bearer\s+)[^\s\"',]+|\b(sk-[A-Za-z0-9_\-]{6,})|(api[-_]?key[\"']?\s*[:=]\s*[\"']?)[^\s\"',]+"
)


def redact(text: str) -> str:
    # Every alternative of _SECRET needs one of these words. casefold, not lower: the regex's
    # IGNORECASE also matches U+017F (long s) for s and U+212A (Kelvin sign) for k.
    low = text.casefold()
    if "bearer" not in low and "sk-" not in low and "key" not in low:
        return text

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return m.group(1) + "[redacted]"
        if m.group(3):
            return m.group(3) + "[redacted]"
        return "[redacted]"

    return _SECRET.sub(sub, text)


ACCESS_LOGGER: Final = "hangup.access"
access_log: Final = logging.getLogger(ACCESS_LOGGER)

_FREE_TEXT_FIELDS = ("error", "path", "request_id", "model", "user_agent")


def _timestamp(record: logging.LogRecord) -> str:
    return _second(int(record.created)) + f".{int(record.msecs):03d}Z"


def _redact_free_text(line: dict[str, Any]) -> dict[str, Any]:
    # Access lines are built from record fields that never hold headers or bodies; only these
    # few carry text a client or an upstream chose, so only they are redacted (redacting the
    # whole line cost ~30 us a request). In place: `line` is the formatter's own dict.
    for key in _FREE_TEXT_FIELDS:
        value = line.get(key)
        if isinstance(value, str):
            line[key] = redact(value)
    return line


# ".000Z" ... ".999Z": an access line's milliseconds without formatting them each time.
_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))


@functools.lru_cache(maxsize=4)
def _second(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))


def _json_line(
    ts: str, level: str, logger: str, msg: str, fields: dict[str, Any], exc: str | None = None
) -> str:
    """A line with fields (an access line, or any call with `extra={"fields": ...}`): only
    the free-text fields, the message and the traceback are redacted."""
    line: dict[str, Any] = {"ts": ts, "level": level, "logger": logger, "msg": msg}
    line.update(fields)
    _redact_free_text(line)
    if exc is not None:
        line["exc"] = redact(exc)
    line["msg"] = redact(line["msg"])
    return _dumps(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts, level, msg = _timestamp(record), record.levelname.lower(), record.getMessage()
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            exc = self.formatException(record.exc_info) if record.exc_info else None
            return _json_line(ts, level, record.name, msg, fields, exc)
        line: dict[str, Any] = {"ts": ts, "level": level, "logger": record.name, "msg": msg}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return redact(_dumps(line))


def _access_text(f: dict[str, Any]) -> str:
    """`POST /v1/chat/completions 200 completed 812.3ms client=... route=... tokens=12+40 ...`"""
    parts = [
        str(f.get("method")),
        str(f.get("path")),
        str(f.get("status") if f.get("status") is not None else "-"),
        str(f.get("outcome")),
    ]
    if f.get("duration_ms") is not None:
        parts.append(f"{f['duration_ms']:.1f}ms")
    for key in ("client", "route", "model", "timeout_phase"):
        if f.get(key) is not None:
            parts.append(f"{key}={f[key]}")
    tokens = f.get("tokens")
    if isinstance(tokens, dict):
        estimated = "~" if tokens.get("estimated") else ""
        parts.append(f"tokens={estimated}{tokens.get('prompt')}+{tokens.get('completion')}")
        if tokens.get("saved"):
            parts.append(f"saved=~{tokens['saved']}")
    cost = f.get("cost_usd")
    if isinstance(cost, dict) and cost.get("used") is not None:
        parts.append(f"cost=${cost['used']:.6f}")
    if f.get("cancel_propagation_ms") is not None:
        parts.append(f"cancel->close={f['cancel_propagation_ms']:.2f}ms")
    if f.get("attempts") is not None:  # the chain, when there was more than one or one failed
        parts.append(f"attempts={f['attempts']}")
    for key in ("client_address", "request_id", "trace_id"):
        if f.get(key) is not None:
            parts.append(f"{key}={f[key]}")
    if f.get("user_agent") is not None:
        parts.append(f'ua="{f["user_agent"]}"')
    if f.get("error") is not None:
        parts.append(f"error={_dumps(f['error'])}")
    return " ".join(parts)


def _text_access_line(head: str, fields: dict[str, Any]) -> str:
    text = f"{head} {_access_text(_redact_free_text(dict(fields)))}"
    return redact(text.replace("\r", "\\r").replace("\n", "\\n"))


class TextFormatter(logging.Formatter):
    """One line per event for a person at a terminal; the same redaction as the JSON lines."""

    def format(self, record: logging.LogRecord) -> str:
        head = f"{_timestamp(record)} {record.levelname:<7}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and record.name == ACCESS_LOGGER and "outcome" in fields:
            text = _text_access_line(head, fields)
            if record.exc_info:
                text += "\n" + redact(self.formatException(record.exc_info))
            return text
        text = f"{head} {record.name}: {record.getMessage()}"
        if isinstance(fields, dict):
            extra = " ".join(
                f"{k}={v}" for k, v in _redact_free_text(dict(fields)).items() if k != "msg"
            )
            text += f" ({extra})" if extra else ""
        # One event, one line: a newline in any message (an upstream's error text) is escaped.
        text = text.replace("\r", "\\r").replace("\n", "\\n")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return redact(text)


def configure_logging(level: str = "INFO", stream: TextIO | None = None, fmt: str = "json") -> None:
    """JSON lines (or, with fmt="text", readable lines) to `stream` (stderr), formatted and
    written off the event loop."""
    target: logging.StreamHandler[TextIO] = logging.StreamHandler(stream or sys.stderr)
    target.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BackgroundHandler):
            old.close()  # writes what it still holds
    root.handlers[:] = [BackgroundHandler(target)]
    root.setLevel(level)
    # No line shows them; skipping them makes every LogRecord cheaper to build on the loop.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # aiohttp's own access log is replaced by ours (one line per request, with its outcome).
    logging.getLogger("aiohttp.access").disabled = True


_NO_SCRUBBERS: Final[tuple[LogScrubber, ...]] = ()


def _sole_writer(level: int) -> tuple[BackgroundHandler, Sequence[LogScrubber]] | None:
    """The BackgroundHandler an access line at `level` would reach, when it is the only thing
    the line would reach (no other handler, no filter but the secret scrubber on the way): then
    the line can be built without a `LogRecord` (~20 us less on the loop). Anything else (a
    test's capture handler, a filter someone added) gets the ordinary logging call."""
    if not access_log.isEnabledFor(level):
        return None
    # The app's chain, checked in one expression rather than walked (a loop over loggers,
    # one over each one's handlers: ~0.4 us more a line): the access logger and its parent
    # ("hangup", which the app's modules log to) hold no handler and no filter and pass their
    # lines on to the root, whose one handler is the writer, with no filter but (where
    # secrets are configured) the scrubber.
    parent = access_log.parent
    if (
        not access_log.handlers
        and not access_log.filters
        and access_log.propagate
        and parent is not None
        and not parent.handlers
        and not parent.filters
        and parent.propagate
        and (root := parent.parent) is not None
        and root.parent is None
        and not root.filters
        and len(handlers := root.handlers) == 1
        and type(found := handlers[0]) is BackgroundHandler
        and level >= found.level
    ):
        filters = found.filters
        if not filters:
            return found, _NO_SCRUBBERS
        if len(filters) == 1 and type(scrubber := filters[0]) is LogScrubber:
            return found, (scrubber,)
    return _walked_writer(level)


def _walked_writer(level: int) -> tuple[BackgroundHandler, Sequence[LogScrubber]] | None:
    """`_sole_writer` for any other chain of loggers: each logger and handler on the way."""
    found: BackgroundHandler | None = None
    scrubbers: list[LogScrubber] = []
    logger: logging.Logger | None = access_log
    while logger is not None:
        if logger.filters:
            return None
        for handler in logger.handlers:
            if found is not None or type(handler) is not BackgroundHandler:
                return None
            if level < handler.level:
                return None
            for each in handler.filters:
                if type(each) is not LogScrubber:
                    return None
                scrubbers.append(each)
            found = handler
        logger = logger.parent if logger.propagate else None
    return None if found is None else (found, scrubbers)


def log_access(fields: dict[str, Any], *, error: bool = False) -> None:
    """Write one request's access line (INFO; ERROR for our own bug), the same line the
    formatters make from a `logging` call with `extra={"fields": fields}`."""
    level = logging.ERROR if error else logging.INFO
    sole = _sole_writer(level)
    formatter = sole[0].target.formatter if sole is not None else None
    if sole is None or "outcome" not in fields or type(formatter) not in _FAST_FORMATTERS:
        access_log.log(level, "request", extra={"fields": fields})
        return
    writer, scrubbers = sole
    for scrubber in scrubbers:
        if scrubber.secrets.text("request") != "request":  # a secret inside the message
            access_log.log(level, "request", extra={"fields": fields})
            return
        fields = scrubber.scrub_fields(fields)
    now = time.time()
    ts = _second(int(now)) + _MILLIS[int(now * 1000) % 1000]
    if type(formatter) is JsonFormatter:
        line = _access_json_line(ts, error, fields)
    else:
        line = _text_access_line(f"{ts} {'ERROR' if error else 'INFO':<7}", fields)
    writer.emit_line(line)


_FAST_FORMATTERS: Final = (JsonFormatter, TextFormatter)
# An access line's first members, as `_json_line` writes them (`msg` "request" has nothing
# to redact), up to the fields' own.
_ACCESS_HEADS: Final = {
    error: f'","level":"{"error" if error else "info"}","logger":"{ACCESS_LOGGER}","msg":"request",'
    for error in (False, True)
}


def _access_json_line(ts: str, error: bool, fields: dict[str, Any]) -> str:
    """`_json_line(ts, level, ACCESS_LOGGER, "request", fields)`, ~1 us cheaper: the head is
    spliced in front of the encoded fields instead of copying them into a new dict, and the
    free-text fields are redacted (on a copy) only when one holds a word `redact` looks for.
    No fields, or one named like a head member ("ts", "level", "logger", "msg"): `_json_line`.
    tests/test_logs_access_line.py checks the two write the same line."""
    if not fields or "ts" in fields or "level" in fields or "logger" in fields or "msg" in fields:
        return _json_line(ts, "error" if error else "info", ACCESS_LOGGER, "request", fields)
    get = fields.get
    # One look for redact's words over the five `_FREE_TEXT_FIELDS` at once: casefold maps
    # char by char, and \0 keeps two fields from making a word together; str() of a value
    # that is not text only adds words, which sends the line to the per-field redaction.
    low = (
        f"{get('error')}\0{get('path')}\0{get('request_id')}\0{get('model')}\0{get('user_agent')}"
    ).casefold()
    if "bearer" in low or "sk-" in low or "key" in low:
        fields = _redact_free_text(dict(fields))
    return '{"ts":"' + ts + _ACCESS_HEADS[error] + _encode(fields)[1:].decode()


_TOKENIZED: Final = CountSource.TOKENIZED.value
_ESTIMATED: Final = CountSource.ESTIMATED.value
_REPORTED: Final = CountSource.REPORTED.value


# `round(ms, 3)` takes ~0.3 us (a correctly rounded decimal conversion and back), twice a line.
# Away from a tie, it is `n / 1000` with n the nearest integer to the exact `ms * 1000`: the
# float product is within its rounding error (< 2**-13 below 2**40) of the exact one, so when
# the float is further than that from a half, its nearest integer is the exact product's; and
# int / int is the nearest float to the quotient, as `round` returns it. For a positive float
# below 2**40, `% 1.0` is exact (C's fmod) and so is `scaled - frac` (its floor), which gives
# that integer without `round` and `abs` (two builtin calls): `n / 1000` with n a float equal
# to the integer is the same division. Ties, zero and negatives (round keeps -0.0), huge or
# odd values take `round` itself. tests/test_logs_fields.py.


def _ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds with at most three decimals: `round(seconds * 1000, 3)`."""
    if seconds is None:
        return None
    ms = seconds * 1000
    # Float operands where the value is the same: a float by a float is the interpreter's
    # specialised operation, a float by an int the generic one (the int converted each time).
    scaled = ms * 1000.0
    if 0.0 < scaled < 1099511627776.0:  # 2.0**40, a literal (no global); False for NaN
        frac = scaled % 1.0
        if frac < 0.4998:  # the nearest integer is the floor (0.0 below 0.4998: as round)
            return (scaled - frac) / 1000.0
        if frac > 0.5002:
            return (scaled - frac + 1.0) / 1000.0
    return round(ms, 3)


def waste_fields(rec: RequestRecord) -> dict[str, dict[str, Any]]:
    """Attempts whose output never reached the client (proxy/bills.py), by reason: the access
    line's `waste` member (both encodings of the line, `access_fields` and proxy/access_line.py)."""
    return {
        reason: {
            "attempts": w.attempts,
            "prompt_tokens": w.prompt_tokens,
            "completion_tokens": w.completion_tokens,
            "usd": w.usd,
            "tokens_saved": w.tokens_saved,
            "saved_usd": w.saved_usd,
        }
        for reason, w in rec.waste.items()
    }


def access_fields(rec: RequestRecord) -> dict[str, Any]:
    """The access-log line of one request: what happened and who asked (the client's name,
    address and user agent, never its key), never headers or bodies."""
    started, ended, first = rec.started_at, rec.ended_at, rec.first_token_at
    duration = overhead = None
    if ended is not None:
        duration = ended - started
        overhead = duration - rec.upstream_wait_s - rec.client_wait_s - rec.backoff_wait_s
        if not overhead > 0.0:  # `max(0.0, overhead)` without its call (NaN, -0.0: 0.0)
            overhead = 0.0
    fields: dict[str, Any] = {
        "request_id": rec.request_id,
        "method": rec.method,
        "path": rec.path,
        "client": rec.client,
        "client_address": rec.client_address,
        "user_agent": rec.user_agent,
        "route": rec.route,
        "model": rec.model,
        "endpoint": rec.endpoint,
        "stream": rec.stream,
        "status": rec.status,
        "upstream_status": rec.upstream_status,
        # `_value_`, not `.value`: the same strings without enum's property (~0.3 us each).
        "outcome": rec.outcome._value_ if rec.outcome else None,
        # `_ms` of the record's `duration_s`, `ttft_s` and `overhead_s`, worked out here from
        # its fields (overhead_s recomputed duration_s): tests/test_logs_fields.py.
        "duration_ms": _ms(duration),
        "ttft_ms": None if first is None else _ms(first - started),
        "overhead_ms": _ms(overhead),
        "bytes_in": rec.bytes_from_client,
        "bytes_out": rec.bytes_to_client,
        "upstream_attempts": rec.upstream_attempts,
    }
    if rec.trace is not None:
        fields["trace_id"] = f"{rec.trace.trace_id:032x}"
    if rec.timeout_kind is not None:
        fields["timeout_phase"] = rec.timeout_kind.value
        fields["timeout_key"] = rec.timeout_kind.config_key
    if rec.client_gone_at is not None and rec.upstream_closed_at is not None:
        fields["cancel_propagation_ms"] = _ms(rec.cancel_propagation_s)
    if rec.error_message is not None:
        fields["error"] = rec.error_message
    if rec.sdk_retry_count:
        fields["sdk_retry_count"] = rec.sdk_retry_count
    if rec.upstream is not None:
        fields["upstream"] = rec.upstream
    attempts = rec.attempts
    if len(attempts) > 1 or (attempts and attempts[0].result is not RESULT_OK):
        # The attempt chain, e.g. "openai/gpt-4o:server_error[503] > azure/gpt-4o:ok[200]".
        fields["attempts"] = " > ".join(a.describe() for a in rec.attempts)
        if rec.attempt_waste_tokens:
            fields["attempt_waste_tokens"] = rec.attempt_waste_tokens
    u = rec.usage
    fields["tokens"] = {
        "prompt": u.prompt_tokens,
        "completion": u.completion_tokens,
        "cached": u.cached_tokens,
        "reasoning": u.reasoning_tokens,
        "estimated": u.prompt_estimated or u.completion_estimated,
        # how each count was obtained: reported, tokenized or estimated (`Usage.prompt_source`
        # and `completion_source`, without their properties)
        "prompt_source": _TOKENIZED
        if u.prompt_tokenized
        else (_ESTIMATED if u.prompt_estimated else _REPORTED),
        "completion_source": _ESTIMATED if u.completion_estimated else _REPORTED,
    }
    if rec.savings is not None:
        fields["tokens"]["saved"] = rec.savings.tokens_saved
        fields["tokens"]["saved_upper"] = rec.savings.tokens_saved_upper
        fields["tokens"]["wasted"] = rec.savings.tokens_wasted
        fields["billing"] = rec.savings.billing
    if rec.tokenizer is not None and u.prompt_tokenized:
        fields["tokens"]["tokenizer"] = rec.tokenizer
    if rec.cost is not None and rec.cost.used_usd is not None:  # `priced`, without its property
        fields["cost_usd"] = {
            "used": rec.cost.used_usd,
            "saved": rec.cost.saved_usd,
            "wasted": rec.cost.wasted_usd,
        }
    if rec.waste:
        fields["waste"] = waste_fields(rec)
    if rec.background is not None:
        fields["background"] = rec.background.value
    if rec.background_response_id is not None:
        fields["background_response_id"] = rec.background_response_id
    if rec.engine_request_id is not None:
        fields["engine_request_id"] = rec.engine_request_id
    if rec.engine_abort is not None:
        fields["engine_abort"] = rec.engine_abort.value
        if rec.engine_abort_s is not None:
            fields["engine_abort_ms"] = _ms(rec.engine_abort_s)
    return fields
