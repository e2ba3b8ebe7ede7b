"""A request's access line encoded from its record, without the fields' dict.

`access_fields` builds a dict of ~25 members (and one of ~8 for the tokens) that the JSON
writer then encodes key by key: ~2.5 us a request. When the line goes to the one JSON writer
with nothing in between (`logs.log_access`' fast case, no secret scrubber) and no free-text
field holds a word `redact` looks for, the same members are put in a msgspec Struct instead
(its keys encoded once, at import) and encoded from it: the same line for ~1 us less. The
members a line may lack are `UNSET`, which msgspec leaves out, so that the order and presence
of every member is `access_fields`'. Anything else (another formatter, a handler or filter
added, a scrubber, text to redact) gets `log_access(access_fields(record))` as before.
tests/test_access_line.py checks both ways write the same line for any record.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Final

import msgspec
from msgspec import UNSET

from proxy.attempts import RESULT_OK
from proxy.logs import (
    _ESTIMATED,
    _MILLIS,
    _REPORTED,
    _TOKENIZED,
    ACCESS_LOGGER,
    JsonFormatter,
    _encoder,
    _ms,
    _second,
    _sole_writer,
    access_fields,
    log_access,
    waste_fields,
)
from proxy.outcome import RequestRecord
from proxy.secrets import Secrets

__all__ = ["log_record", "record_json_line"]

_encode_into: Final = _encoder.encode_into
# Bytes reserved for a line before encoding it: a usual line is ~600-1,000 bytes, and a
# buffer is only reallocated once the line outgrows it.
_LINE_BUFFER: Final = 1536


class _Tokens(msgspec.Struct, gc=False):
    """`access_fields`' "tokens" member, in its order."""

    prompt: Any
    completion: Any
    cached: Any
    reasoning: Any
    estimated: Any
    prompt_source: Any
    completion_source: Any
    saved: Any = UNSET
    saved_upper: Any = UNSET
    wasted: Any = UNSET
    tokenizer: Any = UNSET


class _Line(msgspec.Struct, gc=False):
    """The JSON writer's head members (as `logs._json_line` writes them: `msg` "request" has
    nothing to redact), then `access_fields`' members in its order; those it adds only
    sometimes are `UNSET`. The head in the Struct: the line is one encode and one decode, not
    the encoded fields sliced, decoded and joined to the head (three copies of the line)."""

    ts: Any
    level: Any
    logger: Any
    msg: Any
    request_id: Any
    method: Any
    path: Any
    client: Any
    client_address: Any
    user_agent: Any
    route: Any
    model: Any
    endpoint: Any
    stream: Any
    status: Any
    upstream_status: Any
    outcome: Any
    duration_ms: Any
    ttft_ms: Any
    overhead_ms: Any
    bytes_in: Any
    bytes_out: Any
    upstream_attempts: Any
    trace_id: Any = UNSET
    timeout_phase: Any = UNSET
    timeout_key: Any = UNSET
    cancel_propagation_ms: Any = UNSET
    error: Any = UNSET
    sdk_retry_count: Any = UNSET
    upstream: Any = UNSET
    attempts: Any = UNSET
    attempt_waste_tokens: Any = UNSET
    tokens: Any = UNSET  # always set
    billing: Any = UNSET
    cost_usd: Any = UNSET
    waste: Any = UNSET
    background: Any = UNSET
    background_response_id: Any = UNSET
    engine_request_id: Any = UNSET
    engine_abort: Any = UNSET
    engine_abort_ms: Any = UNSET


