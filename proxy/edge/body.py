"""Reading a request body at the edge: refuse unaccepted encodings before reading a byte,
send `100 Continue` only once the request has been admitted, and inflate an accepted encoding
off the event loop, incrementally, within bounds.

aiohttp would inflate a `Content-Encoding` body itself, in its parser, on the event loop, and
keep inflating what arrives after we answered (3 MiB of deflate cost 10 s of CPU). The runner
turns that off (`auto_decompress=False`, see proxy/edge/connections.py), so bodies reach us as
sent on the wire, and this module decides what to do with them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Generator, Iterable
from typing import TypeVar

from aiohttp import streams as web_streams
from aiohttp import web
from aiohttp.http import HttpVersion11

from proxy.body_scan import BodyScan
from proxy.config import LimitsConfig
from proxy.edge.inflate import InflateError, InflateLimit, Inflater, parse_encoding
from proxy.errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedEncoding
from proxy.request_body import RequestBody

# Wire bytes handed to the inflating thread at a time: big enough that the hand-off
# (~50 us) is noise, small enough that a bomb is stopped within one step of its bound.
_STEP_BYTES = 64 * 1024
# Inflated bytes scanned in one step of the loop.
_SCAN_SLICE = 256 * 1024
# Bodies announced smaller than this are read whole and checked in one step (under ~1 ms);
# larger or unannounced ones are scanned chunk by chunk as they arrive (`read_scanned`).
SCAN_FROM_BYTES = 1024 * 1024


# The app-owned pool that inflates request bodies: its own threads, so a burst of compressed
# bodies cannot starve the default executor (aiohttp resolves upstream host names there).
INFLATE_POOL = web.AppKey("hangup_inflate_pool", concurrent.futures.ThreadPoolExecutor)
INFLATE_THREADS = 2


async def inflate_pool(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the pool lives as long as the app."""
    pool = concurrent.futures.ThreadPoolExecutor(INFLATE_THREADS, "hangup-inflate")
    app[INFLATE_POOL] = pool
    yield
    pool.shutdown(wait=False, cancel_futures=True)


class BodyTimeout(Exception):
    """Set on a request's payload by the connection guard when the body arrives too slowly;
    raised from the handler's read. `key` names the config key that fired."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def request_encoding(request: web.Request, accepted: Iterable[str]) -> str | None:
    """The body's Content-Encoding (None for identity); 415 unless `accepted` has it."""
    # Two Content-Encoding lines mean their values joined (RFC 9110 5.3): reading only the
    # first let `identity` + `deflate` through as identity.
    header = ", ".join(request.headers.getall("content-encoding", ())) or None
    encoding = parse_encoding(header)
    if encoding is None:
        return None
    allowed = sorted(set(accepted))
    if encoding not in allowed:
        hint = f"accepted here: {', '.join(allowed)}" if allowed else "send it uncompressed"
        raise UnsupportedEncoding(
            f"request bodies with Content-Encoding {encoding!r} are not accepted ({hint}; "
            "see request_encodings in the route's config)"
        )
    return encoding


async def send_continue(request: web.Request) -> None:
    """`100 Continue`, if the client waits for it (RFC 9110 10.1.1), now that it is admitted."""
    expect = request.headers.get("expect", "")
    if request.version == HttpVersion11 and expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started


_T = TypeVar("_T")


async def in_steps(steps: Generator[None, None, _T]) -> _T:
    """Run a sans-I/O generator one step per loop iteration (`request_fields.
    read_fields_in_steps`: a large body's parse, a bounded piece at a time)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            value: _T = done.value
            return value
        await asyncio.sleep(0)


def at_once(steps: Generator[None, None, _T]) -> _T:
    """Run a sans-I/O generator to its end in this step: for an input small enough that all
    its steps together are short (no coroutine and no await per request)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            value: _T = done.value
            return value


def too_large(limit_mb: float) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body exceeds {limit_mb:g} MiB (limits.max_request_body_mb)")


def _too_slow(exc: BodyTimeout) -> RequestTimeout:
    return RequestTimeout(f"the request body arrived too slowly (connections.{exc.key})")


async def read_body(
    request: web.Request, limits: LimitsConfig, encoding: str | None, length: int | None
) -> tuple[RequestBody, int, BodyScan | None]:
    """The request body, decoded, its size on the wire, and for a large body its scan
    (`proxy/body_scan.py`: what request_fields would otherwise learn in one long step).
    `length`: `request.content_length`, which the caller has (a property that parses the
    header at each access)."""
    if encoding is None:
        if length is not None and length < SCAN_FROM_BYTES:
            small = await read_plain(request, limits.max_request_body_mb)
            return small, len(small), None
        large, scan = await read_scanned(request, limits.max_request_body_mb)
        return large, len(large), scan
    inflated, wire, scan = await read_inflated(
        request,
        encoding,
        limit_mb=limits.max_request_body_mb,
        max_ratio=limits.max_inflate_ratio,
        executor=request.app[INFLATE_POOL],
    )
    # Small bodies are checked whole, as before (under ~1 ms).
    return inflated, wire, scan if len(inflated) >= SCAN_FROM_BYTES else None


