"""`access_fields` against a frozen copy of its general way (`_reference`: the function
before it stopped going through the record's timing and source properties): the same fields,
in the same order, for generated records."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.attempts import Attempt, AttemptResult
from proxy.logs import _ms, access_fields
from proxy.outcome import (
    BackgroundCancel,
    Cost,
    EngineAbort,
    Outcome,
    RequestRecord,
    Savings,
    TimeoutKind,
    Usage,
    Waste,
)
from tests.metrics_support import make_record


def _reference(rec: RequestRecord) -> dict[str, Any]:
    """`access_fields` as it was before it worked out the timings and sources itself."""
    fields: dict[str, Any] = {
        "request_id": rec.request_id,
        "method": rec.method,
        "path": rec.path,
        "client": rec.client,
        "client_address": rec.client_address,
        "user_agent": rec.user_agent,
        "route": rec.route,
        "model": rec.model,
        "endpoint": rec.endpoint,
        "stream": rec.stream,
        "status": rec.status,
        "upstream_status": rec.upstream_status,
        # `_value_`, not `.value`: the same strings without enum's property (~0.3 us each).
        "outcome": rec.outcome._value_ if rec.outcome else None,
        "duration_ms": _ms(rec.duration_s),
        "ttft_ms": _ms(rec.ttft_s),
        "overhead_ms": _ms(rec.overhead_s),
        "bytes_in": rec.bytes_from_client,
        "bytes_out": rec.bytes_to_client,
        "upstream_attempts": rec.upstream_attempts,
    }
    if rec.trace is not None:
        fields["trace_id"] = f"{rec.trace.trace_id:032x}"
    if rec.timeout_kind is not None:
        fields["timeout_phase"] = rec.timeout_kind.value
        fields["timeout_key"] = rec.timeout_kind.config_key
    if rec.cancel_propagation_s is not None:
        fields["cancel_propagation_ms"] = _ms(rec.cancel_propagation_s)
    if rec.error_message is not None:
        fields["error"] = rec.error_message
    if rec.sdk_retry_count:
        fields["sdk_retry_count"] = rec.sdk_retry_count
    if rec.upstream is not None:
        fields["upstream"] = rec.upstream
    attempts = rec.attempts
    if len(attempts) > 1 or (attempts and attempts[0].result is not AttemptResult.OK):
        # The attempt chain, e.g. "openai/gpt-4o:server_error[503] > azure/gpt-4o:ok[200]".
        fields["attempts"] = " > ".join(a.describe() for a in rec.attempts)
        if rec.attempt_waste_tokens:
            fields["attempt_waste_tokens"] = rec.attempt_waste_tokens
    u = rec.usage
    fields["tokens"] = {
        "prompt": u.prompt_tokens,
        "completion": u.completion_tokens,
        "cached": u.cached_tokens,
        "reasoning": u.reasoning_tokens,
        "estimated": u.prompt_estimated or u.completion_estimated,
        # how each count was obtained: reported, tokenized or estimated
        "prompt_source": u.prompt_source._value_,
        "completion_source": u.completion_source._value_,
    }
    if rec.savings is not None:
        fields["tokens"]["saved"] = rec.savings.tokens_saved
        fields["tokens"]["saved_upper"] = rec.savings.tokens_saved_upper
        fields["tokens"]["wasted"] = rec.savings.tokens_wasted
        fields["billing"] = rec.savings.billing
    if rec.tokenizer is not None and u.prompt_tokenized:
        fields["tokens"]["tokenizer"] = rec.tokenizer
    if rec.cost is not None and rec.cost.priced:
        fields["cost_usd"] = {
            "used": rec.cost.used_usd,
            "saved": rec.cost.saved_usd,
            "wasted": rec.cost.wasted_usd,
        }
    if rec.waste:
        # Attempts whose output never reached the client (proxy/bills.py), by reason.
        fields["waste"] = {
            reason: {
                "attempts": w.attempts,
                "prompt_tokens": w.prompt_tokens,
                "completion_tokens": w.completion_tokens,
                "usd": w.usd,
                "tokens_saved": w.tokens_saved,
                "saved_usd": w.saved_usd,
            }
            for reason, w in rec.waste.items()
        }
    if rec.background is not None:
        fields["background"] = rec.background.value
    if rec.background_response_id is not None:
        fields["background_response_id"] = rec.background_response_id
    if rec.engine_request_id is not None:
        fields["engine_request_id"] = rec.engine_request_id
    if rec.engine_abort is not None:
        fields["engine_abort"] = rec.engine_abort.value
        if rec.engine_abort_s is not None:
            fields["engine_abort_ms"] = _ms(rec.engine_abort_s)
    return fields


_times = st.none() | st.floats(1000.0, 1100.0) | st.floats(0.0, 1e9)
_record = st.builds(
    make_record,
    started_at=st.floats(0.0, 1100.0),
    outcome=st.none() | st.sampled_from(list(Outcome)),
    timeout_kind=st.none() | st.sampled_from(list(TimeoutKind)),
    ended_at=_times,
    first_token_at=_times,
    client_gone_at=_times,
    upstream_closed_at=_times,
    upstream_wait_s=st.floats(0.0, 500.0),
    client_wait_s=st.floats(0.0, 5.0),
    backoff_wait_s=st.floats(0.0, 5.0),
    error_message=st.none() | st.text(max_size=5),
    sdk_retry_count=st.integers(0, 2),
    upstream=st.none() | st.just("primary"),
    usage=st.builds(
        Usage,
        prompt_tokens=st.integers(0, 50),
        completion_tokens=st.integers(0, 50),
        prompt_estimated=st.booleans(),
        completion_estimated=st.booleans(),
        prompt_tokenized=st.booleans(),
    ),
    attempts=st.lists(
        st.builds(
            Attempt,
            upstream=st.just("primary"),
            model=st.just("m"),
            started_at=st.just(0.0),
            result=st.none() | st.sampled_from(list(AttemptResult)),
            tokens_generated=st.integers(0, 5),
            delivered=st.booleans(),
        ),
        max_size=2,
    ),
    savings=st.none() | st.builds(Savings, tokens_saved=st.integers(0, 9)),
    tokenizer=st.none() | st.just("o200k_base"),
    cost=st.none() | st.builds(Cost, used_usd=st.none() | st.just(0.5)),
    waste=st.dictionaries(
        st.sampled_from(["hedge", "failover"]),
        st.builds(
            Waste,
            attempts=st.integers(0, 3),
            prompt_tokens=st.integers(0, 9),
            completion_tokens=st.integers(0, 9),
            usd=st.none() | st.just(0.25),
            tokens_saved=st.integers(0, 9),
            saved_usd=st.none() | st.just(0.75),
        ),
    ),
    background=st.none() | st.sampled_from(list(BackgroundCancel)),
    background_response_id=st.none() | st.just("resp_1"),
    engine_request_id=st.none() | st.just("e1"),
    engine_abort=st.none() | st.sampled_from(list(EngineAbort)),
    engine_abort_s=st.none() | st.floats(0.0, 1.0),
)


@settings(max_examples=500, deadline=None)
@given(_record)
def test_access_fields_are_their_general_way(record: RequestRecord) -> None:
    assert list(access_fields(record).items()) == list(_reference(record).items())


def test_the_timings_are_the_record_properties() -> None:
    """Not vacuous: the usual record's timings are there, as the properties give them."""
    record = make_record(ended_at=1002.5, first_token_at=1000.25, upstream_wait_s=1.0)
    fields = access_fields(record)
    assert fields["duration_ms"] == _ms(record.duration_s) == 2500.0
    assert fields["ttft_ms"] == _ms(record.ttft_s) == 250.0
    assert fields["overhead_ms"] == _ms(record.overhead_s) == 1500.0


