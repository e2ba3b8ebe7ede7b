"""`Chooser.first` and `next_available` skip the clock and the breakers when the answer does
not depend on them (a route's only target, the last target): the same answers as the loop over
the circuits, for every mix of circuit states."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import cast

import pytest

from proxy.admission import Plan
from proxy.resilience.circuit import Circuit, Circuits, CircuitState
from proxy.targets import Chooser

COOLDOWN_S = 30.0
NOW = 1000.0


@dataclass
class _Options:
    circuit_failures: int = 3
    circuit_cooldown_s: float = COOLDOWN_S


@dataclass
class _Route:
    options: _Options


@dataclass
class _Target:
    upstream_name: str


@dataclass
class _Plan:
    route: _Route
    targets: tuple[_Target, ...]


class _Clock:
    """The loop's clock, counted: a read where the answer does not need one is a regression."""

    def __init__(self) -> None:
        self.reads = 0

    def time(self) -> float:
        self.reads += 1
        return NOW


STATES = {
    "closed": Circuit(3, COOLDOWN_S),
    "open": Circuit(3, COOLDOWN_S, state=CircuitState.OPEN, opened_at=NOW - 1),
    "cooled": Circuit(3, COOLDOWN_S, state=CircuitState.OPEN, opened_at=NOW - COOLDOWN_S),
    "probing": Circuit(3, COOLDOWN_S, state=CircuitState.HALF_OPEN, probing=True),
}


def _chooser(states: tuple[str, ...]) -> tuple[Chooser, list[Circuit], _Clock]:
    circuits = Circuits()
    made = []
    for i, name in enumerate(states):
        circuit = circuits.get(f"u{i}", 3, COOLDOWN_S)
        template = STATES[name]
        circuit.state, circuit.opened_at = template.state, template.opened_at
        circuit.probing = template.probing
        made.append(circuit)
    plan = _Plan(_Route(_Options()), tuple(_Target(f"u{i}") for i in range(len(states))))
    clock = _Clock()
    return Chooser(cast(Plan, plan), circuits, clock), made, clock  # type: ignore[arg-type]


def _loop_over(circuits: list[Circuit], index: int) -> int | None:
    """The general path, spelled out: the first target after `index` its circuit allows."""
    allowed = (j for j in range(index + 1, len(circuits)) if circuits[j].would_allow(NOW))
    return next(allowed, None)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_choice_is_the_loop_over_the_circuits(count: int) -> None:
    for states in itertools.product(STATES, repeat=count):
        chooser, circuits, _ = _chooser(states)
        assert chooser.first() == (_loop_over(circuits, -1) or 0), states
        for index in range(count):
            expected = _loop_over(circuits, index)
            assert chooser.next_available(index) == expected, (states, index)
            assert chooser.can_switch(index) is (expected is not None)


def test_no_clock_read_where_the_answer_cannot_depend_on_it() -> None:
    chooser, _, clock = _chooser(("open",))
    assert chooser.first() == 0  # the primary all the same
    assert not chooser.can_switch(0)
    assert clock.reads == 0
    chooser, _, clock = _chooser(("open", "closed"))
    assert chooser.first() == 1 and clock.reads == 1
    assert not chooser.can_switch(1) and clock.reads == 1
