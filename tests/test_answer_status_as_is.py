"""`RELAYED_AS_IS`, the statuses `_attempts` relays without calling `check_status`, are
exactly those `check_status` answers with no body read and nothing decided (the general
path), even where a later target takes long contexts (which makes a 400 worth reading)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from multidict import CIMultiDict

from proxy.answer_status import RELAYED_AS_IS, PolicyFailed, check_status
from proxy.attempts import Attempt
from proxy.outcome import RequestRecord
from proxy.resilience.policy import Decision, Failure, Step
from proxy.targets import Chooser
from proxy.upstream import UpstreamResponse


@dataclass
class _Target:
    long_context: bool


@dataclass
class _TargetPlan:
    target: _Target


@dataclass
class _Plan:
    targets: tuple[_TargetPlan, ...]


@dataclass
class _Chooser:
    plan: _Plan
    decided: list[Failure] = field(default_factory=list)

    def decide(self, index: int, retries_here: int, failure: Failure) -> Decision:
        self.decided.append(failure)
        return Decision(Step.GIVE_UP, why="test")


@dataclass
class _Upstream:
    status: int
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    reads: int = 0

    async def read(self) -> bytes:
        self.reads += 1
        return b""


@dataclass
class _Record:
    attempts: list[Any] = field(default_factory=list)


async def _general_path_does_nothing(status: int) -> bool:
    """check_status on target 0 of two, the second taking long contexts: True when it
    returned b"" having read nothing and asked the policy nothing."""
    chooser = _Chooser(_Plan((_TargetPlan(_Target(False)), _TargetPlan(_Target(True)))))
    upstream = _Upstream(status)
    attempt = Attempt("u", "m", 0.0, "primary")
    try:
        prefix = await check_status(
            cast(Chooser, chooser),
            cast(RequestRecord, _Record()),
            0,
            attempt,
            cast(UpstreamResponse, upstream),
        )
    except PolicyFailed:
        return False
    return prefix == b"" and upstream.reads == 0 and not chooser.decided


async def test_relayed_as_is_is_what_check_status_leaves_alone() -> None:
    for status in range(100, 600):
        assert (status in RELAYED_AS_IS) is await _general_path_does_nothing(status), status
    assert 200 in RELAYED_AS_IS and 400 not in RELAYED_AS_IS and 429 not in RELAYED_AS_IS
