"""A large request body written to the upstream a slice at a time, without a copy.

aiohttp writes a `bytes` body in one transport write, and asyncio's transport (Python 3.11)
copies whatever the socket does not take at once into its buffer: for a 60 MiB body, one
30-40 ms step. An `io.BytesIO` is written in chunks, but aiohttp's payload for it calls
`getbuffer()`, which un-shares the body: a 60 MiB copy in one step, 33 ms in bench.looplag.
Here each slice is a memoryview of the body, and aiohttp's writer drains between slices.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from proxy.request_body import RequestBody

SLICE_BYTES: Final = 256 * 1024


class BodyInSlices(Payload):
    _value: RequestBody

    def __init__(self, body: RequestBody, **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self._size = len(body)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._value.decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return bytes(self._value)  # aiohttp calls it only to log or trace a body

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        for start in range(0, len(view), SLICE_BYTES):
            if start:
                await asyncio.sleep(0)  # the writer drains only past its limit
            await writer.write(view[start : start + SLICE_BYTES])
