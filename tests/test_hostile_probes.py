"""Variants of issue 13's hostile classes that the first suite did not try (held-out style).

tests/test_hostile_requests.py, test_hostile_connections.py and test_hostile_upstreams.py hold
one test per class; these vary each attack (other encodings of a path, other spellings of a
Host, request smuggling, duplicated and mistyped body members, upstreams that break framing or
echo the key in other places). Every probe speaks raw HTTP to the production runner and checks
the exact status, an OpenAI-shaped error, that nothing reached a host it should not (a witness
listener), no ERROR line, one access line, and no configured secret in what left the process.
"""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import unquote

import pytest

from proxy.config import ConfigError
from proxy.config_file import parse_config
from proxy.server import ProxyServer
from tests.conftest import StartProxy
from tests.hostile_support import (
    OK_BODY,
    Response,
    ScriptedUpstream,
    ScriptedUpstreams,
    SeenRequest,
    Witness,
    access_lines,
    assert_clean_log,
    chat_body,
    exchange_raw,
    json_head,
    request_bytes,
    sse_head,
)
from tests.support import RecordSink, config_from

KEY = "probeUpstreamKey-not-sk-0001"  # not sk- shaped: only exact-value scrubbing catches it
SSE_CONTENT = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # secrets stay out of every level


async def proxy_for(
    start_proxy: StartProxy, base_url: str, **extra: object
) -> tuple[ProxyServer, RecordSink]:
    data: dict[str, object] = {
        "upstreams": {"up": {"base_url": base_url, "api_key": KEY}},
        "routes": [{"name": "default", "upstream": "up"}],
        **extra,
    }
    return await start_proxy(config_from(data))


def assert_openai_error(response: Response) -> None:
    error = response.error()
    assert {"message", "type", "code"} <= set(error), error


# --- item 1: where a target can send the key ------------------------------------------------

TARGETS = [
    ("/v1/x/..%2f..%2fadmin", 400),  # %2F stays encoded in aiohttp's path: one segment `..%2F..`
    ("/v1/%2e%2e%2fadmin", 400),
    ("/v1/.%2E/admin", 400),
    ("/v1/x/%2e%2e%3bx/admin", 400),
    ("/v1/x/..%09/admin", 400),
    ("/v1/%252e%252e/admin", 200),  # forwarded as sent: the upstream decodes once, to `%2e%2e`
    ("/v1/x/..%252fadmin", 200),
    ("/v1/%c0%ae%c0%ae/admin", 200),  # overlong UTF-8 is no `.`
    ("/v1/x/..%ef%bc%8f../admin", 200),  # a fullwidth solidus is no `/`
    ("//v1/chat/completions", 404),
    ("//evil.example/v1/chat/completions", 404),
    ("/v1//evil.example/x", 200),
    ("/v1/@evil.example/x", 200),
    ("/v1/%40evil.example/x", 200),
    ("/v1/chat/completions@evil.example", 200),
    ("/v1/x?@evil.example", 200),
    ("/v1/x:evil@/y", 200),
    ("/v1/chat/completions#frag", 200),
]


