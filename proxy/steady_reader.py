"""The upstream body's reader while a stream is steady: a read that is one event of the last
content chunk's shape goes to the client from the parser's own callback, without waking the
pump.

Each read of a generating stream otherwise takes a round through the loop before the pump
sees it: aiohttp's reader buffers it and resolves the pump's waiter, a handle is scheduled,
the pump's task steps, `readany` takes the bytes back out of the buffer (~400 bytecodes a read
measured with bench.bytecodes, a waiter future and two handles made, all of it before any of
hangup's own work). While the pump waits in `readany` with nothing buffered, the read it would
take next is this one: `feed_data` offers it to the exchange (proxy/steady_relay.py's
`SteadyRelay.take_steady`), which does what the pump's steady read does and, at the end of the
upstream's read (the upstream protocol's `data_received`), writes what it took of that read in
one write; or refuses it (anything but the usual read, a client not keeping up, a deadline's
phase change) and the read is buffered as aiohttp buffers it, to wake the pump as before.
Reads keep their order: one taken here is never behind a buffered one.

The parser makes aiohttp's `StreamReader`, which the upstream protocol turns into
proxy/upstream_body.py's `BodyReader`; the exchange turns that into this class (`__class__`,
the same slots) once its stream is steady. tests/test_sse_steady.py holds the two ways equal.
"""

from __future__ import annotations

from typing import Protocol

from proxy.upstream_body import BodyReader

__all__ = ["SteadyReader", "SteadySink"]


class SteadySink(Protocol):
    """What a steady reader offers its reads to (the upstream protocol's `steady_sink`)."""

    def take_steady(self, chunk: bytes) -> bool:
        """Relay `chunk` now (True), or leave it to the pump (False: nothing was changed)."""
        ...

    def flush_steady(self) -> None:
        """The upstream's read is over: write what was taken of it."""
        ...


class SteadyReader(BodyReader):
    """hangup's body reader, offering a read the pump would take next to the exchange first.
    (`BodyReader` keeps no HTTP chunk boundaries, so a chunk taken here wakes nobody.)"""

    __slots__ = ()  # aiohttp's slots only: an instance may be turned into this class

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        sink: SteadySink | None = self._protocol.steady_sink  # type: ignore[attr-defined]
        if sink is not None and not self._buffer:
            waiter = self._waiter
            if waiter is not None and not waiter.done() and data and sink.take_steady(data):
                # As if fed and read at once: the count aiohttp keeps of both moves alike.
                self.total_bytes += len(data)
                return False
        return super().feed_data(data, size)
