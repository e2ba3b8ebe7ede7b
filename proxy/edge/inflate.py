"""Sans-I/O, bounded decoding of a compressed request body: `feed(chunk) -> bytes`, `finish()`.

Pure and synchronous: the caller runs `feed` off the event loop (zlib releases the GIL while it
inflates). Every call does bounded work: it never produces more than the remaining allowance,
so a deflate bomb costs at most `max_size` bytes of output, and usually far less, since the
ratio bound stops it after a few MiB.
"""

from __future__ import annotations

import zlib

# Below this much output the ratio is not judged: tiny bodies compress unevenly.
RATIO_GRACE_BYTES = 1024 * 1024


class InflateError(Exception):
    """The body is not valid data in its declared encoding."""


class InflateLimit(Exception):
    """The inflated body would exceed a bound; `what` names the bound for the message."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def parse_encoding(header: str | None) -> str | None:
    """The one coding a request body uses: None for identity, else its lowercase name.

    Several codings ("gzip, deflate") come back joined, so the caller refuses them whole:
    stacked codings are a bomb multiplier and no SDK sends them."""
    if header is None:
        return None
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if codings == ["x-gzip"]:
        return "gzip"
    return ", ".join(codings)


class Inflater:
    def __init__(self, encoding: str, *, max_size: int, max_ratio: float) -> None:
        if encoding not in ("gzip", "deflate"):
            raise ValueError(f"unsupported encoding {encoding!r}")
        self.encoding = encoding
        self.max_size = max_size
        self.max_ratio = max_ratio
        self.compressed = 0
        self.inflated = 0
        self._decoder: zlib._Decompress | None = None
        self._head = b""  # deflate: the first bytes, to tell zlib-wrapped from raw

    def _start(self, first: bytes) -> zlib._Decompress:
        if self.encoding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # RFC 9110 says zlib-wrapped; some clients send raw deflate. The zlib header's first
        # byte has compression method 8 in its low nibble.
        wbits = zlib.MAX_WBITS if first[0] & 0x0F == 8 else -zlib.MAX_WBITS
        return zlib.decompressobj(wbits)

    def _allowance(self) -> int:
        by_size = self.max_size - self.inflated
        by_ratio = max(RATIO_GRACE_BYTES, int(self.compressed * self.max_ratio)) - self.inflated
        # One byte over either bound is enough to know the body breaks it.
        return max(1, min(by_size, by_ratio) + 1)

    def _check(self) -> None:
        if self.inflated > self.max_size:
            raise InflateLimit("size")
        if self.inflated > RATIO_GRACE_BYTES and self.inflated > self.compressed * self.max_ratio:
            raise InflateLimit("ratio")

    def feed(self, chunk: bytes) -> bytes:
        """Inflate one chunk of the wire body; raise InflateLimit / InflateError."""
        if not chunk:
            return b""
        self.compressed += len(chunk)
        if self._decoder is None:
            self._decoder = self._start(chunk)
        decoder = self._decoder
        out: list[bytes] = []
        data = chunk
        while data:
            if decoder.eof:
                raise InflateError("data after the end of the compressed stream")
            try:
                piece = decoder.decompress(data, self._allowance())
            except zlib.error as exc:
                raise InflateError(str(exc)) from exc
            self.inflated += len(piece)
            out.append(piece)
            self._check()
            data = decoder.unconsumed_tail
            if not piece and data:  # no progress possible (cannot happen with zlib; be safe)
                raise InflateError("the decoder made no progress")
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of the wire body: the stream must be complete."""
        if self._decoder is None:
            return b""  # an empty body
        if not self._decoder.eof:
            raise InflateError("the compressed stream is truncated")
        if self._decoder.unused_data:
            raise InflateError("data after the end of the compressed stream")
        return b""
