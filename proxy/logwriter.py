"""Log lines formatted and written by a thread of their own, off the event loop.

`BackgroundHandler` takes each `LogRecord` from the logging call (a queue put, ~1 µs, on the
loop) and a writer thread formats it with the wrapped handler's formatter and writes it, in
batches: one `write` and one flush for all lines waiting when it wakes, not one each. It wakes
at most once every 50 ms while lines keep coming, so that under load it wakes ~20 times a
second whatever the request rate; a line after a quiet spell is written at once. Access lines
come already formatted (`emit_line`, from `proxy.access_line.log_record` or
`proxy.logs.log_access`), the former already encoded: its UTF-8 bytes go to the process's own
stderr or stdout below their text layer (`_utf8_buffer`), not decoded on the loop to be encoded
again here; any other stream gets their text.
Every line of the process goes through the same queue, so lines keep their order.

Bounded: at most `max_pending` records wait; past that, records are dropped (never the loop
blocked on a slow disk or pipe) and the writer says how many, in a line of its own, as soon as it
can. `flush()` waits until everything queued so far is written; `close()` (run by
`logging.shutdown()` at exit) writes everything left, then stops the thread.
"""

from __future__ import annotations

import codecs
import logging
import queue
import sys
import threading
import time
from typing import IO, Final, TextIO

__all__ = ["BackgroundHandler"]

# Batches start at least this far apart. A thread that wants the GIL takes it whenever the
# loop's thread lets it go, in every `recv`, `send` and `epoll_wait`: while the writer is awake,
# the loop waits for it at each of its syscalls. Waking for every few lines cost 22 us of CPU
# per access line under wrk at 50 connections, and 60 us on the writer plus ~80 us on the loop
# at 4 connections, where lines came too slowly to fill a batch of the earlier threshold (16
# lines) and every line woke the writer (measured with perf, by thread); batches 50 ms apart,
# 5 us. A line that comes after a quiet spell (none written for 50 ms) is written at once: a
# process killed right after a request still has its line out.
_BATCH_WAIT_S: Final = 0.05
_STOP: Final = object()


class _Marker:
    """Queued by `flush()`: set when the writer reaches it, i.e. everything before is out."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class BackgroundHandler(logging.Handler):
    flush_timeout_s = 5.0

    def __init__(self, target: logging.StreamHandler[TextIO], *, max_pending: int = 10_000) -> None:
        super().__init__()
        self.target = target
        self.max_pending = max_pending
        self.dropped = 0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="hangup-log-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        if self._queue.qsize() >= self.max_pending:
            self.dropped += 1  # read and reset by the writer thread only when it reports
            return
        if record.args:
            # Freeze the message now: its arguments may change after this call returns.
            record.msg, record.args = record.getMessage(), None
        self._queue.put(record)

    def emit_line(self, line: str | bytearray) -> None:
        """Queue a line already formatted by the caller (the access log's fast path, which
        builds its line from a dict without a `LogRecord`), as text or encoded in UTF-8 (a
        buffer the caller no longer touches); same order and bound as `emit`."""
        if self._queue.qsize() >= self.max_pending:
            self.dropped += 1
            return
        self._queue.put(line)

    def flush(self) -> None:
        """Until every record queued before this call is written (at most `flush_timeout_s`)."""
        if self._closed or not self._thread.is_alive():
            return
        marker = _Marker()
        self._queue.put(marker)
        marker.done.wait(self.flush_timeout_s)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(5.0)
            self.target.close()
        super().close()

    # --- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        q = self._queue
        reported = 0
        last_batch = -_BATCH_WAIT_S
        while True:
            items = [q.get()]
            since = time.monotonic() - last_batch
            if since < _BATCH_WAIT_S:
                time.sleep(_BATCH_WAIT_S - since)  # busy: let the batch gather
            last_batch = time.monotonic()
            while True:
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            lines: list[str | bytearray] = []
            encoded = False  # a line came as bytes
            markers: list[_Marker] = []
            stop = False
            dropped = self.dropped
            if dropped != reported:
                lines.append(self._dropped_line(dropped - reported))
                reported = dropped
            for item in items:
                if type(item) is str:
                    lines.append(item)
                elif type(item) is bytearray:
                    lines.append(item)
                    encoded = True
                elif item is _STOP:
                    stop = True
                elif isinstance(item, _Marker):
                    markers.append(item)
                elif isinstance(item, logging.LogRecord):
                    try:
                        lines.append(self.target.format(item))
                    except Exception:  # noqa: BLE001  # logging's own contract: report, go on
                        self.target.handleError(item)
            self._write(lines, encoded)
            for marker in markers:
                marker.done.set()
            if stop:
                return

    def _dropped_line(self, count: int) -> str:
        record = logging.LogRecord(
            "hangup.logs",
            logging.WARNING,
            __file__,
            0,
            f"log queue full: {count} log lines dropped",
            None,
            None,
        )
        return self.target.format(record)

    def _write(self, lines: list[str | bytearray], encoded: bool = False) -> None:
        if not lines:
            return
        stream = self.target.stream
        try:
            if not encoded:
                stream.write("\n".join(lines) + "\n")  # type: ignore[arg-type]  # all str
            elif (raw := _utf8_buffer(stream)) is not None:
                errors = stream.errors or "strict"
                data = b"\n".join(
                    [
                        line if isinstance(line, bytearray) else line.encode("utf-8", errors)
                        for line in lines
                    ]
                )
                stream.flush()  # what the text layer holds goes out first
                raw.write(data + b"\n")
                raw.flush()
                return
            else:
                text = [line if isinstance(line, str) else line.decode() for line in lines]
                stream.write("\n".join(text) + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # stderr gone (its reader exited, or closed): nowhere to tell it


def _utf8_buffer(stream: TextIO) -> IO[bytes] | None:
    """The bytes below `stream` when lines encoded in UTF-8 may be written there as they are:
    the process's own stderr or stdout (Python makes them with no newline translation on
    POSIX) encoding UTF-8. None for any other stream (a file or a test's capture, which may
    translate newlines or encode otherwise): its lines are written as text."""
    if stream is not sys.__stderr__ and stream is not sys.__stdout__:
        return None
    buffer: IO[bytes] | None = getattr(stream, "buffer", None)
    try:
        if buffer is None or codecs.lookup(stream.encoding).name != "utf-8":
            return None
    except (LookupError, TypeError):
        return None
    return buffer
