"""The Responses API's background endpoints of the simulated provider: a `background: true`
request answered by a job (`proxy.sim.background`), ``GET /v1/responses/{id}`` (and its
resumable stream) and ``POST /v1/responses/{id}/cancel``."""

from __future__ import annotations

from aiohttp import web

from proxy.sim.background import JobStore
from proxy.sim.behaviour import Behaviour
from proxy.sim.errors import ApiError
from proxy.sim.records import End, RequestRecord
from proxy.sim.replies import json_reply, socket_sink, sse_reply
from proxy.sim.responses import ResponsesStream
from proxy.sim.tokens import Plan


async def start_background(
    jobs: JobStore,
    request: web.BaseRequest,
    rec: RequestRecord,
    fmt: ResponsesStream,
    plan: Plan,
    b: Behaviour,
    stream: bool,
) -> tuple[web.StreamResponse, End]:
    job = jobs.start(fmt, plan, b, rec.request_id)
    if not stream:
        return await json_reply(request, rec, 200, job.response_object())
    resp = await sse_reply(request, rec)
    # The client leaving cancels this relay only; the job runs on in its own task.
    await jobs.relay(job, socket_sink(resp, rec))
    await resp.write_eof()
    return resp, "completed"


async def retrieve_response(
    jobs: JobStore, request: web.BaseRequest, rec: RequestRecord, response_id: str
) -> tuple[web.StreamResponse, End]:
    job = jobs.get(response_id)
    if job is None:
        raise ApiError(404, f"Response with id '{response_id}' not found.")
    rec.response_id = response_id
    if request.query.get("stream") != "true":
        return await json_reply(request, rec, 200, job.response_object())
    try:
        after = int(request.query.get("starting_after", "-1"))
    except ValueError:
        raise ApiError(400, "starting_after must be an integer", param="starting_after") from None
    resp = await sse_reply(request, rec)
    await jobs.relay(job, socket_sink(resp, rec), starting_after=after)
    await resp.write_eof()
    return resp, "completed"


async def cancel_response(
    jobs: JobStore, request: web.BaseRequest, rec: RequestRecord, response_id: str
) -> tuple[web.StreamResponse, End]:
    rec.response_id = response_id
    _, job = await jobs.cancel(response_id)
    if job is None:
        raise ApiError(404, f"Response with id '{response_id}' not found.")
    return await json_reply(request, rec, 200, job.response_object())
