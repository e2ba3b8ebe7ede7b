"""The fault suite: each case sets what the primary and the fallback upstream do, sends one
request (or a few) through hangup with the real OpenAI Python SDK or raw HTTP, and scores it.

Scores (issue 14): pass (the client got the right answer, or the right error when the error
is the answer), partial (right answer, but slower than the case allows), safe (a clear error,
nothing hung or leaked), fail (wrong or incomplete answer without an error, a hang, a request
the upstream may have started sent to it again, a connection left open).

Timing scales with `Timing`: the test module runs the suite with 1 s deadlines, the script
with the deadlines a user would set.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai

from bench.fault_upstream import (
    WORDS,
    Behaviour,
    Conn,
    FaultUpstream,
    answer_words,
    completion,
    full_text,
    gzipped,
    healthy,
)

BACKUP_MODEL = "backup-model"
PRIMARY_MODEL = "gpt-4o"
SCORES = ("pass", "partial", "safe", "fail")


@dataclass(frozen=True)
class Timing:
    """The route's per-attempt deadlines (also what the faults are sized against)."""

    headers_s: float = 1.0
    first_token_s: float = 1.0
    idle_s: float = 1.0
    late_s: float = 3.0  # "first token after 20 s", scaled: later than first_token_s
    hang_bound_s: float = 8.0  # a client waiting longer than this has been hung
    slow_s: float | None = None  # a right answer later than this is partial (0.75 x hang)

    def route(self) -> dict[str, Any]:
        return {
            "timeouts": {
                "connect_s": 2,
                "headers_s": self.headers_s,
                "first_token_s": self.first_token_s,
                "idle_s": self.idle_s,
                "total_s": 120,
            },
        }


@dataclass
class Result:
    case: str
    mode: str  # stream / json / raw
    score: str
    detail: str
    seconds: float


@dataclass
class Got:
    text: str = ""
    model: str | None = None
    status: int | None = None  # an HTTP error status
    error: str | None = None  # an exception's description (in-band or status)
    tool_args: str = ""
    usage: dict[str, Any] | None = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    name: str
    primary: Behaviour
    backup: Behaviour = healthy
    modes: tuple[str, ...] = ("stream", "json")
    expect: str = "answer"  # answer / status:<code>
    primary_max: int = 1  # requests the primary may see (more: a resend it may have started)
    backup_max: int = 1
    must_close: bool = True  # every connection that carried a failing attempt is closed
    extra: dict[str, Any] = field(default_factory=dict)
    requests: int = 1
    check: Callable[[Got], str | None] | None = None  # extra check: a problem or None
    text: str = field(default_factory=full_text)


# --- behaviours -----------------------------------------------------------------------------
def status_then_healthy(status: int, times: int, **headers: str) -> Behaviour:
    async def behave(conn: Conn, nth: int) -> None:
        if nth < times:
            await conn.error(status, f"fault {status}", None, **headers)
        else:
            await conn.healthy()

    behave.__name__ = f"status{status}x{times}"
    return behave


def always(status: int, **headers: str) -> Behaviour:
    return status_then_healthy(status, 10**6, **headers)


async def reset_before_headers(conn: Conn, nth: int) -> None:
    conn.reset()


async def close_before_headers(conn: Conn, nth: int) -> None:
    conn.close()


async def silent(conn: Conn, nth: int) -> None:
    await conn.until_closed()


async def headers_then_silent(conn: Conn, nth: int) -> None:
    await conn.stream_head()
    await conn.until_closed()


async def keepalive_only(conn: Conn, nth: int) -> None:
    await conn.stream_head()
    for _ in range(9000):  # 900 s
        try:
            await conn.chunk(b": keep-alive\n\n")
        except (ConnectionError, RuntimeError):
            conn.keep_open = False
            return
        if not await conn.pause(0.1):
            return
    conn.close()


