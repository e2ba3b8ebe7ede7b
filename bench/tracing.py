"""`python -m bench.tracing`: what OpenTelemetry tracing costs per request (needs hangup[otel]).

Feeds N finished request records through the three tracing hooks the proxy calls (`arrived`,
`attempt`, `finished`) and measures CPU time: on the calling thread (the event loop's share in
the proxy) and for the whole process once every span was exported (adding the exporter thread:
span building, the SDK's protobuf encoding, the HTTP request). The OTLP receiver runs in its own
process (it counts the spans and drops them), so its decoding is not counted. Variants: every
request sampled (a client traceparent with the sampled flag), none sampled
(OTEL_TRACES_SAMPLER=always_off), and tracing off. A correctness failure (a span not exported)
makes the exit code 1; timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from multidict import CIMultiDict

from bench.common import PY, contention, free_port, http_get, machine, report, table, wait_http
from proxy.attempts import Attempt, AttemptResult
from proxy.config import HangupConfig
from proxy.outcome import Cost, Outcome, RequestRecord, Usage
from proxy.tracing import Tracing, make_tracing

_SINK = textwrap.dedent(
    """
    import asyncio, sys
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    count = 0
    async def traces(request):
        global count
        message = ExportTraceServiceRequest.FromString(await request.read())
        count += sum(len(ss.spans) for rs in message.resource_spans for ss in rs.scope_spans)
        return web.Response(content_type="application/x-protobuf")
    async def health(request):
        return web.Response(text=str(count))
    async def main():
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/traces", traces)
        app.router.add_get("/", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
        await asyncio.Event().wait()
    asyncio.run(main())
    """
)
_SAMPLED_PARENT = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


def _record(i: int) -> RequestRecord:
    """A completed 16-token stream of a named client, as the relay leaves it."""
    record = RequestRecord(
        request_id=f"bench-{i}",
        method="POST",
        path="/v1/chat/completions",
        started_at=1000.0,
        wall_started_at=time.time(),
        route="default",
        model="gpt-4o-mini",
        upstream="sim",
        endpoint="chat.completions",
        stream=True,
        status=200,
        upstream_status=200,
        client="team-a",
        client_address="127.0.0.1",
        user_agent="OpenAI/Python 1.99.0",
        upstream_attempts=1,
        finish_reason="stop",
        response_model="gpt-4o-mini",
        first_token_at=1000.1,
        upstream_closed_at=1000.9,
        ended_at=1001.0,
        usage=Usage(prompt_tokens=20, completion_tokens=16),
        cost=Cost(0.0001, 0.0, 0.0),
    )
    attempt = Attempt("sim", "gpt-4o-mini", 1000.01, status=200, delivered=True)
    attempt.tokens_generated = 16
    attempt.end(AttemptResult.OK, 1000.9)
    record.attempts.append(attempt)
    record.settle(Outcome.COMPLETED)
    return record


def _tracing(endpoint: str | None) -> Tracing:
    data: dict[str, Any] = {
        "upstreams": {"sim": {"base_url": "http://127.0.0.1:9/v1"}},
        "routes": [{"name": "default", "upstream": "sim"}],
        "tracing": {"enabled": endpoint is not None, "endpoint": endpoint},
    }
    if endpoint is not None:
        data["tracing"]["max_queued_requests"] = 1_000_000
    return make_tracing(HangupConfig.model_validate(data))


def _run(variant: str, n: int, endpoint: str) -> dict[str, Any]:
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[name]
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    if variant == "unsampled":
        os.environ["OTEL_TRACES_SAMPLER"] = "always_off"
    tracing = _tracing(None if variant == "off" else endpoint)
    headers = _SAMPLED_PARENT if variant == "sampled" else {}
    records = [_record(i) for i in range(n)]
    process_before = time.process_time()
    loop_cpu = 0.0
    for record in records:
        before = time.thread_time()
        tracing.arrived(record, headers)
        tracing.attempt(record, CIMultiDict(), record.attempts[0])
        tracing.finished(record)
        loop_cpu += time.thread_time() - before
    tracing.close(timeout_s=120.0)  # exports everything still queued, then stops the thread
    process_cpu = time.process_time() - process_before
    return {
        "variant": variant,
        "requests": n,
        "loop_us_per_request": loop_cpu / n * 1e6,
        "process_us_per_request": process_cpu / n * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    port = free_port()
    sink = subprocess.Popen([PY, "-c", _SINK, str(port)])
    failures: list[str] = []
    runs: list[dict[str, Any]] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/", sink)
        endpoint = f"http://127.0.0.1:{port}/v1/traces"
        for _ in range(args.rounds):
            for variant in ("off", "unsampled", "sampled"):
                before = int(http_get(f"http://127.0.0.1:{port}/"))
                runs.append(_run(variant, args.requests, endpoint))
                spans = int(http_get(f"http://127.0.0.1:{port}/")) - before
                expected = 2 * args.requests if variant == "sampled" else 0
                if spans != expected:
                    failures.append(f"{variant}: the receiver got {spans} spans, not {expected}")
    finally:
        sink.terminate()
        sink.wait(timeout=10)
    rows = [
        [r["variant"], r["requests"], r["loop_us_per_request"], r["process_us_per_request"]]
        for r in runs
    ]
    print(table(["variant", "requests", "event loop µs/req", "whole process µs/req"], rows))
    data = {"machine": machine(), "contention": contention(), "runs": runs}
    return report("tracing", data, args.out, failures)


if __name__ == "__main__":
    sys.exit(main())
