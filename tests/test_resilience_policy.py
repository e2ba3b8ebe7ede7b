"""The pure resilience policy: next step, classification, Retry-After, circuit breaker."""

from __future__ import annotations

import email.utils

import pytest

from proxy.attempts import AttemptResult as R
from proxy.config import ConfigError
from proxy.config_file import parse_config
from proxy.resilience.circuit import Circuit, CircuitState
from proxy.resilience.classify import error_code, retry_after_s, status_result
from proxy.resilience.policy import Failure, RetryRules, Step, TargetView, next_step

TWO = [TargetView("a"), TargetView("b")]
LONG = [TargetView("a"), TargetView("b"), TargetView("c", long_context=True)]


def step(failure: Failure, **kw: object) -> tuple[Step, int]:
    args: dict[str, object] = {
        "targets": TWO,
        "index": 0,
        "retries_here": 0,
        "rules": RetryRules(),
        "remaining_s": None,
        **kw,
    }
    d = next_step(failure, **args)  # type: ignore[arg-type]
    return d.step, d.index


@pytest.mark.parametrize(
    "result",
    [R.CONNECT_ERROR, R.RESET, R.INVALID_RESPONSE, R.SERVER_ERROR, R.TIMEOUT, R.STREAM_ERROR],
)
def test_failures_before_content_move_on(result: R) -> None:
    assert step(Failure(result)) == (Step.NEXT, 1)
    assert step(Failure(result), index=1) == (Step.GIVE_UP, 0)


def test_content_sent_never_switches() -> None:
    assert step(Failure(R.STREAM_ERROR, content_sent=True))[0] is Step.GIVE_UP


def test_refusals_are_retried_on_the_same_target_only_when_asked() -> None:
    rules = RetryRules(max_retries=1, backoff_s=0.5)
    assert step(Failure(R.CONNECT_ERROR), rules=rules) == (Step.SAME, 0)
    assert step(Failure(R.SERVER_ERROR, 503), rules=rules) == (Step.SAME, 0)
    assert step(Failure(R.SERVER_ERROR, 500), rules=rules) == (Step.NEXT, 1)  # may be started
    assert step(Failure(R.SERVER_ERROR, 504), rules=rules) == (Step.NEXT, 1)
    assert step(Failure(R.RESET), rules=rules) == (Step.NEXT, 1)  # may have started
    assert step(Failure(R.CONNECT_ERROR), rules=rules, retries_here=1) == (Step.NEXT, 1)


def test_retry_after_is_honoured_up_to_the_bound() -> None:
    rules = RetryRules(retry_after_max_s=2.0)
    d = next_step(
        Failure(R.RATE_LIMITED, 429, retry_after_s=1.5),
        targets=TWO,
        index=0,
        retries_here=0,
        rules=rules,
        remaining_s=None,
    )
    assert (d.step, d.delay_s) == (Step.SAME, 1.5)
    assert step(Failure(R.RATE_LIMITED, 429, retry_after_s=1.5), retries_here=1)[0] is Step.NEXT
    assert step(Failure(R.RATE_LIMITED, 429, retry_after_s=5.0), rules=rules) == (Step.NEXT, 1)
    # A wait that does not fit the remaining budget is not started.
    assert step(Failure(R.RATE_LIMITED, 429, retry_after_s=1.5), remaining_s=1.0)[0] is Step.NEXT


def test_a_400_is_never_retried_and_context_length_needs_a_marked_target() -> None:
    assert step(Failure(R.CLIENT_ERROR, 400))[0] is Step.GIVE_UP
    ctx = Failure(R.CLIENT_ERROR, 400, error_code="context_length_exceeded")
    assert step(ctx)[0] is Step.GIVE_UP
    assert step(ctx, targets=LONG) == (Step.NEXT, 2)
    policy = Failure(R.CLIENT_ERROR, 400, error_code="content_policy")
    assert step(policy, targets=LONG)[0] is Step.GIVE_UP


def test_open_circuits_are_skipped() -> None:
    three = [TargetView("a"), TargetView("b"), TargetView("c")]
    d = step(Failure(R.RESET), targets=three, available=lambda name: name != "b")
    assert d == (Step.NEXT, 2)


def test_status_classification() -> None:
    assert status_result(429) is R.RATE_LIMITED
    for status in (500, 502, 503, 504):
        assert status_result(status) is R.SERVER_ERROR
    for status in (200, 400, 401, 404, 422, 501):
        assert status_result(status) is None


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"error":{"code":"context_length_exceeded","message":"x"}}', "context_length_exceeded"),
        (
            b'{"error":{"message":"This model\'s maximum context length is 8192"}}',
            "context_length_exceeded",
        ),
        (b'{"error":{"code":"content_policy_violation"}}', "content_policy"),
        (b'{"error":{"code":"invalid_value"}}', None),
        (b"not json", None),
        (b'["error"]', None),
    ],
)
def test_error_codes(body: bytes, code: str | None) -> None:
    assert error_code(body) == code


def test_retry_after_forms() -> None:
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "-4"}) == 0.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({"retry-after": "inf"}) is None
    assert retry_after_s({}) is None
    date = email.utils.formatdate(1_000_010.0, usegmt=True)
    assert retry_after_s({"retry-after": date}, now=1_000_000.0) == pytest.approx(10.0)


def state(c: Circuit) -> CircuitState:
    return c.state  # read through a call: mypy would narrow the attribute across reports


def test_circuit_opens_probes_and_closes() -> None:
    c = Circuit(failures_to_open=2, cooldown_s=10.0)
    assert c.allows(0.0)
    c.report(R.SERVER_ERROR, 0.0)
    assert state(c) is CircuitState.CLOSED
    c.report(R.TIMEOUT, 1.0)
    assert state(c) is CircuitState.OPEN and not c.allows(5.0)
    assert c.allows(11.0) and state(c) is CircuitState.HALF_OPEN
    assert not c.allows(11.1)  # one probe at a time
    c.report(R.RESET, 12.0)
    assert state(c) is CircuitState.OPEN and not c.would_allow(21.0)
    assert c.allows(22.5)
    c.report(R.OK, 23.0)
    assert state(c) is CircuitState.CLOSED and c.failures == 0


def test_a_4xx_or_an_abandoned_attempt_says_nothing_bad_about_the_upstream() -> None:
    c = Circuit(failures_to_open=1, cooldown_s=10.0)
    c.report(R.CLIENT_ERROR, 0.0)
    c.report(R.ABANDONED, 0.0)
    assert c.state is CircuitState.CLOSED
    never = Circuit(failures_to_open=0, cooldown_s=10.0)
    for _ in range(10):
        never.report(R.SERVER_ERROR, 0.0)
    assert never.state is CircuitState.CLOSED


def test_a_fallback_to_an_unknown_upstream_is_refused_with_its_line() -> None:
    text = """\
upstreams:
  openai: {base_url: "http://127.0.0.1:1/v1"}
routes:
  - name: chat
    upstream: openai
    fallbacks:
      - {upstream: openai, model: gpt-4o}
      - {upstream: azure}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, source="t.yaml")
    assert str(err.value).startswith("t.yaml:8: routes[0].fallbacks[1].upstream: no upstream")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(text.replace("{upstream: azure}", "{upstream: openai, mdl: x}"))
