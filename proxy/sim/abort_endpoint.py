"""The engine abort endpoint of the simulated provider: SGLang's ``/abort_request`` or vLLM's
``/abort_requests``, with the faults it can be told to show (the semantics and the state are
`proxy.sim.aborts`)."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from proxy.sim.aborts import AbortCall, EngineAborts
from proxy.sim.errors import ApiError
from proxy.sim.records import End, RequestRecord, bearer_token, key_fingerprint
from proxy.sim.replies import json_reply, reset_reply


async def abort_endpoint(
    aborts: EngineAborts, request: web.BaseRequest, rec: RequestRecord
) -> tuple[web.StreamResponse, End]:
    """SGLang's `/abort_request` or vLLM's `/abort_requests` (see proxy.sim.aborts)."""
    auth = request.headers.get("authorization")
    fingerprint = key_fingerprint(bearer_token(auth)) if auth else None
    fault = aborts.next_fault()
    call = AbortCall(time.monotonic(), request.path, [], False, fingerprint, fault)
    aborts.arrived(call)
    raw = await request.read()
    if fault == "reset":
        return reset_reply(request, rec)
    if fault == "hang":
        await asyncio.get_running_loop().create_future()  # until the caller gives up
    if fault is not None:
        raise ApiError(int(fault), f"simulated abort endpoint fault {fault}")
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        raise ApiError(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    rec.body = body
    if aborts.engine == "sglang":
        rid = body.get("rid")
        rid = rid if isinstance(rid, str) else ""
        call.abort_all = body.get("abort_all") is True
        call.ids = [rid]
        # SGLang matches by prefix; an empty rid with abort_all false stops nothing.
        aborts.abort(call, lambda eid: call.abort_all or (rid and eid.startswith(rid)))
        return await json_reply(request, rec, 200, b"")
    ids = body.get("request_ids")
    call.ids = [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []
    aborts.abort(call, lambda eid: eid in call.ids)
    return await json_reply(request, rec, 200, {"cancelled_request_ids": call.stopped})
