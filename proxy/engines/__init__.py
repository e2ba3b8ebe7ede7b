"""Engine protocols: how hangup names a request at the engine and tells the engine to stop it.

`upstreams.<name>.engine` picks the protocol (`proxy.engines.protocols`); `EngineAborts`
(`proxy.engines.aborts`) makes the calls, off the request's path, after the socket close. The
Responses API background cancel (`proxy.engines.background`) is one case of the same calls.
User documentation: docs/cancellation.md.
"""

from proxy.engines.aborts import EngineAborts
from proxy.engines.protocols import AbortCall, Engine, Named, engine_for

__all__ = ["AbortCall", "Engine", "EngineAborts", "Named", "engine_for"]
