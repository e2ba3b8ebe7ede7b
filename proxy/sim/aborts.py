"""Engine abort endpoints, with the engines' own semantics, and what they stopped.

The simulator can pretend to be an engine that names requests and stops them by name
(``SimulatedProvider(engine=...)``):

- ``sglang``: a request's id is the ``rid`` of its JSON body (a fresh 32-hex id when absent).
  ``POST /abort_request {"rid": R}`` stops every running request whose rid starts with R
  (SGLang matches by prefix; an empty rid stops nothing), ``{"abort_all": true}`` stops them
  all, and the answer is 200 with an empty body whether or not anything matched.
- ``vllm``: a request's id is ``chatcmpl-<X-Request-Id>`` (chat) or ``cmpl-<X-Request-Id>-0``
  (completions: vLLM runs prompt i of a batch as ``-<i>``; the simulator takes one prompt).
  ``POST /abort_requests {"request_ids": [...]}`` exists only when
  ``vllm_abort_endpoint=True`` (vLLM serves it with ``--tokens-only`` or in dev mode; plain
  ``vllm serve`` answers 404); it stops exact ids and answers 200 with
  ``{"cancelled_request_ids": [...]}``.

Every abort call is recorded (`AbortCall`) with its arrival time and what it stopped, and each
stopped request records ``aborted_at`` and the tokens generated at that moment, so a test can
tell a stop by abort from a stop by the socket close. `fault` makes the endpoint misbehave on
purpose: ``404``, ``405``, ``500``, ``reset`` (RST every time), ``reset-once`` (RST the first
call only) or ``hang`` (never answer).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.sim.records import RequestRecord
from proxy.sim.waiters import Waiters

SimEngine = Literal["openai", "sglang", "vllm"]
AbortFault = Literal["404", "405", "500", "reset", "reset-once", "hang"]


@dataclass(eq=False, slots=True)
class AbortCall:
    at: float  # time.monotonic() when the call arrived
    path: str
    ids: list[str]  # the rid (sglang) or request_ids (vllm) it named
    abort_all: bool
    auth_fingerprint: str | None
    fault: AbortFault | None = None  # how the endpoint misbehaved on this call, if it did
    stopped: list[str] = field(default_factory=list)  # engine ids it stopped

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "path": self.path,
            "ids": list(self.ids),
            "abort_all": self.abort_all,
            "auth_fingerprint": self.auth_fingerprint,
            "fault": self.fault,
            "stopped": list(self.stopped),
        }


class EngineAborts:
    """Running generations by engine id, and the abort calls that stop them."""

    def __init__(self, engine: SimEngine, waiters: Waiters) -> None:
        self.engine = engine
        self.waiters = waiters
        self.fault: AbortFault | None = None
        self.calls: list[AbortCall] = []
        self._running: dict[str, tuple[RequestRecord, asyncio.Future[Any]]] = {}
        self._faulted = 0

    def engine_id(self, endpoint: str, body: dict[str, Any], headers: dict[str, str]) -> str | None:
        """The id the engine runs a generation request under (None: it names none)."""
        if self.engine == "sglang":
            rid = body.get("rid")
            return rid if isinstance(rid, str) and rid else uuid.uuid4().hex
        if self.engine == "vllm":
            base = headers.get("x-request-id") or uuid.uuid4().hex
            return f"chatcmpl-{base}" if endpoint == "chat" else f"cmpl-{base}-0"
        return None

    def register(self, rec: RequestRecord, generation: asyncio.Future[Any]) -> None:
        if rec.engine_id is not None:
            self._running[rec.engine_id] = (rec, generation)

    def unregister(self, rec: RequestRecord) -> None:
        if rec.engine_id is not None and self._running.get(rec.engine_id, (None,))[0] is rec:
            del self._running[rec.engine_id]

    def arrived(self, call: AbortCall) -> None:
        """Record a call the moment it arrives (before a fault or an answer)."""
        self.calls.append(call)
        self.waiters.notify(("abort",))

    def abort(self, call: AbortCall, match: Any) -> None:
        """Stop every running generation whose engine id `match(id)` accepts."""
        now = time.monotonic()
        for engine_id, (rec, generation) in list(self._running.items()):
            if not match(engine_id):
                continue
            rec.aborted_at = now
            rec.generated_at_abort = rec.progress.generated
            generation.cancel()
            call.stopped.append(engine_id)

    def next_fault(self) -> AbortFault | None:
        fault = self.fault
        if fault == "reset-once":
            self._faulted += 1
            return "reset" if self._faulted == 1 else None
        return fault

    async def wait_call(self, count: int = 1, timeout: float = 5.0) -> AbortCall:  # noqa: ASYNC109
        """The `count`-th abort call, once it has arrived."""
        return await self.waiters.until(
            ("abort",),
            lambda: self.calls[count - 1] if len(self.calls) >= count else None,
            timeout,
            f"abort call #{count}",
        )
