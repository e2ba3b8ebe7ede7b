"""A connection's requests handled in the connection's own task, not in a task each.

aiohttp's `RequestHandler.start` runs every request's handler in a new task (its reason: each
handler gets a copy of the context variables, aiohttp#3406). On Python 3.11 such a task's
first step waits for the loop's next iteration, and its end wakes the connection's task in
one more: two loop iterations (each an `epoll_wait` and the loop's bookkeeping), two handles,
a `Task` and its context copy, and asyncio's all-tasks `WeakSet` entry (and its removal
callback), for every request. hangup sets no context variable in a handler
(proxy/bare_context.py is the one context it makes, and it is never entered by a request),
so the handler is awaited in the connection's task instead: the same `_handle_request`
coroutine, the same exceptions handled where aiohttp handles them, the same cancellation (a
client's disconnect cancels the connection's task, which is the handler's now; the watchdog
cancels the task the handler runs in, and `Watchdog.consume` withdraws that cancel, so the
next request on the connection starts with none).

`start` is aiohttp 3.14's own loop with that one change, and the lingering read after an
unread body left out (`proxy.edge.runner` turns lingering off; a handler with a
`lingering_time` runs aiohttp's own loop). tests/test_inline_handler.py checks that requests
are served in the connection's task, that each of a connection's requests gets its own
deadline, and that a client's disconnect still cancels its request; keep-alive, pipelining
and parse errors are the hostile-connection tests' (tests/test_hostile_*.py).
"""

from __future__ import annotations

import asyncio

from aiohttp.http import StreamWriter
from aiohttp.web_protocol import _PAYLOAD_ACCESS_ERROR, ERROR, _ErrInfo

from proxy.unparsed import OpenAIErrorHandler


class InlineRequestHandler(OpenAIErrorHandler):
    """aiohttp's request handler whose requests run in the connection's task."""

    __slots__ = ()

    async def start(self) -> None:
        """aiohttp's `RequestHandler.start`, each handler awaited in this task (module
        docstring)."""
        if self._lingering_time:  # (proxy.edge.runner sets none: aiohttp's loop reads it)
            await super().start()
            return
        loop = self._loop
        manager = self._manager
        assert manager is not None
        keepalive_timeout = self._keepalive_timeout
        resp = None
        assert self._request_factory is not None
        assert self._request_handler is not None

        while not self._force_close:
            if not self._messages:
                try:
                    # wait for next request
                    self._waiter = loop.create_future()
                    await self._waiter
                finally:
                    self._waiter = None

            message, payload = self._messages.popleft()

            # Free a parser slot; resume reading once drained to low water so pipelining
            # keeps flowing while this request is handled.
            if self._parser is not None:
                self._parser.message_consumed()
            if self._buffer_paused and len(self._messages) <= self._msg_queue_resume_size:
                self._resume_reading_if_drained()

            start = loop.time() if self._logging_enabled else None

            manager.requests_count += 1
            writer = StreamWriter(self, loop)
            if isinstance(message, _ErrInfo):
                # make request_factory work
                request_handler = self._make_error_handler(message)
                message = ERROR
            else:
                request_handler = self._request_handler

            task = self._task_handler
            assert task is not None  # (this coroutine runs in it)
            request = self._request_factory(message, payload, self, writer, task)
            try:
                try:
                    resp, reset = await self._handle_request(request, start, request_handler)
                except ConnectionError:
                    self.log_debug("Ignored premature client disconnection")
                    break

                if reset:
                    self.log_debug("Ignored premature client disconnection 2")
                    break

                # notify server about keep-alive
                self._keepalive = bool(resp.keep_alive)

                # An unread body: the handler closed the connection after its answer
                # (`GuardedRequestHandler.finish_response`); nothing is read of it.
                if not payload.is_eof() and not self._force_close:
                    self.log_debug("Uncompleted request.")
                    self.close()

                payload.set_exception(_PAYLOAD_ACCESS_ERROR)

            except asyncio.CancelledError:
                self.log_debug("Ignored premature client disconnection")
                self.force_close()
                raise
            except Exception as exc:  # noqa: BLE001 (aiohttp's own: logged, connection closed)
                self.log_exception("Unhandled exception", exc_info=exc)
                self.force_close()
            except BaseException:
                self.force_close()
                raise
            finally:
                request._task = None  # type: ignore[assignment]  # (a reference cycle)
                if self.transport is None and resp is not None:
                    self.log_debug("Ignored premature client disconnection.")

            if self._keepalive and not self._close and not self._force_close:
                # start keep-alive timer
                close_time = loop.time() + keepalive_timeout
                self._next_keepalive_close_time = close_time
                if self._keepalive_handle is None:
                    self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
            else:
                break

        # remove handler, close transport if no handlers left
        if not self._force_close:
            self._task_handler = None
            if self.transport is not None:
                self.transport.close()
