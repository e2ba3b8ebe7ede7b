"""Configured secrets, kept out of everything that leaves the process, by exact value.

Pattern-based redaction misses keys that do not look like `sk-...`; an upstream that echoes
the injected key (in a 401 body, a header, an in-band stream error) would hand it to the
client. So every configured secret value - upstream `api_key`s and `headers` values,
`auth.keys`, `metrics.bearer_token` - is replaced wherever it appears, byte for byte, by as
many `*`: in response headers, in response bodies (streamed ones too, across chunk
boundaries), and in log lines. The mask has the secret's length, so a Content-Length stays
true. Values shorter than `MIN_SECRET_LEN` are not treated as secrets (a header value such as
`v2` would otherwise mask every "v2" in every answer).

A compressed response body cannot be searched; streams are requested uncompressed
(see proxy/upstream_checks.py), other compressed answers are relayed as they are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiohttp import web

from proxy.config import HangupConfig

MIN_SECRET_LEN = 8


def configured_secrets(config: HangupConfig) -> list[str]:
    values: list[str] = []
    for upstream in config.upstreams.values():
        if upstream.api_key is not None:
            values.append(upstream.api_key.get_secret_value())
        values.extend(upstream.headers.values())
    values.extend(k.key.get_secret_value() for k in config.auth.keys)
    if config.metrics.bearer_token is not None:
        values.append(config.metrics.bearer_token.get_secret_value())
    return sorted({v for v in values if len(v) >= MIN_SECRET_LEN}, key=len, reverse=True)


class Secrets:
    """Exact-value scrubbing of a fixed set of secrets."""

    def __init__(self, values: Iterable[str]) -> None:
        self.values = tuple(values)
        self._raw = tuple(v.encode() for v in self.values)
        self._text = (
            re.compile("|".join(re.escape(v) for v in self.values)) if self.values else None
        )
        self._bytes = re.compile(b"|".join(re.escape(v) for v in self._raw)) if self._raw else None
        self.longest = max((len(v) for v in self._raw), default=0)

    def __bool__(self) -> bool:
        return bool(self.values)

    def text(self, value: str) -> str:
        if self._text is None:
            return value
        return self._text.sub(lambda m: "*" * len(m.group()), value)

    def data(self, value: bytes) -> bytes:
        if self._bytes is None:
            return value
        return self._bytes.sub(lambda m: b"*" * len(m.group()), value)

    def partial_suffix(self, data: bytes) -> int:
        """How many bytes at the end of `data` could be the start of a secret."""
        for size in range(min(self.longest - 1, len(data)), 0, -1):
            tail = data[-size:]
            if any(raw.startswith(tail) for raw in self._raw):
                return size
        return 0

    def stream(self) -> StreamScrubber:
        return StreamScrubber(self)


class StreamScrubber:
    """Scrubs a body that arrives in chunks: a secret split across two chunks is caught by
    holding back only a chunk's end that could begin one (usually nothing: SSE events end in
    a blank line, which begins no key)."""

    __slots__ = ("_held", "_secrets", "active")

    def __init__(self, secrets: Secrets) -> None:
        self._secrets = secrets
        # Once, not per chunk: feed runs on every stream read, and the relay's per-read path
        # skips the call when there is nothing to scrub (read-only outside this class).
        self.active = bool(secrets)
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self.active:
            return chunk
        secrets = self._secrets
        data = secrets.data(self._held + chunk)
        keep = secrets.partial_suffix(data)
        if keep:
            self._held, data = data[-keep:], data[:-keep]
        else:
            self._held = b""
        return data

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


def scrub_headers(secrets: Secrets, headers: Any) -> None:
    """Mask secrets in a mutable multidict of response headers, in place: values, and names
    (an upstream can echo the key as a field name; `*` is a valid name character)."""
    if not secrets:
        return
    items = list(headers.items())
    cleaned = [(secrets.text(name), secrets.text(value)) for name, value in items]
    if cleaned != items:
        # Rebuilt in order: popping one name would also drop its other, clean, lines (a
        # second Set-Cookie).
        headers.clear()
        for name, value in cleaned:
            headers.add(name, value)


class LogScrubber(logging.Filter):
    """On every handler: a log line never carries a configured secret, whatever logged it."""

    def __init__(self, secrets: Secrets) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self.secrets
        message = record.getMessage()
        clean = secrets.text(message)
        if clean != message:
            record.msg, record.args = clean, None
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = _scrub_value(secrets, fields)
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if secrets.text(text) != text:
                record.msg = f"{record.getMessage()}\n{secrets.text(text)}"
                record.args, record.exc_info, record.exc_text = None, None, None
        return True

    def scrub_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        """What `filter` does to a record's fields, for a line built without a record."""
        scrubbed: dict[str, Any] = _scrub_value(self.secrets, fields)
        return scrubbed


def _scrub_value(secrets: Secrets, value: Any) -> Any:
    if isinstance(value, str):
        return secrets.text(value)
    if isinstance(value, dict):
        return {k: _scrub_value(secrets, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_value(secrets, v) for v in value]
    return value


def install_log_scrubber(secrets: Secrets) -> LogScrubber | None:
    """Add the scrubber to every handler of the root logger (records propagate there); the
    caller removes it with `remove_log_scrubber` when its app stops."""
    if not secrets:
        return None
    scrubber = LogScrubber(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(scrubber)
    return scrubber


def remove_log_scrubber(scrubber: LogScrubber | None) -> None:
    if scrubber is None:
        return
    for handler in logging.getLogger().handlers:
        handler.removeFilter(scrubber)


SECRETS = web.AppKey("hangup_secrets", Secrets)


def add_to_app(app: web.Application, config: HangupConfig) -> None:
    """Scrub log lines for this app's lifetime (headers: `scrub_response_headers`; bodies: the
    relay)."""
    app[SECRETS] = Secrets(configured_secrets(config))
    app.cleanup_ctx.append(_scrub_logs)


def scrub_response_headers(secrets: Secrets, response: web.StreamResponse) -> None:
    """Before a response goes out (proxy.app): no configured secret in its headers."""
    scrub_headers(secrets, response.headers)


async def _scrub_logs(app: web.Application) -> AsyncIterator[None]:
    scrubber = install_log_scrubber(app[SECRETS])
    try:
        yield
    finally:
        remove_log_scrubber(scrubber)