def _line(rec: RequestRecord, ts: str, level: str) -> _Line:
    """`access_fields(rec)` as a `_Line` (the same values, step by step), after the head."""
    started, ended, first = rec.started_at, rec.ended_at, rec.first_token_at
    duration_ms = overhead_ms = None
    if ended is not None:
        duration = ended - started
        overhead = duration - rec.upstream_wait_s - rec.client_wait_s - rec.backoff_wait_s
        # `_ms(duration)` and `_ms(overhead)` with `_ms`' usual case inline (two calls fewer
        # a line; `x * 1000 * 1000.0` is its `ms * 1000.0`), any other case through `_ms`.
        scaled = duration * 1000 * 1000.0
        if 0.0 < scaled < 1099511627776.0:
            frac = scaled % 1.0
            if frac < 0.4998:
                duration_ms = (scaled - frac) / 1000.0
            elif frac > 0.5002:
                duration_ms = (scaled - frac + 1.0) / 1000.0
        if duration_ms is None:
            duration_ms = _ms(duration)
        if not overhead > 0.0:  # `max(0.0, overhead)` as access_fields (NaN too): `_ms` 0.0
            overhead_ms = 0.0
        elif 0.0 < (scaled := overhead * 1000 * 1000.0) < 1099511627776.0:
            frac = scaled % 1.0
            if frac < 0.4998:
                overhead_ms = (scaled - frac) / 1000.0
            elif frac > 0.5002:
                overhead_ms = (scaled - frac + 1.0) / 1000.0
        if overhead_ms is None:
            overhead_ms = _ms(overhead)
    line = _Line(
        ts,
        level,
        ACCESS_LOGGER,
        "request",
        rec.request_id,
        rec.method,
        rec.path,
        rec.client,
        rec.client_address,
        rec.user_agent,
        rec.route,
        rec.model,
        rec.endpoint,
        rec.stream,
        rec.status,
        rec.upstream_status,
        rec.outcome._value_ if rec.outcome else None,
        duration_ms,
        None if first is None else _ms(first - started),
        overhead_ms,
        rec.bytes_from_client,
        rec.bytes_to_client,
        rec.upstream_attempts,
    )
    if rec.trace is not None:
        line.trace_id = f"{rec.trace.trace_id:032x}"
    if rec.timeout_kind is not None:
        line.timeout_phase = rec.timeout_kind.value
        line.timeout_key = rec.timeout_kind.config_key
    if rec.client_gone_at is not None and rec.upstream_closed_at is not None:
        line.cancel_propagation_ms = _ms(rec.cancel_propagation_s)
    if rec.error_message is not None:
        line.error = rec.error_message
    if rec.sdk_retry_count:
        line.sdk_retry_count = rec.sdk_retry_count
    if rec.upstream is not None:
        line.upstream = rec.upstream
    attempts = rec.attempts
    if len(attempts) > 1 or (attempts and attempts[0].result is not RESULT_OK):
        line.attempts = " > ".join(a.describe() for a in attempts)
        if rec.attempt_waste_tokens:
            line.attempt_waste_tokens = rec.attempt_waste_tokens
    u = rec.usage
    tokens = line.tokens = _Tokens(
        u.prompt_tokens,
        u.completion_tokens,
        u.cached_tokens,
        u.reasoning_tokens,
        u.prompt_estimated or u.completion_estimated,
        _TOKENIZED if u.prompt_tokenized else (_ESTIMATED if u.prompt_estimated else _REPORTED),
        _ESTIMATED if u.completion_estimated else _REPORTED,
    )
    savings = rec.savings
    if savings is not None:
        tokens.saved = savings.tokens_saved
        tokens.saved_upper = savings.tokens_saved_upper
        tokens.wasted = savings.tokens_wasted
        line.billing = savings.billing
    if rec.tokenizer is not None and u.prompt_tokenized:
        tokens.tokenizer = rec.tokenizer
    cost = rec.cost
    if cost is not None and cost.used_usd is not None:
        line.cost_usd = {"used": cost.used_usd, "saved": cost.saved_usd, "wasted": cost.wasted_usd}
    if rec.waste:
        line.waste = waste_fields(rec)
    if rec.background is not None:
        line.background = rec.background.value
    if rec.background_response_id is not None:
        line.background_response_id = rec.background_response_id
    if rec.engine_request_id is not None:
        line.engine_request_id = rec.engine_request_id
    if rec.engine_abort is not None:
        line.engine_abort = rec.engine_abort.value
        if rec.engine_abort_s is not None:
            line.engine_abort_ms = _ms(rec.engine_abort_s)
    return line


def record_json_line(ts: str, error: bool, rec: RequestRecord) -> str | None:
    """`logs._access_json_line(ts, error, access_fields(rec))`, from the record; None when a
    free-text member holds a word `redact` looks for (then the dict's way must write it)."""
    line = _record_json_bytes(ts, error, rec)
    return None if line is None else line.decode()


def _record_json_bytes(ts: str, error: bool, rec: RequestRecord) -> bytearray | None:
    """`record_json_line`'s line encoded (UTF-8), as the writer takes it (proxy/logwriter.py:
    to the process's stderr as it is, not decoded here to be encoded again there)."""
    # `_access_json_line`'s one look for redact's words over the free-text members (`error`,
    # `path`, `request_id`, `model`, `user_agent`; an absent `error` reads "None" there too).
    # A member that is None is left out (`or ""`): "None" holds none of the words, and an
    # f-string formats a str without a call, None through `format` (~0.9k instructions).
    low = (
        f"{rec.error_message or ''}\0{rec.path}\0{rec.request_id}\0{rec.model or ''}"
        f"\0{rec.user_agent or ''}"
    ).casefold()
    if "bearer" in low or "sk-" in low or "key" in low:
        return None
    # Encoded into a buffer as large as a usual line: `encode` starts small and grows its
    # output several times over (~2k instructions of reallocating and copying a line).
    # A fresh buffer each time: it is the line the writer thread takes.
    buffer = bytearray(_LINE_BUFFER)
    _encode_into(_line(rec, ts, "error" if error else "info"), buffer)
    return buffer


_ERROR: Final = logging.ERROR
_INFO: Final = logging.INFO
_time: Final = time.time


@functools.lru_cache(maxsize=8)
def _found_in_json(secrets: Secrets) -> bool:
    """Each configured secret, where it is in a string, is in that string's JSON as it is:
    none holds a character JSON escapes (a quote, a backslash, a control character)."""
    return not any(c in '"\\' or c < " " for value in secrets.values for c in value)


def log_record(rec: RequestRecord, *, error: bool = False) -> None:
    """`log_access(access_fields(rec), error=error)`, the line encoded from the record when
    it goes straight to the JSON writer.

    A secret scrubber on the way (the app installs one for its configured keys) leaves the
    fields as they are when no string in them holds a secret; if one does, its JSON holds it
    too (`_found_in_json`), so a line without any is the scrubbed line: the encoded line's
    bytes hold a secret's UTF-8 bytes exactly where its text holds the secret."""
    sole = _sole_writer(_ERROR if error else _INFO)
    if sole is not None and type(sole[0].target.formatter) is JsonFormatter:
        now = _time()
        ts = _second(int(now)) + _MILLIS[int(now * 1000.0) % 1000]
        line = _record_json_bytes(ts, error, rec)
        if line is not None:
            for scrubber in sole[1]:
                secrets = scrubber.secrets
                # (`data`'s regex takes any bytes-like value: the buffer without a copy)
                if secrets and (
                    not _found_in_json(secrets) or secrets.data(line) != line  # type: ignore[arg-type]
                ):
                    break
            else:
                sole[0].emit_line(line)
                return
    log_access(access_fields(rec), error=error)
