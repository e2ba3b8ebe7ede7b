"""One empty context for the loop callbacks hangup schedules that read no context variable.

asyncio copies the current context for every `call_at`, `call_soon` and `add_done_callback`
given none: a new `Context` object (~64 B) for each, kept until the callback runs. A
deadline's timer and a connection's close watch live as long as a held stream, so they run in
this shared one instead. Only for callbacks that neither read nor set a context variable and
never run another callback of their own synchronously (a context is entered once at a time).
"""

from __future__ import annotations

import contextvars
from typing import Final

BARE_CONTEXT: Final = contextvars.Context()
