"""Reading a request body, slowly when the behaviour is ``slow-body``.

The behaviour comes from the ``x-sim-behaviour`` header, or failing that from the model name as
soon as ``"model": "..."`` shows in the bytes read so far: a body is only parsed once complete,
and slow-body must act while it is still arriving. From then on the body is consumed at the
given bytes/s on an absolute schedule, so the sender meets TCP back-pressure (the case of a
proxy still uploading a prompt when its client leaves), and a reset by the sender is noticed at
once (see `resetwatch`).
"""

from __future__ import annotations

import asyncio
import re
import time

from aiohttp import web

from proxy.sim.behaviour import BehaviourError, Name, parse_behaviour
from proxy.sim.errors import ApiError
from proxy.sim.records import RequestRecord
from proxy.sim.resetwatch import watch_reset

_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]*)"')
MAX_BODY_BYTES = 64 * 1024 * 1024


async def read_body(request: web.BaseRequest, rec: RequestRecord, spec: str | None) -> bytes:
    """Read the body; throttle it for slow-body, recognised from the x-sim-behaviour
    header or, failing that, from the model name as soon as it shows in the bytes read."""
    parts: list[bytes] = []
    rate = _body_rate(spec) if spec is not None else None
    start = time.monotonic()
    if spec is None:
        tail = b""
        while chunk := await request.content.readany():
            _take(rec, parts, chunk)
            match = _MODEL_RE.search(tail + chunk)
            if match is not None:
                rate = _body_rate(match.group(1).decode("utf-8", "replace"))
                break
            tail = (tail + chunk)[-256:]
    if rate is None:
        while chunk := await request.content.readany():
            _take(rec, parts, chunk)
        return b"".join(parts)
    piece = max(1, min(65536, int(rate / 20)))
    # Bytes read before the model name showed count too: the whole body is consumed at
    # `rate` from its start, even when it arrived in one piece.
    done = rec.body_bytes
    with watch_reset(request.transport, lambda: _abort_transport(request)):
        while True:
            delay = start + done / rate - time.monotonic()  # absolute schedule: no drift
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = await request.content.read(piece)
            if not chunk:
                return b"".join(parts)
            done += len(chunk)
            _take(rec, parts, chunk)


def _take(rec: RequestRecord, parts: list[bytes], chunk: bytes) -> None:
    parts.append(chunk)
    rec.body_bytes += len(chunk)
    if rec.body_bytes > MAX_BODY_BYTES:
        raise ApiError(413, f"Request body over {MAX_BODY_BYTES} bytes.")


def _abort_transport(request: web.BaseRequest) -> None:
    # The peer reset the connection; aborting our end makes aiohttp see it now (and cancel
    # the handler) instead of after the throttled read reaches the end of the kernel buffer.
    transport = request.transport
    if transport is not None:
        transport.abort()


def _body_rate(spec: str) -> float | None:
    try:
        b = parse_behaviour(spec)
    except BehaviourError:
        return None  # reported properly once the whole body is parsed
    return b.body_rate if b.name is Name.SLOW_BODY else None
