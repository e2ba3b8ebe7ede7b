"""Responses API wire shapes: the event stream and the response object.

Events are ``event: <type>`` + ``data: {"type": <type>, "sequence_number": n, ...}``, in
OpenAI's order: ``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, one ``response.output_text.delta`` per token,
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``,
then ``response.completed`` (or ``response.incomplete`` with
``incomplete_details.reason = "max_output_tokens"`` when the cap cut the answer, as OpenAI does).
Reasoning tokens are not streamed, only billed in ``output_tokens_details.reasoning_tokens``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from proxy.sim.errors import error_payload
from proxy.sim.formats import Counting, dumps, new_id
from proxy.sim.tokens import Plan, completion_text, json_word, responses_usage

ResponseStatus = Literal["queued", "in_progress", "completed", "incomplete", "cancelled", "failed"]
_ITEM_STATUS: dict[str, str] = {
    "queued": "in_progress",
    "in_progress": "in_progress",
    "completed": "completed",
    "incomplete": "incomplete",
    "cancelled": "incomplete",
    "failed": "incomplete",
}


class ResponsesStream(Counting):
    """Responses API events; also the response object that GET /v1/responses/{id} returns."""

    def __init__(
        self, *, model: str, plan: Plan, body: dict[str, Any], background: bool = False
    ) -> None:
        super().__init__(plan)
        self.id = new_id("resp_")
        self.item_id = new_id("msg_")
        self.created_at = int(time.time())
        self.model = model
        self.background = background
        self._max_output = body.get("max_output_tokens")
        instructions = body.get("instructions")
        self._instructions = instructions if isinstance(instructions, str) else None
        self._seq = 0
        self._delta_pre = (
            'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            '"sequence_number":'
        )
        self._delta_mid = f',"item_id":"{self.item_id}","output_index":0,"content_index":0,"delta":'

    @property
    def final_status(self) -> ResponseStatus:
        return "incomplete" if self.plan.finish_reason == "length" else "completed"

    def usage(self) -> dict[str, Any]:
        return responses_usage(self.plan, self.reasoning_n, self.content_n)

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return f"event: {kind}\ndata: {dumps(data)}\n\n".encode()

    def _part(self) -> dict[str, Any]:
        text = completion_text(self.content_n)
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, status: str) -> dict[str, Any]:
        content = [self._part()] if status != "in_progress" or self.content_n else []
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response_object(self, status: ResponseStatus) -> dict[str, Any]:
        done = status in ("completed", "incomplete")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": self.background,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": self._instructions,
            "max_output_tokens": self._max_output,
            "model": self.model,
            "output": [self._item(_ITEM_STATUS[status])] if done or self.content_n else [],
            # Cancelled and failed answers still bill what was generated.
            "usage": self.usage() if status not in ("queued", "in_progress") else None,
        }

    def head(self) -> list[bytes]:
        first: ResponseStatus = "queued" if self.background else "in_progress"
        return [
            self._event("response.created", {"response": self.response_object(first)}),
            self._event("response.in_progress", {"response": self.response_object("in_progress")}),
            self._event(
                "response.output_item.added", {"output_index": 0, "item": self._item("in_progress")}
            ),
            self._event(
                "response.content_part.added",
                {
                    "item_id": self.item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                },
            ),
        ]

    def empty(self) -> bytes:
        return self._delta('""')

    def _delta(self, piece: str) -> bytes:
        seq = self._seq
        self._seq += 1
        return f'{self._delta_pre}{seq}{self._delta_mid}{piece},"logprobs":[]}}\n\n'.encode()

    def reasoning(self, i: int) -> bytes | None:
        # OpenAI does not stream raw reasoning; it only bills it (output_tokens_details).
        self.reasoning_n += 1
        return None

    def content(self, i: int) -> bytes:
        self.content_n += 1
        return self._delta(json_word(i))

    def tail(self) -> list[bytes]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        part = self._part()
        final = self.final_status
        return [
            self._event(
                "response.output_text.done", {**where, "text": part["text"], "logprobs": []}
            ),
            self._event("response.content_part.done", {**where, "part": part}),
            self._event(
                "response.output_item.done",
                {"output_index": 0, "item": self._item(_ITEM_STATUS[final])},
            ),
            self._event(f"response.{final}", {"response": self.response_object(final)}),
        ]

    def error(self, status: int, message: str) -> bytes:
        err: Any = error_payload(status, message)["error"]
        return self._event(
            "error", {"code": err["code"] or err["type"], "message": message, "param": None}
        )

    def malformed(self) -> bytes:
        self._seq += 1  # it stands for one event, so resumption by sequence_number stays aligned
        return b"event: response.output_text.delta\ndata: {not json\n\n"