def late_first_token(delay: float) -> Behaviour:
    async def behave(conn: Conn, nth: int) -> None:
        if not conn.seen.stream:
            if await conn.pause(delay):
                await conn.healthy_json()
            return
        await conn.stream_head()
        model = str(conn.body.get("model"))
        await conn.event(conn.chunk_obj(model, {"role": "assistant", "content": ""}))
        if await conn.pause(delay):
            await conn.healthy_stream(head=False, role=False)

    behave.__name__ = "late_first_token"
    return behave


def cut_after(words: int, how: str) -> Behaviour:
    """A stream that breaks after `words` content words: reset, fin, stall, bad_chunk."""

    async def behave(conn: Conn, nth: int) -> None:
        if not conn.seen.stream:
            # Non-streamed: the body is cut mid-JSON.
            data = json.dumps(
                {"id": "x", "choices": [{"message": {"content": full_text()}}]}
            ).encode()
            await conn.head(
                200, {"content-type": "application/json", "content-length": str(len(data))}
            )
            await conn.send(data[: len(data) // 2])
            if how == "stall":
                await conn.until_closed()
            elif how == "reset":
                conn.reset()
            else:
                conn.close()
            return
        await conn.stream_head()
        model = str(conn.body.get("model"))
        await conn.event(conn.chunk_obj(model, {"role": "assistant", "content": ""}))
        for word in answer_words()[:words]:
            await conn.event(conn.chunk_obj(model, {"content": word}))
        await asyncio.sleep(0.05)
        if how == "reset":
            conn.reset()
        elif how == "fin":
            conn.close()
        elif how == "stall":
            await conn.until_closed()
        elif how == "bad_chunk":
            await conn.send(b"zz\r\ndata: {}\n\n\r\n")
            conn.close()
        elif how == "half_chunk":
            await conn.send(b'40\r\ndata: {"choi')
            conn.close()

    behave.__name__ = f"cut_{how}_after_{words}"
    return behave


async def malformed_events(conn: Conn, nth: int) -> None:
    if not conn.seen.stream:
        await conn.healthy_json()
        return
    await conn.stream_head()
    model = str(conn.body.get("model"))
    await conn.event(conn.chunk_obj(model, {"role": "assistant", "content": ""}))
    for i, word in enumerate(answer_words()):
        if i == 3:
            await conn.event("{not json")
            await conn.chunk(b"data: \xff\xfe\n\n")
            await conn.chunk(b"event: weird\nid: 7\n\n")
        await conn.event(conn.chunk_obj(model, {"content": word}))
    await conn.event(conn.chunk_obj(model, {}, "stop"))
    await conn.event("[DONE]")
    await conn.end_chunks()


def error_400(code: str, message: str) -> Behaviour:
    async def behave(conn: Conn, nth: int) -> None:
        await conn.error(400, message, code)

    behave.__name__ = f"400_{code}"
    return behave


async def gzip_503(conn: Conn, nth: int) -> None:
    data = gzipped(
        json.dumps({"error": {"message": "overloaded", "type": "server_error"}}).encode()
    )
    await conn.head(
        503,
        {
            "content-type": "application/json",
            "content-encoding": "gzip",
            "content-length": str(len(data)),
        },
    )
    await conn.send(data)


async def huge_503(conn: Conn, nth: int) -> None:
    data = b'{"error": {"message": "' + b"x" * (8 << 20) + b'"}}'
    await conn.head(503, {"content-type": "application/json", "content-length": str(len(data))})
    await conn.send(data)


async def bad_chunk_before_content(conn: Conn, nth: int) -> None:
    if not conn.seen.stream:
        await conn.head(200, {"content-type": "application/json", "transfer-encoding": "chunked"})
        await conn.send(b"zz\r\n{}\r\n")
        conn.close()
        return
    await conn.stream_head()
    await conn.send(b"nothex\r\ndata: {}\n\n\r\n")
    conn.close()


async def garbage_status(conn: Conn, nth: int) -> None:
    await conn.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    conn.close()


def slow(delay: float) -> Behaviour:
    async def behave(conn: Conn, nth: int) -> None:
        if await conn.pause(delay):
            await conn.healthy()

    behave.__name__ = "slow"
    return behave


async def renamed_model(conn: Conn, nth: int) -> None:
    model = "backup-model-2024-08-06"
    if conn.seen.stream:
        await conn.healthy_stream(model=model)
    else:
        await conn.healthy_json(model=model)


async def tool_call_stream(conn: Conn, nth: int) -> None:
    model = str(conn.body.get("model"))
    if not conn.seen.stream:
        obj = {
            "id": "x",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": '{"city": "Paris"}'},
                            }
                        ],
                    },
                }
            ],
        }
        await conn.json_answer(200, obj)
        return
    await conn.stream_head()
    first = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": ""},
            }
        ],
    }
    await conn.event(conn.chunk_obj(model, first))
    for part in ['{"city"', ': "Par', 'is"}']:
        await asyncio.sleep(0.05)
        delta = {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}
        await conn.event(conn.chunk_obj(model, delta))
    await conn.event(conn.chunk_obj(model, {}, "tool_calls"))
    await conn.event("[DONE]")
    await conn.end_chunks()


