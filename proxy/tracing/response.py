"""What a non-streamed answer says about itself, for traces: the model that answered and why it
stopped (`gen_ai.response.model`, `gen_ai.response.finish_reasons`). Streams get these from the
usage tracker as they pass; a whole JSON body is read here, once the request has ended, and only
for requests whose trace is sampled (nothing else needs it)."""

from __future__ import annotations

import json
from typing import Final

from proxy.outcome import RequestRecord
from proxy.usage.body import _decode as decode_body

# Above this the answer is not parsed a second time on the event loop (accounting already did
# once); the two attributes are then absent.
MAX_BODY: Final = 256 * 1024
_TEXT_MAX: Final = 256


def note_response_body(record: RequestRecord, body: bytes, content_encoding: str | None) -> None:
    if len(body) > MAX_BODY:
        return
    decoded = decode_body(body, content_encoding)
    if decoded is None:
        return
    try:
        obj = json.loads(decoded)
    except ValueError:
        return
    if not isinstance(obj, dict):
        return
    model = obj.get("model")
    if isinstance(model, str):
        record.response_model = model[:_TEXT_MAX]
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if isinstance(reason, str):
            record.finish_reason = reason[:_TEXT_MAX]
