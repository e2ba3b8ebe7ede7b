"""The type of a request body as hangup holds it from admission to the last resend."""

from __future__ import annotations

from typing import TypeAlias

# `bytes`, or for a large body the `bytearray` it grew in chunk by chunk as it arrived
# (`proxy/edge/body.py`): making one `bytes` of it would be a copy of the whole body (and a
# touch of as much fresh memory) in one step of the event loop, 40-55 ms for 60 MiB.
# Never changed once read: a hedge, a retry or a fallback resends it, accounting and the
# recorder read it after. As the union, mypy refuses item assignment and bytearray's mutating
# methods on it; code that needs a changed body builds a new one (`b"".join`, slices).
RequestBody: TypeAlias = bytes | bytearray