def reasoning_then_answer(think_s: float) -> Behaviour:
    """A reasoning model: `reasoning_content` deltas for `think_s`, then the answer."""

    async def behave(conn: Conn, nth: int) -> None:
        if not conn.seen.stream:
            if await conn.pause(think_s):
                await conn.healthy_json()
            return
        model = str(conn.body.get("model"))
        await conn.stream_head()
        await conn.event(conn.chunk_obj(model, {"role": "assistant", "content": ""}))
        until = time.monotonic() + think_s
        while time.monotonic() < until:
            await conn.event(conn.chunk_obj(model, {"reasoning_content": "hmm "}))
            if not await conn.pause(0.1):
                return
        await conn.healthy_stream(head=False, role=False)

    behave.__name__ = "reasoning"
    return behave


async def n2_stream(conn: Conn, nth: int) -> None:
    model = str(conn.body.get("model"))
    if not conn.seen.stream:
        obj = {
            "id": "x",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": full_text()},
                }
                for i in range(2)
            ],
        }
        await conn.json_answer(200, obj)
        return
    await conn.stream_head()
    for i in range(2):
        delta = {"role": "assistant", "content": ""}
        await conn.event(
            {**conn.chunk_obj(model, delta), "choices": [{"index": i, "delta": delta}]}
        )
    for word in answer_words():
        for i in range(2):
            obj = conn.chunk_obj(model, {"content": word})
            obj["choices"][0]["index"] = i
            await conn.event(obj)
    await conn.event(conn.chunk_obj(model, {}, "stop"))
    await conn.event("[DONE]")
    await conn.end_chunks()


def flapping(period_s: float) -> Behaviour:
    """503 during odd periods of `period_s`, healthy in even ones (from the first request)."""
    start: list[float] = []

    async def behave(conn: Conn, nth: int) -> None:
        if not start:
            start.append(time.monotonic())
        phase = int((time.monotonic() - start[0]) / period_s)
        if phase % 2 == 0:
            await conn.error(503, "flap", None)
        else:
            await conn.healthy()

    behave.__name__ = "flapping"
    return behave


async def error_event_before_content(conn: Conn, nth: int) -> None:
    if not conn.seen.stream:
        await conn.error(503, "overloaded", None)
        return
    await conn.stream_head()
    model = str(conn.body.get("model"))
    await conn.event(conn.chunk_obj(model, {"role": "assistant", "content": ""}))
    await conn.event({"error": {"message": "overloaded", "type": "server_error"}})
    await conn.end_chunks()