# Seconds whose milliseconds sit on or next to a tie at the third decimal, as well as any float.
_near_ties = st.builds(
    lambda k, nudge: (k + 0.5) / 1e6 + nudge,
    st.integers(-(10**9), 10**9),
    st.sampled_from([0.0, 5e-324, -5e-324, 1e-15, -1e-15, 1e-12, -1e-12]),
)


@settings(max_examples=3000, deadline=None)
@given(st.floats() | _near_ties | st.floats(-1e-6, 1e-6) | st.floats(1e6, 1e9))
def test_ms_is_round_to_three_decimals(seconds: float) -> None:
    want = round(seconds * 1000, 3)
    got = _ms(seconds)
    assert repr(got) == repr(want), seconds  # repr: also NaN, and -0.0 apart from 0.0


def test_ms_on_the_usual_durations_and_its_edges() -> None:
    """Not vacuous: the way without `round` is taken, and the edges are kept."""
    assert _ms(0.0002783456789) == 0.278 and _ms(2.5) == 2500.0
    assert repr(_ms(-1e-10)) == "-0.0" and _ms(0.0015) == round(1.5, 3)
    assert _ms(None) is None
    # Past 2**40 the float product can round to an integer the exact one does not: `round`.
    assert repr(_ms(54889503931.214836)) == "54889503931214.836"
