"""What each kind of upstream offers to stop a request: how hangup names the request, and the
abort call that names it again (pure: no I/O; `proxy.engines.aborts` makes the calls).

Checked against the engines' own source; versions and commits are in docs/cancellation.md.

- `sglang`: `rid` in the body of /v1/chat/completions and /v1/completions; abort with
  `POST /abort_request {"rid": ...}`, which answers 200 whether or not the rid is running.
  Not named (so never aborted): a body with its own `rid` (kept as the client sent it), and
  `n > 1`, whose samples SGLang runs as `<rid>_<i>` while its tokenizer manager only forwards
  an abort whose rid it runs exactly.
- `vllm`: the `X-Request-Id` header; the engine runs a chat completion as `chatcmpl-<id>`.
  Abort with `POST /abort_requests {"request_ids": [...]}`, which plain `vllm serve` does not
  have (only `--tokens-only` or `VLLM_SERVER_DEV_MODE=1`): its 404 turns the abort off for that
  upstream. vLLM stops on a closed socket itself. Legacy completions are not named: vLLM runs
  each of their prompts as `cmpl-<id>-<i>`, one id per prompt of a batch.
- `generic`, `openai`, `llamacpp`: nothing to name; a closed socket is the signal. (llama.cpp's
  server has no per-request cancel endpoint and stops on close; OpenAI has no abort for
  ordinary requests.) The Responses API background cancel applies to every kind.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol

import msgspec
from multidict import CIMultiDict
from yarl import URL

from proxy.config import Engine as EngineName
from proxy.engines.naming import (
    append_member,
    append_member_in_steps,
    fresh_id,
    has_member,
    has_member_in_steps,
)
from proxy.request_body import RequestBody
from proxy.stream_options import STEP_BYTES
from proxy.usage import RequestFacts

_NAMED_ENDPOINTS = frozenset({"chat.completions", "completions"})
# The headers of the original request an abort call carries: who may call (credentials) and
# nothing about the original body.
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")


class Named(msgspec.Struct, frozen=True):
    """One upstream attempt as it is sent: its body and headers, and the id the engine runs it
    under (None: not named, so there is nothing to abort by)."""

    body: RequestBody
    headers: CIMultiDict[str]
    engine_id: str | None = None


@dataclass(frozen=True, slots=True)
class AbortCall:
    url: URL
    body: bytes  # JSON


class Engine(Protocol):
    @property
    def name(self) -> EngineName: ...

    @property
    def aborts(self) -> bool:
        """Whether this kind of upstream has an abort call hangup makes."""
        ...

    def name_attempt(
        self, facts: RequestFacts, body: RequestBody, headers: CIMultiDict[str]
    ) -> Named:
        """The attempt to send: named when the engine can abort it by name."""
        ...

    def abort_call(self, base_url: str, engine_id: str) -> AbortCall:
        """The call that tells the engine to stop `engine_id`."""
        ...


def server_root(base_url: str) -> URL:
    """Engines serve their own endpoints beside /v1, not under it."""
    url = URL(base_url)
    path = url.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return url.with_path(path or "/")


def _endpoint(base_url: str, name: str) -> URL:
    root = server_root(base_url)
    return root.with_path(root.path.rstrip("/") + "/" + name)


@dataclass(frozen=True, slots=True)
class ClosesOnly:
    """An upstream whose only stop signal is the closed socket."""

    name: EngineName
    aborts: bool = False

    def name_attempt(
        self, facts: RequestFacts, body: RequestBody, headers: CIMultiDict[str]
    ) -> Named:
        return Named(body, headers)

    def abort_call(self, base_url: str, engine_id: str) -> AbortCall:
        raise NotImplementedError(f"{self.name} upstreams have no abort call")


@dataclass(frozen=True, slots=True)
class SGLang:
    name: EngineName = "sglang"
    aborts: bool = True

    def name_attempt(
        self, facts: RequestFacts, body: RequestBody, headers: CIMultiDict[str]
    ) -> Named:
        if facts.endpoint not in _NAMED_ENDPOINTS or facts.n != 1 or has_member(body, "rid"):
            return Named(body, headers)
        rid = fresh_id()
        named = append_member(body, "rid", rid)
        if named is None:
            return Named(body, headers)
        return Named(named, headers, rid)

    def name_attempt_in_steps(
        self,
        facts: RequestFacts,
        body: RequestBody,
        headers: CIMultiDict[str],
        *,
        step: int = STEP_BYTES,
    ) -> Generator[None, None, Named]:
        """`name_attempt` for a large body, a bounded step at a time (the same answer)."""
        if facts.endpoint not in _NAMED_ENDPOINTS or facts.n != 1:
            return Named(body, headers)
        if (yield from has_member_in_steps(body, "rid", step=step)):
            return Named(body, headers)
        rid = fresh_id()
        named = yield from append_member_in_steps(body, "rid", rid, step=step)
        if named is None:
            return Named(body, headers)
        return Named(named, headers, rid)

    def abort_call(self, base_url: str, engine_id: str) -> AbortCall:
        return AbortCall(
            _endpoint(base_url, "abort_request"), json.dumps({"rid": engine_id}).encode()
        )


@dataclass(frozen=True, slots=True)
class VLLM:
    name: EngineName = "vllm"
    aborts: bool = True

    def name_attempt(
        self, facts: RequestFacts, body: RequestBody, headers: CIMultiDict[str]
    ) -> Named:
        if facts.endpoint != "chat.completions":
            return Named(body, headers)
        request_id = fresh_id()
        named_headers = headers.copy()
        # Ours, not the client's: the engine id must be unique for an abort to name only this
        # request. hangup's access log keeps both.
        named_headers["x-request-id"] = request_id
        return Named(body, named_headers, "chatcmpl-" + request_id)

    def abort_call(self, base_url: str, engine_id: str) -> AbortCall:
        payload = json.dumps({"request_ids": [engine_id]}).encode()
        return AbortCall(_endpoint(base_url, "abort_requests"), payload)


ENGINES: dict[EngineName, Engine] = {
    "generic": ClosesOnly("generic"),
    "openai": ClosesOnly("openai"),
    "llamacpp": ClosesOnly("llamacpp"),
    "sglang": SGLang(),
    "vllm": VLLM(),
}


def engine_for(name: EngineName) -> Engine:
    return ENGINES[name]