async def gzip_answer(conn: Conn, nth: int) -> None:
    if conn.seen.stream:
        await conn.healthy_stream()
        return
    todo, model = conn.words()
    data = gzipped(json.dumps(completion(model, "".join(todo))).encode())
    await conn.head(
        200,
        {
            "content-type": "application/json",
            "content-encoding": "gzip",
            "content-length": str(len(data)),
        },
    )
    await conn.send(data)


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


# --- the cases --------------------------------------------------------------------------------
def cases(t: Timing) -> list[Case]:
    def policy_check(got: Got) -> str | None:
        return None if "content_policy" in (got.error or "") else f"body lost: {got.error}"

    def tool_check(got: Got) -> str | None:
        return None if got.tool_args == '{"city": "Paris"}' else f"tool args {got.tool_args!r}"

    def both_429_check(got: Got) -> str | None:
        return None if got.headers.get("retry-after") else "the 429's Retry-After was lost"

    def usage_check(got: Got) -> str | None:
        if got.usage is None:
            return "no usage"
        if got.usage.get("completion_tokens") != WORDS:
            return f"usage {got.usage} is not the answering target's"
        return None

    return [
        Case(
            "429 with Retry-After (s)",
            status_then_healthy(429, 1, **{"retry-after": "1"}),
            primary_max=2,
        ),
        Case(
            "429 with Retry-After (HTTP date)",
            status_then_healthy(429, 1, **{"retry-after": http_date(1.5)}),
            primary_max=2,
        ),
        Case("429 without Retry-After", always(429)),
        Case(
            "429 with x-ratelimit headers only",
            always(
                429, **{"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s"}
            ),
        ),
        Case("429 Retry-After 3600", always(429, **{"retry-after": "3600"})),
        Case("500 once", status_then_healthy(500, 1)),
        Case("503 forever (Retry-After 1)", always(503, **{"retry-after": "1"}), primary_max=2),
        Case("503 gzip error body", gzip_503),
        Case("503 huge error body (8 MiB)", huge_503),
        Case("reset before headers", reset_before_headers),
        Case("close before headers", close_before_headers),
        Case("not HTTP", garbage_status),
        Case("silent upstream", silent),
        Case("headers then silence", headers_then_silent, modes=("stream",)),
        Case("keep-alives only", keepalive_only, modes=("stream",)),
        Case("first token late", late_first_token(t.late_s)),
        Case("broken chunk framing before content", bad_chunk_before_content),
        Case("stream reset mid-way", cut_after(3, "reset"), modes=("stream",)),
        Case("stream FIN mid-way", cut_after(3, "fin"), modes=("stream",)),
        Case("stream stalled mid-way", cut_after(3, "stall"), modes=("stream",)),
        Case("stream bad chunk mid-way", cut_after(3, "bad_chunk"), modes=("stream",)),
        Case("stream half chunk mid-way", cut_after(3, "half_chunk"), modes=("stream",)),
        Case("body cut mid-JSON (FIN)", cut_after(3, "fin"), modes=("json",)),
        Case("body cut mid-JSON (stall)", cut_after(3, "stall"), modes=("json",)),
        Case("malformed events", malformed_events, modes=("stream",)),
        Case("400 context length", error_400("context_length_exceeded", "too long")),
        Case(
            "400 content policy",
            error_400("content_policy_violation", "no"),
            expect="status:400",
            backup_max=0,
            check=policy_check,
        ),
        Case("flapping primary", flapping(0.6), requests=6, primary_max=6, backup_max=6),
        Case(
            "fallback accounting (usage)",
            always(503),
            modes=("stream", "json"),
            check=usage_check,
            extra={"stream_options": {"include_usage": True}},
        ),
        Case("fallback also fails (503, 503)", always(503), always(503), expect="status:503"),
        Case(
            "both fail differently (reset, 429)",
            reset_before_headers,
            always(429, **{"retry-after": "30"}),
            expect="status:429",
            check=both_429_check,
        ),
        Case("very slow fallback", always(503), slow(t.first_token_s * 0.8)),
        Case("fallback answers another model name", always(503), renamed_model),
        Case(
            "tool-call stream after failover",
            always(503),
            tool_call_stream,
            check=tool_check,
            extra={"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        ),
        Case(
            "reasoning longer than first_token_s",
            reasoning_then_answer(t.first_token_s * 2),
            modes=("stream",),
        ),
        Case("n=2 after failover", always(503), n2_stream, extra={"n": 2}),
        Case("in-band error before content", error_event_before_content),
        Case("429 Retry-After 1 every time", always(429, **{"retry-after": "1"}), primary_max=2),
        Case("both silent", silent, silent, expect="status:504"),
        Case(
            "silent primary, fallback stalls after content",
            silent,
            cut_after(3, "stall"),
            modes=("stream",),
            backup_max=2,  # with continue_cut_streams: the continuation, a new request
        ),
        Case("gzip answer from the fallback", always(503), gzip_answer),
    ]


# --- driving a case -------------------------------------------------------------------------
async def sdk_call(
    base: str, request_id: str, stream: bool, extra: dict[str, Any], bound: float
) -> Got:
    client = openai.AsyncOpenAI(base_url=base, api_key="sk-test", max_retries=0, timeout=bound)
    got = Got()
    texts: dict[int, list[str]] = {}
    try:
        async with asyncio.timeout(bound):
            kwargs: dict[str, Any] = {
                "model": PRIMARY_MODEL,
                "messages": [{"role": "user", "content": "count"}],
                "extra_headers": {"x-request-id": request_id},
                **extra,
            }
            if stream:
                s = await client.chat.completions.create(stream=True, **kwargs)
                async for chunk in s:
                    got.model = chunk.model
                    if chunk.usage is not None:
                        got.usage = chunk.usage.model_dump()
                    for choice in chunk.choices:
                        texts.setdefault(choice.index, []).append(choice.delta.content or "")
                        for call in choice.delta.tool_calls or []:
                            got.tool_args += (
                                (call.function.arguments or "") if call.function else ""
                            )
            else:
                r = await client.chat.completions.create(**kwargs)
                got.model = r.model
                got.usage = r.usage.model_dump() if r.usage else None
                for choice in r.choices:
                    texts[choice.index] = [choice.message.content or ""]
                    for tc in choice.message.tool_calls or []:
                        got.tool_args += tc.function.arguments
    except TimeoutError:
        got.error = "hang"
    except openai.APIStatusError as exc:
        got.status, got.error = exc.status_code, f"{exc.status_code} {exc.message} {exc.body}"
        got.headers = {k.lower(): v for k, v in exc.response.headers.items()}
    except openai.APIError as exc:
        got.error = f"{type(exc).__name__}: {exc.message}"
    except Exception as exc:  # noqa: BLE001  # a client-side parse failure is corruption
        got.error = f"CORRUPT {type(exc).__name__}: {exc}"
    finally:
        await client.close()
    got.text = "|".join("".join(texts[i]) for i in sorted(texts))
    return got


async def raw_call(
    base: str, request_id: str, stream: bool, extra: dict[str, Any], bound: float
) -> Got:
    got = Got()
    body = {
        "model": PRIMARY_MODEL,
        "messages": [{"role": "user", "content": "count"}],
        "stream": stream,
        **extra,
    }
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(bound):
            async with session.post(
                f"{base}/chat/completions", json=body, headers={"x-request-id": request_id}
            ) as r:
                got.body = await r.read()
                got.status = r.status
    except TimeoutError:
        got.error = "hang"
    except aiohttp.ClientError as exc:
        got.error = f"{type(exc).__name__}"
    return got


def score(
    case: Case,
    got: Got,
    primary: FaultUpstream,
    backup: FaultUpstream,
    rid: str,
    seconds: float,
    t: Timing,
) -> tuple[str, str]:
    p, b = primary.requests(rid), backup.requests(rid)
    if got.error == "hang":
        return "fail", f"hung > {t.hang_bound_s:g}s"
    if got.error and got.error.startswith("CORRUPT"):
        return "fail", got.error
    if len(p) > case.primary_max:
        return "fail", f"primary saw the request {len(p)} times"
    if len(b) > case.backup_max:
        return "fail", f"fallback saw the request {len(b)} times"
    if case.must_close:
        open_ = [s.behaviour for s in p + b if s.closed_at is None and not s.finished]
        if open_:
            return "fail", f"attempt left open upstream: {open_}"
    if case.expect.startswith("status:"):
        want = int(case.expect.split(":")[1])
        if got.status == want:
            problem = case.check(got) if case.check else None
            return ("safe", problem) if problem else ("pass", f"{want} passed on")
        if got.error:
            return "safe", f"wanted {want}, got {got.error[:80]}"
        return "fail", f"wanted {want}, got an answer from {got.model}"
    # expect an answer
    want_text = case.text if "n" not in case.extra else "|".join([case.text] * case.extra["n"])
    if got.error:
        return "safe", got.error[:100]
    if case.check is not None:
        problem = case.check(got)
        if problem:
            return "fail", problem
    elif got.text != want_text:
        return "fail", f"wrong text {got.text[:60]!r} (no error)"
    if seconds > (t.slow_s if t.slow_s is not None else t.hang_bound_s * 0.75):
        return "partial", f"answered by {got.model} after {seconds:.1f}s"
    return "pass", f"{got.model} in {seconds:.2f}s, attempts p{len(p)}/b{len(b)}"


async def run_case(
    case: Case, base: str, primary: FaultUpstream, backup: FaultUpstream, t: Timing, tag: str = ""
) -> list[Result]:
    results = []
    for mode in case.modes:
        worst = "pass"
        details = []
        started = time.monotonic()
        for i in range(case.requests):
            rid = f"{tag}{case.name}-{mode}-{i}".replace(" ", "_")
            primary.behaviours[rid] = case.primary
            backup.behaviours[rid] = case.backup
            t0 = time.monotonic()
            got = await sdk_call(base, rid, mode == "stream", case.extra, t.hang_bound_s)
            seconds = time.monotonic() - t0
            await _settle(primary, backup, rid)
            s, d = score(case, got, primary, backup, rid, seconds, t)
            if SCORES.index(s) > SCORES.index(worst):
                worst = s
            details.append(d)
            if case.requests > 1:
                await asyncio.sleep(0.25)
        detail = details[0] if len(set(details)) == 1 else "; ".join(details)
        results.append(Result(case.name, mode, worst, detail, time.monotonic() - started))
    return results


async def _settle(primary: FaultUpstream, backup: FaultUpstream, rid: str) -> None:
    """Give abandoned attempts' closes a moment to arrive (bounded)."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if all(
            s.closed_at is not None or s.finished
            for s in primary.requests(rid) + backup.requests(rid)
        ):
            return
        await asyncio.sleep(0.02)


def hangup_config(
    primary: FaultUpstream, backup: FaultUpstream, t: Timing | None, **route: Any
) -> dict[str, Any]:
    """The issue's shape: a route on the primary with one fallback renamed to BACKUP_MODEL
    (marked long_context); `t` None leaves every deadline at hangup's defaults."""
    r: dict[str, Any] = {
        "name": "chat",
        "match": {"path_prefix": "/v1/chat/completions", "model": "gpt-4o*"},
        "upstream": "primary",
        "fallbacks": [{"upstream": "backup", "model": BACKUP_MODEL, "long_context": True}],
        **route,
    }
    if t is not None:
        r.update(t.route())
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstreams": {
            "primary": {"base_url": primary.base_url},
            "backup": {"base_url": backup.base_url, "assistant_prefix": "prefix"},
        },
        "routes": [r],
    }


Runner = Callable[[Case], Awaitable[list[Result]]]
