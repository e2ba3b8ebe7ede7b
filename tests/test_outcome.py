"""The request record's settling and derived timings: one terminal outcome, the first decision
wins; durations and the cancel propagation time from the record's own timestamps."""

from __future__ import annotations

import pytest

from proxy.outcome import Outcome, RequestRecord, TimeoutKind, response_outcome, settle_relayed
from proxy.route_options import TimeoutsConfig


def record(
    *,
    first_token_at: float | None = None,
    client_gone_at: float | None = None,
    upstream_closed_at: float | None = None,
    ended_at: float | None = None,
) -> RequestRecord:
    return RequestRecord(
        request_id="r",
        method="POST",
        path="/v1/x",
        started_at=100.0,
        wall_started_at=0.0,
        first_token_at=first_token_at,
        client_gone_at=client_gone_at,
        upstream_closed_at=upstream_closed_at,
        ended_at=ended_at,
    )


def outcome_of(r: RequestRecord) -> tuple[Outcome | None, TimeoutKind | None]:
    """Read through a call, so mypy does not keep its narrowing of `r.outcome` to None."""
    return r.outcome, r.timeout_kind


def test_the_first_outcome_wins_and_later_ones_are_refused() -> None:
    r = record()
    assert r.outcome is None
    assert r.settle(Outcome.TIMEOUT, timeout_kind=TimeoutKind.IDLE) is True
    # The client drops while the 504 is being written: still a timeout, of the same phase.
    assert r.settle(Outcome.CLIENT_CANCELLED) is False
    assert r.settle(Outcome.TIMEOUT, timeout_kind=TimeoutKind.TOTAL) is False
    assert outcome_of(r) == (Outcome.TIMEOUT, TimeoutKind.IDLE)


def test_settling_without_a_timeout_leaves_no_phase() -> None:
    r = record()
    assert r.settle(Outcome.COMPLETED) is True
    assert r.timeout_kind is None


def test_durations_come_from_the_records_timestamps() -> None:
    r = record()
    assert (r.duration_s, r.ttft_s, r.cancel_propagation_s) == (None, None, None)
    r = record(first_token_at=100.25, ended_at=102.0)
    assert (r.duration_s, r.ttft_s) == (2.0, 0.25)


@pytest.mark.parametrize(
    ("gone", "closed", "expected"),
    [
        (101.0, 101.0007, 0.0007),
        (101.0, None, None),  # the upstream close was never seen
        (None, 101.0, None),  # nobody left
        (101.0, 100.5, 0.0),  # closed before the client left (a timeout): nothing to propagate
    ],
)
def test_cancel_propagation(
    gone: float | None, closed: float | None, expected: float | None
) -> None:
    r = record(client_gone_at=gone, upstream_closed_at=closed)
    assert r.cancel_propagation_s == (None if expected is None else pytest.approx(expected))


def test_overhead_is_what_is_left_after_waiting_and_never_negative() -> None:
    r = record(ended_at=101.0)
    r.upstream_wait_s, r.client_wait_s = 0.7, 0.2
    assert r.overhead_s == pytest.approx(0.1)
    r.upstream_wait_s = 0.95  # overlapping waits can exceed the duration: clamp, don't go < 0
    assert r.overhead_s == 0.0
    assert record().overhead_s is None


def test_each_timeout_kind_names_a_real_config_key() -> None:
    keys = set(TimeoutsConfig.model_fields)
    for kind in TimeoutKind:
        section, key = kind.config_key.split(".")
        assert section == "timeouts" and key in keys, kind


@pytest.mark.parametrize(
    ("status", "stream_error", "terminated", "outcome"),
    [
        (200, False, True, Outcome.COMPLETED),
        (200, False, None, Outcome.COMPLETED),  # not a stream: nothing to terminate
        (399, False, None, Outcome.COMPLETED),
        (200, False, False, Outcome.UPSTREAM_ERROR),  # a stream cut without its terminal event
        (200, True, True, Outcome.UPSTREAM_ERROR),  # an in-band error event
        (400, False, None, Outcome.UPSTREAM_REJECTED),
        (499, False, None, Outcome.UPSTREAM_REJECTED),
        (429, False, None, Outcome.RATE_LIMITED),
        (500, False, None, Outcome.UPSTREAM_ERROR),
        (503, False, True, Outcome.UPSTREAM_ERROR),
    ],
)
def test_a_relayed_answer_settles_by_status_and_how_its_stream_ended(
    status: int, stream_error: bool, terminated: bool | None, outcome: Outcome
) -> None:
    assert response_outcome(status, stream_error=stream_error, stream_terminated=terminated) is (
        outcome
    )


def test_settle_relayed_says_why_a_200_failed() -> None:
    cut = record()
    settle_relayed(cut, 200, stream_error=None, stream_terminated=False)
    assert (cut.outcome, cut.error_type) == (Outcome.UPSTREAM_ERROR, "upstream_truncated")
    errored = record()
    settle_relayed(errored, 200, stream_error="overloaded " * 100, stream_terminated=True)
    assert (errored.outcome, errored.error_type) == (Outcome.UPSTREAM_ERROR, "upstream_error")
    assert errored.error_message is not None and len(errored.error_message) == 500  # bounded
    fine = record()
    settle_relayed(fine, 200, stream_error=None, stream_terminated=True)
    assert (fine.outcome, fine.error_type, fine.error_message) == (Outcome.COMPLETED, None, None)


def test_a_new_record_holds_its_defaults_and_shares_nothing_it_writes() -> None:
    """What the record's construction promises (a msgspec Struct since round 7, a slotted
    dataclass before): every field not given is its default, the attempts list is each
    record's own, the shared empties (`NO_USAGE`, `NO_WASTE`) refuse writes, and no other
    attribute can be set."""
    from proxy.attempts import Attempt
    from proxy.outcome import NO_USAGE, NO_WASTE, Waste

    a, b = record(), record()
    assert a == b and a is not b
    a.attempts.append(Attempt("up", "m", 0.0))
    assert b.attempts == [] and a != b
    assert b.usage is NO_USAGE and b.waste is NO_WASTE and b.savings is None
    with pytest.raises(AttributeError):
        NO_USAGE.prompt_tokens = 1
    with pytest.raises(TypeError):
        NO_WASTE["hedge"] = Waste()  # type: ignore[index]
    assert (NO_USAGE.prompt_tokens, NO_USAGE.completion_tokens, NO_USAGE.total_tokens) == (0, 0, 0)
    assert not (NO_USAGE.prompt_estimated or NO_USAGE.prompt_tokenized)
    assert (b.endpoint, b.stream, b.upstream_wait_s, b.stream_terminated) == (
        "other",
        False,
        0.0,
        None,
    )
    assert a.settle(Outcome.COMPLETED) and a.outcome is Outcome.COMPLETED
    with pytest.raises(AttributeError):
        a.no_such_field = 1  # type: ignore[attr-defined]
    assert RequestRecord("r", "POST", "/v1/x", 100.0, 0.0) == b  # positional, in field order