@pytest.mark.parametrize(("target", "status"), TARGETS)
async def test_a_target_never_leaves_the_configured_upstream(
    target: str,
    status: int,
    start_proxy: StartProxy,
    upstream: ScriptedUpstream,
    witness: Witness,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, _ = await proxy_for(start_proxy, upstream.base_url)
    response = await exchange_raw(server.port, request_bytes("POST", target, body=chat_body()))
    assert response.status == status
    if status != 200:
        assert_openai_error(response)
        assert upstream.requests == []
    else:
        (seen,) = upstream.requests
        assert seen.target.startswith("/v1/")
        segments = unquote(seen.target.partition("?")[0]).replace("\\", "/").split("/")
        assert "." not in segments and ".." not in segments, seen.target
    assert witness.connections == 0
    assert_clean_log(caplog)


# --- item 4: Host values --------------------------------------------------------------------

HOSTS = [
    ("[::1]", 200),
    ("[::1]:80", 200),
    ("[0:0:0:0:0:0:0:1]", 200),
    ("[::ffff:127.0.0.1]", 200),
    ("LOCALHOST:8080", 200),
    ("127.0.0.1.", 200),
    ("localhost:", 200),  # an empty port is allowed (RFC 3986)
    ("a_b.localhost", 200),
    ("EVIL.example", 421),
    ("evil.example.", 421),
    ("localhost.evil.example", 421),
    ("127.0.0.1.nip.io", 421),
    ("127.1", 421),  # not an IP literal to a browser's page: a name
    ("", 421),
    ("[::1", 421),
    ("localhost, evil.example", 421),
    ("localhost/evil", 421),
    ("evil.example@localhost", 421),
    # These made aiohttp's `request.url` raise (yarl): a 500 and an ERROR traceback.
    ("localhost:99999", 421),
    ("localhost:80:80", 421),
    ("[::1]evil", 421),
    ("[::1]:", 200),
]


@pytest.mark.parametrize(("host", "status"), HOSTS)
async def test_host_values_get_an_exact_answer(
    host: str,
    status: int,
    start_proxy: StartProxy,
    upstream: ScriptedUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, _ = await proxy_for(start_proxy, upstream.base_url)
    request = request_bytes("POST", "/v1/chat/completions", body=chat_body(), host=host)
    response = await exchange_raw(server.port, request)
    assert response.status == status
    if status != 200:
        assert_openai_error(response)
        assert upstream.requests == []
    assert_clean_log(caplog)


# --- items 2, 4, 9: request heads: smuggling, Origin, encodings ------------------------------

POST = "POST /v1/chat/completions HTTP/1.1"
HOST = "Host: localhost"
CLOSE = "Connection: close"
LENGTH = "Content-Length: {n}"
HEADS: list[tuple[str, list[str], tuple[int, ...], bool | None]] = [
    # (name, head lines, allowed statuses, upstream reached: None when either is fine)
    ("http10-without-host", ["POST /v1/chat/completions HTTP/1.0", LENGTH], (200,), True),
    ("http11-without-host", [POST, CLOSE, LENGTH], (400,), False),
    ("two-hosts", [POST, HOST, "Host: evil.example", CLOSE, LENGTH], (400, 421), False),
    ("origin-null", [POST, HOST, "Origin: null", CLOSE, LENGTH], (403,), False),
    ("origin-empty", [POST, HOST, "Origin: ", CLOSE, LENGTH], (403,), False),
    (
        "origin-other-loopback-port",
        [POST, HOST, "Origin: http://127.0.0.1:3000", CLOSE, LENGTH],
        (403,),
        False,
    ),
    (
        "two-origins",
        [POST, HOST, "Origin: https://a.example", "Origin: https://b.example", CLOSE, LENGTH],
        (403,),
        False,
    ),
    (
        "preflight-null",
        [
            "OPTIONS /v1/chat/completions HTTP/1.1",
            HOST,
            "Origin: null",
            "Access-Control-Request-Method: POST",
            CLOSE,
            LENGTH,
        ],
        (403,),
        False,
    ),
    (
        "preflight-private-network",
        [
            "OPTIONS /v1/models HTTP/1.1",
            HOST,
            "Origin: https://evil.example",
            "Access-Control-Request-Method: GET",
            "Access-Control-Request-Private-Network: true",
            CLOSE,
            LENGTH,
        ],
        (403,),
        False,
    ),
    (
        "options-with-origin-no-acrm",
        [
            "OPTIONS /v1/chat/completions HTTP/1.1",
            HOST,
            "Origin: https://evil.example",
            CLOSE,
            LENGTH,
        ],
        (403,),
        False,
    ),
    ("cl-and-te", [POST, HOST, LENGTH, "Transfer-Encoding: chunked", CLOSE], (400,), False),
    ("two-content-lengths", [POST, HOST, LENGTH, "Content-Length: 5", CLOSE], (400,), False),
    ("cl-with-sign", [POST, HOST, "Content-Length: +{n}", CLOSE], (400,), False),
    ("cl-huge", [POST, HOST, "Content-Length: 99999999999999999999999", CLOSE], (400,), False),
    ("te-gzip", [POST, HOST, "Transfer-Encoding: gzip", CLOSE], (400,), False),
    ("te-chunked-gzip", [POST, HOST, "Transfer-Encoding: chunked, gzip", CLOSE], (400,), False),
    ("te-space-before-colon", [POST, HOST, "Transfer-Encoding : chunked", CLOSE], (400,), False),
    ("obs-fold", [POST, HOST, "X-A: a", " b", CLOSE, LENGTH], (400,), False),
    ("nul-in-header", [POST, HOST, "X-A: a\x00b", CLOSE, LENGTH], (400,), False),
    ("ce-upper-case", [POST, HOST, "Content-Encoding: GZIP", CLOSE, LENGTH], (415,), False),
    ("ce-chain", [POST, HOST, "Content-Encoding: identity, gzip", CLOSE, LENGTH], (415,), False),
    # Two lines are one list (RFC 9110 5.3): reading only the first let `deflate` through.
    (
        "ce-two-lines",
        [POST, HOST, "Content-Encoding: identity", "Content-Encoding: deflate", CLOSE, LENGTH],
        (415,),
        False,
    ),
    (
        "absolute-form-userinfo",
        ["POST http://localhost@evil.example/v1/chat/completions HTTP/1.1", HOST, CLOSE, LENGTH],
        (421,),
        False,
    ),
    (
        "absolute-form-bad-port",
        ["POST http://localhost:99999/v1/chat/completions HTTP/1.1", HOST, CLOSE, LENGTH],
        (400, 421),
        False,
    ),
    ("authority-form", ["POST localhost:80 HTTP/1.1", HOST, CLOSE, LENGTH], (400,), False),
    (
        "lower-case-method",
        ["post /v1/chat/completions HTTP/1.1", HOST, CLOSE, LENGTH],
        (400,),
        False,
    ),
    ("http2-preface", ["PRI * HTTP/2.0", "", "SM"], (400,), False),
    ("http-1.2", ["POST /v1/chat/completions HTTP/1.2", HOST, CLOSE, LENGTH], (400,), False),
]


@pytest.mark.parametrize(("name", "lines", "statuses", "reached"), HEADS, ids=[h[0] for h in HEADS])
async def test_request_heads_get_an_exact_answer(
    name: str,
    lines: list[str],
    statuses: tuple[int, ...],
    reached: bool | None,
    start_proxy: StartProxy,
    upstream: ScriptedUpstream,
    witness: Witness,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, _ = await proxy_for(start_proxy, upstream.base_url)
    body = chat_body()
    head = "\r\n".join(line.format(n=len(body)) for line in lines) + "\r\n\r\n"
    chunked = any("Transfer-Encoding" in line for line in lines)
    framed = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n" if chunked else body
    response = await exchange_raw(server.port, head.encode("latin-1") + framed)
    assert response.status in statuses
    if response.status >= 400:
        assert_openai_error(response)
    if reached is not None:
        assert bool(upstream.requests) == reached
    assert witness.connections == 0
    assert_clean_log(caplog)


# --- items 5, 6, 9: body members ------------------------------------------------------------

BODIES = [
    # (name, body, status, the model hangup records: the one the upstream's json reads)
    ("duplicate-model", b'{"model":"a","model":"b","messages":[]}', 200, "b"),
    ("escaped-duplicate-model", b'{"model":"a","mod\\u0065l":"b","messages":[]}', 200, "b"),
    ("bom", b'\xef\xbb\xbf{"model":"a","messages":[]}', 200, "a"),
    ("two-boms", b'\xef\xbb\xbf\xef\xbb\xbf{"model":"a","messages":[]}', 400, None),
    ("stream-as-string", b'{"model":"a","stream":"true","messages":[]}', 200, "a"),
    ("max-tokens-float", b'{"model":"a","max_tokens":1e18,"messages":[]}', 200, "a"),
    ("max-tokens-overflow", b'{"model":"a","max_tokens":1e400,"messages":[]}', 400, None),
    ("n-huge-integer", b'{"model":"a","n":' + b"9" * 5000 + b',"messages":[]}', 400, None),
    (
        "stream-options-twice",
        b'{"model":"a","stream":true,"stream_options":{},"stream_options":[1],"messages":[]}',
        200,
        "a",
    ),
    ("top-level-array", b'[{"model":"a"}]', 200, None),
    ("top-level-null", b"null", 200, None),
    ("only-whitespace", b"   ", 400, None),
    ("trailing-object", b'{"model":"a"}{"model":"b"}', 400, None),
    ("nan", b'{"model":"a","temperature":NaN}', 400, None),
    ("utf-16", '{"model":"a"}'.encode("utf-16"), 400, None),
]


@pytest.mark.parametrize(("name", "body", "status", "model"), BODIES, ids=[b[0] for b in BODIES])
async def test_body_members_are_read_as_the_upstream_reads_them(
    name: str,
    body: bytes,
    status: int,
    model: str | None,
    start_proxy: StartProxy,
    upstream: ScriptedUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, sink = await proxy_for(start_proxy, upstream.base_url)
    response = await exchange_raw(
        server.port, request_bytes("POST", "/v1/chat/completions", body=body)
    )
    assert response.status == status
    await sink.wait(lambda: sink.records, 5.0, "no record")
    (record,) = sink.records
    if status == 200:
        (seen,) = upstream.requests
        assert seen.body == body  # forwarded byte for byte
        if model is not None:
            assert json.loads(body.removeprefix(b"\xef\xbb\xbf"))["model"] == model
        assert record.model == model
    else:
        assert_openai_error(response)
        assert upstream.requests == []
    assert_clean_log(caplog)


# --- items 5, 7, 8: upstreams that break framing or echo the key ------------------------------

_K = KEY.encode()
_JSON = b"Content-Type: application/json\r\n"
UPSTREAM_REPLIES: dict[str, tuple[bytes, bool, int]] = {
    # name: (bytes the upstream sends, streamed request, status the client gets)
    "key-in-a-header-name": (
        b"HTTP/1.1 200 OK\r\nX-" + _K + b": 1\r\n" + json_head(len(OK_BODY))[17:] + OK_BODY,
        False,
        200,
    ),
    "key-in-one-of-two-set-cookies": (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a="
        + _K
        + b"\r\nSet-Cookie: b=kept\r\n"
        + json_head(len(OK_BODY))[17:]
        + OK_BODY,
        False,
        200,
    ),
    "key-in-location-of-a-302": (
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{witness}/?k="
        + _K
        + b"\r\nContent-Length: 0\r\n\r\n",
        False,
        302,
    ),
    "key-in-an-sse-error-event": (
        sse_head() + SSE_CONTENT + b'event: error\ndata: {"error":{"message":"' + _K + b'"}}\n\n',
        True,
        200,
    ),
    "100-then-200": (
        b"HTTP/1.1 100 Continue\r\n\r\n" + json_head(len(OK_BODY)) + OK_BODY,
        False,
        200,
    ),
    "103-then-200": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + json_head(len(OK_BODY)) + OK_BODY,
        False,
        200,
    ),
    "garbage-status-code": (b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n", False, 502),
    "garbage-status-line": (b"\x00\x01garbage\r\n\r\n", False, 502),
    "http-0.9-answer": (OK_BODY, False, 502),
    "200-kib-header": (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", False, 502),
    "5000-headers": (
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(5000)) + b"\r\n",
        False,
        502,
    ),
    "invalid-chunk-size-json": (
        b"HTTP/1.1 200 OK\r\n" + _JSON + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
        False,
        502,
    ),
    "content-length-and-chunked": (
        b"HTTP/1.1 200 OK\r\n"
        + _JSON
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(OK_BODY)
        + OK_BODY
        + b"\r\n0\r\n\r\n",
        False,
        502,
    ),
    "two-content-lengths": (
        b"HTTP/1.1 200 OK\r\n"
        + _JSON
        + b"Content-Length: %d\r\nContent-Length: 3\r\n\r\n" % len(OK_BODY)
        + OK_BODY,
        False,
        502,
    ),
    "204-with-a-body": (
        b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n0123456789",
        False,
        502,
    ),
    "compressed-sse-in-a-second-line": (
        sse_head("Content-Encoding: identity\r\nContent-Encoding: gzip\r\n") + SSE_CONTENT,
        True,
        502,
    ),
    # int() refuses over 4,300 digits: this was an internal_error and an ERROR traceback.
    "sse-retry-of-5000-digits": (
        sse_head() + b"retry: " + b"9" * 5000 + b"\n" + SSE_CONTENT + b"data: [DONE]\n\n",
        True,
        200,
    ),
    "8-mib-sse-line-without-newline": (
        sse_head() + SSE_CONTENT + b"data: " + b"x" * (8 << 20),
        True,
        200,
    ),
}


@pytest.mark.parametrize("name", list(UPSTREAM_REPLIES))
async def test_upstream_replies_get_an_exact_answer_and_stall_nothing(
    name: str,
    scripted: ScriptedUpstreams,
    start_proxy: StartProxy,
    witness: Witness,
    caplog: pytest.LogCaptureFixture,
) -> None:
    payload, stream, status = UPSTREAM_REPLIES[name]
    payload = payload.replace(b"{witness}", str(witness.port).encode())

    async def reply(seen: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    upstream = await scripted.start(reply)
    server, sink = await proxy_for(start_proxy, upstream.base_url)
    loop = asyncio.get_running_loop()
    request = request_bytes("POST", "/v1/chat/completions", body=chat_body(stream=stream))
    answer = asyncio.create_task(exchange_raw(server.port, request, timeout=10))
    slowest = 0.0
    while not answer.done():  # nothing else stalls: /healthz keeps answering meanwhile
        started = loop.time()
        health = await exchange_raw(server.port, request_bytes("GET", "/healthz"))
        assert health.status == 200
        slowest = max(slowest, loop.time() - started)
    response = await answer
    assert response.status == status
    if status >= 400:
        assert_openai_error(response)
    if name == "key-in-one-of-two-set-cookies":
        assert response.header("set-cookie") is not None
        assert ("Set-Cookie", "b=kept") in response.headers
    await sink.wait(lambda: sink.records, 5.0, "no record")
    assert _K not in response.raw
    assert KEY not in caplog.text
    assert slowest < 1.0
    assert witness.connections == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert len(sink.records) == 1
    relayed = [
        line
        for line in access_lines(caplog)
        if getattr(line, "fields", {}).get("path") == "/v1/chat/completions"
    ]
    assert len(relayed) == 1


# --- items 5, 7, 9: configured values that would fail every request ---------------------------

_UPSTREAM_DOC = """\
upstreams:
  up:
    base_url: http://127.0.0.1:9/v1
    {field}
routes: [{{name: default, upstream: up}}]
"""


@pytest.mark.parametrize(
    ("field", "value", "secret"),
    [
        ('api_key: "${V}"', "sk-from-a-file-0001\n", "sk-from-a-file-0001"),
        ('api_key: "${V}"', " sk-leading-space-0001", "sk-leading-space-0001"),
        ('api_key: "sk-literal-in-the-file-0001\\n"', "", "sk-literal-in-the-file-0001"),
        ('headers: {OpenAI-Organization: "${V}"}', "org-from-a-file-0001\r\n", "org-from-a-file"),
        ('headers: {X-Org: "${V}"}', "org-0001\r\nX-Injected: 1", "org-0001"),
        ('headers: {"X Org": "${V}"}', "org-value-0001", "org-value-0001"),
    ],
    ids=[
        "key-newline",
        "key-space",
        "literal-key-newline",
        "header-newline",
        "header-crlf",
        "name",
    ],
)
def test_an_unsendable_key_or_header_is_a_config_error_without_its_value(
    field: str, value: str, secret: str
) -> None:
    # Before: the config loaded, and every request was a 500 internal_error with an ERROR line
    # (aiohttp refuses the header when it sends it).
    with pytest.raises(ConfigError) as raised:
        parse_config(_UPSTREAM_DOC.format(field=field), env={"V": value})
    assert "upstreams.up." in str(raised.value)
    assert secret not in str(raised.value)
