"""An in-process OTLP/HTTP trace receiver: what a collector on :4318 would get, decoded with
opentelemetry-proto, so tests assert on the spans hangup really exported over a socket."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    if kind is None:
        return None
    return getattr(v, kind)


@dataclass
class Received:
    span: Span
    resource: dict[str, Any]

    @property
    def attributes(self) -> dict[str, Any]:
        return {kv.key: _value(kv.value) for kv in self.span.attributes}

    @property
    def trace_id(self) -> int:
        return int.from_bytes(self.span.trace_id, "big")

    @property
    def span_id(self) -> int:
        return int.from_bytes(self.span.span_id, "big")

    @property
    def parent_span_id(self) -> int | None:
        return int.from_bytes(self.span.parent_span_id, "big") if self.span.parent_span_id else None

    @property
    def kind(self) -> int:
        return int(self.span.kind)

    @property
    def event_names(self) -> list[str]:
        return [e.name for e in self.span.events]


SERVER = Span.SpanKind.SPAN_KIND_SERVER
CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
STATUS_ERROR = 2


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.bodies: list[bytes] = []
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def start(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.bodies.append(body)
        message = ExportTraceServiceRequest.FromString(body)
        for rs in message.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.spans.append(Received(span, resource))
        self._changed.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def for_request(self, request_id: str) -> list[Received]:
        """The request's SERVER span and the CLIENT spans under it."""
        server = [s for s in self.spans if s.attributes.get("hangup.request_id") == request_id]
        ids = {s.span_id for s in server}
        return server + [s for s in self.spans if s.parent_span_id in ids and s.kind == CLIENT]

    async def wait(self, probe: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not probe():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            got = len(self.spans)
            raise AssertionError(f"no {what} within {timeout}s; got {got} spans") from None

    async def wait_request(
        self, request_id: str, spans: int, timeout: float = 10.0
    ) -> tuple[Received, list[Received]]:
        """(SERVER span, CLIENT spans in start order) once `spans` spans of it arrived."""
        await self.wait(
            lambda: len(self.for_request(request_id)) >= spans, timeout, f"spans of {request_id}"
        )
        found = self.for_request(request_id)
        server = [s for s in found if s.kind == SERVER]
        assert len(server) == 1, found
        clients = sorted(
            (s for s in found if s.kind == CLIENT), key=lambda s: s.span.start_time_unix_nano
        )
        return server[0], clients