async def read_plain(request: web.Request, limit_mb: float) -> bytes:
    """A small body, read as `request.read()` reads it (to its end, 413 past the limit) but
    not kept on the request: storing it there adds an attribute to the request, which can
    turn the request's shared-key instance dict into a whole dict of its own (~830 B more
    under every held stream, in the runs where it happened)."""
    limit = int(limit_mb * 1024 * 1024)
    content = request.content
    if content.is_eof():
        return read_arrived(content, limit_mb)
    try:
        first = await content.readany()
        if not first:
            return b""
        if len(first) > limit:
            raise too_large(limit_mb)
        chunk = await content.readany()
        if not chunk:
            return first  # the usual case: the whole body in one read, not copied
        body = bytearray(first)
        while chunk:
            body += chunk
            if len(body) > limit:
                raise too_large(limit_mb)
            chunk = await content.readany()
        return bytes(body)
    except BodyTimeout as exc:
        raise _too_slow(exc) from exc


def read_arrived(content: web_streams.StreamReader, limit_mb: float) -> bytes:
    """`read_plain` of a body all of which is here already (`content.is_eof()`: a small body
    usually arrives whole, before the handler starts): taken in one call, without awaited
    reads, and without a coroutine (admission calls it when it sees such a body)."""
    try:
        whole = content.read_nowait()
    except BodyTimeout as exc:
        raise _too_slow(exc) from exc
    if len(whole) > int(limit_mb * 1024 * 1024):
        raise too_large(limit_mb)
    return whole


async def read_scanned(request: web.Request, limit_mb: float) -> tuple[bytearray, BodyScan]:
    """`read_plain`, scanning each chunk as it arrives (`BodyScan`).

    The body grows in one `bytearray` a chunk at a time: a large bytearray is resized with
    mremap (its pages are not copied) and each chunk touches only its own fresh memory, so
    no step costs more than its chunk. `b"".join` of the chunks at the end was one step of
    42-58 ms for 60 MiB (a copy into 60 MiB of fresh memory). Nothing writes to it after."""
    limit = int(limit_mb * 1024 * 1024)
    scan = BodyScan()
    body = bytearray()
    try:
        while chunk := await request.content.readany():
            if scan.size + len(chunk) > limit:
                raise too_large(limit_mb)
            scan.feed(chunk)
            body += chunk
    except BodyTimeout as exc:
        raise _too_slow(exc) from exc
    scan.finish()
    return body, scan


async def read_inflated(
    request: web.Request,
    encoding: str,
    *,
    limit_mb: float,
    max_ratio: float,
    executor: concurrent.futures.Executor,
) -> tuple[bytearray, int, BodyScan]:
    """The inflated body, its size on the wire and its scan. Inflating runs in `executor`, one
    bounded step at a time, as the body arrives; the first step past a bound answers 413 and
    the rest of the body is never read (the connection is closed after the answer). What each
    step inflates is scanned and appended on the loop (as `read_scanned` does: no step pays
    for the whole body)."""
    limit = int(limit_mb * 1024 * 1024)
    inflater = Inflater(encoding, max_size=limit, max_ratio=max_ratio)
    loop = asyncio.get_running_loop()
    out = bytearray()
    scan = BodyScan()
    pending = bytearray()
    try:
        while True:
            chunk = await request.content.read(_STEP_BYTES)
            if chunk:
                if inflater.compressed + len(pending) + len(chunk) > limit:
                    raise too_large(limit_mb)
                pending += chunk
                if len(pending) < _STEP_BYTES:
                    continue
            if pending:
                data, pending = bytes(pending), bytearray()
                inflated = await loop.run_in_executor(executor, inflater.feed, data)
                # Up to 64 KiB x max_inflate_ratio (6.4 MiB): scanned a slice a step
                # (scanning 6.4 MiB at once took 12-60 ms).
                for start in range(0, len(inflated), _SCAN_SLICE):
                    if start:
                        await asyncio.sleep(0)
                    piece = inflated[start : start + _SCAN_SLICE]
                    scan.feed(piece)
                    out += piece
            if not chunk:
                inflater.finish()
                scan.finish()
                return out, inflater.compressed, scan
    except BodyTimeout as exc:
        raise _too_slow(exc) from exc
    except InflateLimit as exc:
        if exc.what == "ratio":
            raise PayloadTooLarge(
                f"the {encoding} request body inflates more than {max_ratio:g} times its "
                "size (limits.max_inflate_ratio)"
            ) from exc
        raise PayloadTooLarge(
            f"the {encoding} request body inflates past {limit_mb:g} MiB "
            "(limits.max_request_body_mb)"
        ) from exc
    except InflateError as exc:
        raise BadRequest(f"the request body is not valid {encoding} data: {exc}") from exc
