"""The embedded simulated provider: an OpenAI-compatible server that records what it saw.

Used by ``hangup demo`` (no API key needed), as the test suite's fake upstream and by the
benchmarks. Behaviours are chosen per request by the model name (see `proxy.sim.behaviour`);
records and bounded waits are described in `proxy.sim.recorder`; ``python -m proxy.sim`` runs
it standalone. User documentation: ``docs/simulator.md``.
"""

from proxy.sim.background import BackgroundJob, CancelCall
from proxy.sim.behaviour import Behaviour, BehaviourError, parse_behaviour
from proxy.sim.provider import SimulatedProvider, build_app
from proxy.sim.records import ConnectionRecord, RequestRecord, key_fingerprint
from proxy.sim.tokens import completion_text, prompt_tokens

__all__ = [
    "BackgroundJob",
    "Behaviour",
    "BehaviourError",
    "CancelCall",
    "ConnectionRecord",
    "RequestRecord",
    "SimulatedProvider",
    "build_app",
    "completion_text",
    "key_fingerprint",
    "parse_behaviour",
    "prompt_tokens",
]
