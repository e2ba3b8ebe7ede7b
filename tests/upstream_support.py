"""The production upstream seam (`Upstreams`: its session, connector and protocol) driven
directly, without the proxy around it, against a scripted server on 127.0.0.1
(tests/hostile_support.py `ScriptedUpstream`): the seam's own tests share these."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from multidict import CIMultiDict
from yarl import URL

from proxy.upstream import OpenAttempt, Upstreams


@contextlib.asynccontextmanager
async def upstream_seam() -> AsyncIterator[Upstreams]:
    """A started seam, closed after the block (the conftest `upstreams` fixture is one)."""
    seam = Upstreams()
    await seam.start()
    try:
        yield seam
    finally:
        await seam.close()


def _nothing() -> None:
    pass


def open_attempt(
    upstreams: Upstreams,
    url: str,
    *,
    method: str = "GET",
    headers: CIMultiDict[str] | None = None,
    body: bytes = b"",
    on_headers_sent: Callable[[], None] = _nothing,
    stream: bool = True,
) -> OpenAttempt:
    """An attempt to the upstream "primary" at `url`, not yet started (`stream`: the client
    asked for a stream)."""
    return upstreams.attempt(
        "primary",
        method,
        URL(url),
        headers=CIMultiDict() if headers is None else headers,
        body=body,
        on_headers_sent=on_headers_sent,
        stream=stream,
    )
