"""The OpenAI-compatible endpoints of the simulated provider, one request from body to end.

Each request follows one path: read the body (slowly, for ``slow-body``), pick the behaviour,
plan the generation, apply the behaviours that act before headers (delay, error, reset), then
stream or answer, and end in exactly one recorded `End`:

- ``completed``: the answer (or an in-band malformed event) went out as planned;
- ``error``: an error status or in-band error event was sent (behaviour or bad request);
- ``reset``: the simulator aborted the connection (``reset`` behaviour);
- ``peer_closed``: the client went away first (the handler was cancelled, or a write failed);
- ``stopped``: the simulator was stopped while the request was in flight.

The generation endpoints are here; the Responses API's background ones (retrieve, cancel) in
`proxy.sim.background_endpoints`, the engine abort endpoint in `proxy.sim.abort_endpoint`, and
how each answer is written (JSON, SSE head, reset) in `proxy.sim.replies`.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import replace
from typing import Any, Literal

from aiohttp import web

from proxy.sim.abort_endpoint import abort_endpoint
from proxy.sim.aborts import EngineAborts
from proxy.sim.background import JobStore
from proxy.sim.background_endpoints import cancel_response, retrieve_response, start_background
from proxy.sim.behaviour import Behaviour, BehaviourError, Name, parse_behaviour
from proxy.sim.body import read_body
from proxy.sim.engine import Kind, Output, error_message, generate
from proxy.sim.errors import ApiError
from proxy.sim.formats import (
    ChatStream,
    StreamFormat,
    embeddings_body,
    model_object,
    models_body,
)
from proxy.sim.recorder import Recorder
from proxy.sim.records import End, RequestRecord
from proxy.sim.replies import json_reply, reset_reply, socket_sink, sse_reply
from proxy.sim.responses import ResponsesStream
from proxy.sim.tokens import Endpoint, Plan, embedding_inputs, make_plan, prompt_tokens

_GENERATION: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/v1/embeddings": "embeddings",
}
EngineEnd = Literal["completed", "error", "reset", "malformed", "truncated", "aborted"]


class Api:
    def __init__(
        self,
        recorder: Recorder,
        jobs: JobStore,
        *,
        tokens_per_s: float,
        default_tokens: int,
        body_limit: int,
        engine_aborts: EngineAborts,
        ignore_close: bool = False,
        vllm_abort_endpoint: bool = False,
    ) -> None:
        self.recorder = recorder
        self.jobs = jobs
        self.engine_aborts = engine_aborts
        # Keep generating after the peer closes, as an engine behind a buffering proxy does.
        self.ignore_close = ignore_close
        self.vllm_abort_endpoint = vllm_abort_endpoint
        self.tokens_per_s = tokens_per_s
        self.default_tokens = default_tokens
        self.body_limit = body_limit
        self.stopping = False
        # model -> behaviour spec: faults chosen per model, changed at run time (flapping).
        self.faults: dict[str, str] = {}
        self.rng = random.Random(0)  # the `tail` behaviour's draws: reproducible runs

    async def handle(self, request: web.BaseRequest, rec: RequestRecord) -> web.StreamResponse:
        end: End = "error"
        try:
            resp, end = await self._route(request, rec)
            return resp
        except asyncio.CancelledError:
            # handler_cancellation: the peer closed the connection (or stop() cancelled us).
            end = "stopped" if self.stopping else "peer_closed"
            raise
        except ConnectionError:
            # A write failed: the peer is gone. Nothing more can be sent, so no error log.
            end = "stopped" if self.stopping else "peer_closed"
            return web.Response()
        finally:
            self.recorder.finish(rec, end)

    async def _route(
        self, request: web.BaseRequest, rec: RequestRecord
    ) -> tuple[web.StreamResponse, End]:
        method, path = request.method, request.path
        try:
            endpoint = _GENERATION.get(path)
            if endpoint is not None and method == "POST":
                return await self._generate(request, rec, endpoint)
            parts = path.split("/")  # "", "v1", "responses", id[, "cancel"]
            engine = self.engine_aborts.engine
            if method == "POST" and (
                (engine == "sglang" and path == "/abort_request")
                or (engine == "vllm" and self.vllm_abort_endpoint and path == "/abort_requests")
            ):
                return await abort_endpoint(self.engine_aborts, request, rec)
            if method == "GET" and path == "/v1/models":
                return await json_reply(
                    request, rec, 200, models_body(tuple(n.value for n in Name))
                )
            if method == "GET" and len(parts) == 4 and parts[2] == "models":
                return await json_reply(request, rec, 200, model_object(parts[3]))
            if len(parts) >= 4 and parts[:3] == ["", "v1", "responses"] and parts[3]:
                if method == "GET" and len(parts) == 4:
                    return await retrieve_response(self.jobs, request, rec, parts[3])
                if method == "POST" and len(parts) == 5 and parts[4] == "cancel":
                    return await cancel_response(self.jobs, request, rec, parts[3])
            raise ApiError(404, f"Invalid URL ({method} {path})")
        except ApiError as err:
            rec.error = err.message
            headers = err.headers()
            resp, _ = await json_reply(request, rec, err.status, err.payload(), headers)
            return resp, "error"

    # -- generation ---------------------------------------------------------------------------

    async def _generate(
        self, request: web.BaseRequest, rec: RequestRecord, endpoint: Endpoint
    ) -> tuple[web.StreamResponse, End]:
        spec = request.headers.get("x-sim-behaviour")
        raw = await read_body(request, rec, spec)
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        if rec.body_bytes <= self.body_limit:
            rec.body = body
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model parameter", param="model")
        rec.model = model
        spec = spec or self.faults.get(model)
        try:
            b = parse_behaviour(spec or model)
        except BehaviourError as err:
            raise ApiError(400, f"simulator behaviour: {err}", param="model") from None
        if b.name is Name.TAIL:
            # The draw is made here, once per request, from the seeded generator.
            slow = self.rng.random() < b.p
            b = replace(b, name=Name.SLOW_FIRST_TOKEN if slow else Name.NORMAL)
        rec.behaviour = b
        stream = rec.stream = body.get("stream") is True and endpoint != "embeddings"
        if endpoint in ("chat", "completions"):
            rec.engine_id = self.engine_aborts.engine_id(endpoint, body, rec.headers)

        if endpoint == "embeddings":
            inputs = embedding_inputs(body)
            if b.name is Name.ERROR:  # nothing is generated, so "after" has nothing to count
                raise ApiError(b.status, error_message(b.status))
            early = await self._before_headers(request, rec, b)
            if early is not None:
                return early
            payload = embeddings_body(model, inputs, prompt_tokens("embeddings", body))
            return await json_reply(request, rec, 200, payload)
        plan = make_plan(
            endpoint,
            body,
            b,
            default_tokens=self.default_tokens,
            default_rate=self.tokens_per_s,
        )
        early = await self._before_headers(request, rec, b)
        if early is not None:
            return early
        if endpoint == "responses":
            fmt_r = ResponsesStream(
                model=model, plan=plan, body=body, background=body.get("background") is True
            )
            rec.response_id = fmt_r.id
            if fmt_r.background:
                return await start_background(self.jobs, request, rec, fmt_r, plan, b, stream)
            if stream:
                return await self._stream(request, rec, fmt_r, plan, b)
            return await self._complete(request, rec, plan, b, fmt_r)
        options = body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        fmt_c = ChatStream(
            model=model,
            plan=plan,
            include_usage=options.get("include_usage") is True,
            continuous_usage=options.get("continuous_usage_stats") is True,
            tool_name=_tool_name(body) if b.name is Name.TOOL_CALL and endpoint == "chat" else None,
            completions=endpoint == "completions",
        )
        if stream:
            return await self._stream(request, rec, fmt_c, plan, b)
        return await self._complete(request, rec, plan, b, fmt_c)

    async def _before_headers(
        self, request: web.BaseRequest, rec: RequestRecord, b: Behaviour
    ) -> tuple[web.StreamResponse, End] | None:
        """Behaviours that act before any response byte (error and reset with `after` act
        later, in the engine)."""
        if b.name is Name.SLOW_HEADERS:
            await asyncio.sleep(b.delay)
        elif b.name is Name.ERROR and b.after is None:
            raise ApiError(
                b.status, error_message(b.status), code=b.code, retry_after=b.retry_after
            )
        elif b.name is Name.RESET and b.after == 0:
            return reset_reply(request, rec)
        elif b.name is Name.DROP:
            await asyncio.sleep(b.delay)
            if rec.connection is not None:
                rec.connection.server_closing = True
            transport = request.transport
            if transport is not None:
                transport.close()  # FIN after the request was read: no response at all
            return web.Response(), "reset"
        return None

    async def _stream(
        self,
        request: web.BaseRequest,
        rec: RequestRecord,
        fmt: StreamFormat,
        plan: Plan,
        b: Behaviour,
    ) -> tuple[web.StreamResponse, End]:
        resp = await sse_reply(request, rec)
        sink = socket_sink(resp, rec, forgiving=self.ignore_close)
        end = await self._generation(rec, plan, b, Output(fmt, sink))
        if end == "reset":
            return reset_reply(request, rec)
        if end == "aborted" and isinstance(fmt, ChatStream):
            for data in fmt.aborted():
                await sink(data, Kind.META)
        if rec.peer_closed_at is None:
            await resp.write_eof()
        if end == "aborted":
            return resp, "aborted"
        return resp, "error" if end == "error" else "completed"

    async def _complete(
        self,
        request: web.BaseRequest,
        rec: RequestRecord,
        plan: Plan,
        b: Behaviour,
        fmt: ChatStream | ResponsesStream,
    ) -> tuple[web.StreamResponse, End]:
        end = await self._generation(rec, plan, b, None)
        if end == "aborted":
            generated = rec.progress.generated
            content = max(0, generated - plan.reasoning_tokens)
            fmt.account(min(generated, plan.reasoning_tokens), content)
            p = rec.progress
            p.content_tokens, p.reasoning_tokens = content, min(generated, plan.reasoning_tokens)
            payload = (
                fmt.body() if isinstance(fmt, ChatStream) else fmt.response_object("cancelled")
            )
            if isinstance(fmt, ChatStream):
                payload["choices"][0]["finish_reason"] = "abort"
            if rec.peer_closed_at is not None:
                return web.Response(), "aborted"
            resp, _ = await json_reply(request, rec, 200, payload)
            return resp, "aborted"
        if end == "error":
            raise ApiError(b.status, error_message(b.status))
        if end == "reset":
            return reset_reply(request, rec)
        if end == "malformed":
            return await json_reply(request, rec, 200, b"{not json")
        fmt.account(plan.reasoning_tokens, plan.content_tokens)
        if isinstance(fmt, ResponsesStream):
            payload = fmt.response_object(fmt.final_status)
        else:
            payload = fmt.body()
        result = await json_reply(request, rec, 200, payload)
        p = rec.progress
        p.content_tokens, p.reasoning_tokens = plan.content_tokens, plan.reasoning_tokens
        p.first_token_at = rec.headers_sent_at
        return result

    async def _generation(
        self, rec: RequestRecord, plan: Plan, b: Behaviour, out: Output | None
    ) -> EngineEnd:
        """Run `generate` as the engine would: stoppable by an abort call naming the request,
        and, with `ignore_close`, not stopped by the peer closing the connection."""
        if rec.engine_id is None and not self.ignore_close:
            return await generate(plan, b, rec.progress, out)
        generation = asyncio.ensure_future(generate(plan, b, rec.progress, out))
        self.engine_aborts.register(rec, generation)
        try:
            while True:
                try:
                    return await asyncio.shield(generation)
                except asyncio.CancelledError:
                    if generation.cancelled() and rec.aborted_at is not None:
                        return "aborted"
                    if not self.ignore_close or self.stopping:
                        generation.cancel()
                        raise
                    # The peer left (aiohttp cancelled this handler); an engine behind a
                    # buffering proxy never hears of it: keep generating.
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
        finally:
            self.engine_aborts.unregister(rec)


def _tool_name(body: dict[str, Any]) -> str:
    tools = body.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[0], dict):
        function = tools[0].get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return str(function["name"])
    return "lookup"
