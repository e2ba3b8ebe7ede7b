"""The Responses API background cancel: one case of the engine abort (`proxy.engines.aborts`).

A Responses API request with `background: true` is queued by the provider and runs to the end
even if its stream's socket closes: closing the connection stops nothing. So when the client
of such a stream leaves (or its deadline fires), and the route says `on_disconnect_background:
cancel`, hangup calls `POST {base_url}/responses/{id}/cancel` with the request's own
credentials: bounded in time, retried once on a transport error, result recorded. Unlike an
engine abort, a 404 here names the response (unknown or expired), not a missing endpoint, so it
is a `failed` cancel and never turns the call off.
"""

from __future__ import annotations

import asyncio
import json
import logging

from multidict import CIMultiDict
from yarl import URL

from proxy.outcome import BackgroundCancel
from proxy.target import checked, safe_upstream_id
from proxy.upstream import Upstreams
from proxy.upstream_errors import OPEN_ERRORS

log = logging.getLogger("hangup.background")

CANCEL_CALL_S = 5.0  # the whole cancel (both tries) may take this long
_FINISHED = frozenset({"completed", "failed", "incomplete"})
# Request headers that describe the original body, not the cancel call.
_BODY_HEADERS = ("content-type", "content-length", "content-encoding", "accept")


def cancel_url(base_url: str, response_id: str) -> URL:
    return URL(base_url).joinpath("responses", response_id, "cancel")


def classify(status: int, body: bytes) -> BackgroundCancel:
    """What a cancel call's answer means. A 2xx carries the response object: its `status`
    says whether we stopped it or it had already finished."""
    if not 200 <= status < 300:
        return BackgroundCancel.FAILED
    try:
        obj = json.loads(body)
    except ValueError:
        return BackgroundCancel.CANCELLED
    state = obj.get("status") if isinstance(obj, dict) else None
    if state in _FINISHED:
        return BackgroundCancel.ALREADY_FINISHED
    return BackgroundCancel.CANCELLED


async def cancel_background(
    upstreams: Upstreams, base_url: str, response_id: str, headers: CIMultiDict[str]
) -> BackgroundCancel:
    call_headers = CIMultiDict(headers)
    for name in _BODY_HEADERS:
        call_headers.popall(name, None)
    if not safe_upstream_id(response_id):
        # The id came from the upstream's stream: it must not steer the call (`../../admin`).
        log.warning("not cancelling background response: its id is not a plain id")
        return BackgroundCancel.FAILED
    url = checked(cancel_url(base_url, response_id), base_url)
    try:
        async with asyncio.timeout(CANCEL_CALL_S):
            for attempt in (1, 2):
                try:
                    status, body = await upstreams.post_empty(url, call_headers)
                    return classify(status, body)
                except OPEN_ERRORS as exc:
                    log.warning(
                        "cancel of background response %s failed (try %d): %s",
                        response_id,
                        attempt,
                        type(exc).__name__,
                    )
    except TimeoutError:
        log.warning(
            "cancel of background response %s timed out after %gs", response_id, CANCEL_CALL_S
        )
    return BackgroundCancel.FAILED
