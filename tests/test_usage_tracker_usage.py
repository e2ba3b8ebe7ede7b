"""`StreamUsageTracker.usage` reads its figures without the properties, `min` or keywords
(proxy/usage/stream.py): the same `Usage` as the plain way, frozen here, for any state."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.outcome import Usage
from proxy.usage import RequestFacts, StreamUsageTracker
from proxy.usage.reported import Reported

_count = st.none() | st.integers(0, 50)


def _plain_usage(tracker: StreamUsageTracker) -> Usage:
    """The way `usage` was written before: properties, `min`, keywords."""
    r = tracker._reported
    completion = tracker.generated_tokens
    prompt = None if r is None else r.prompt
    if r is not None and r.reasoning is not None:
        reasoning = r.reasoning
    else:
        reasoning = min(tracker._estimated_reasoning, completion)
    return Usage(
        prompt_tokens=tracker.facts.prompt_tokens_estimate if prompt is None else prompt,
        completion_tokens=completion,
        cached_tokens=0 if r is None or r.cached is None else r.cached,
        reasoning_tokens=reasoning,
        prompt_estimated=prompt is None,
        completion_estimated=not tracker.reported or tracker._est_since_report > 0,
    )


@settings(max_examples=500, deadline=None)
@given(
    reported=st.none() | st.builds(Reported, _count, _count, _count, _count),
    generated=st.integers(0, 60),
    estimated_reasoning=st.integers(0, 60),
    since_report=st.integers(0, 3),
    prompt_estimate=st.integers(0, 40),
)
def test_usage_is_the_plain_way_s(
    reported: Reported | None,
    generated: int,
    estimated_reasoning: int,
    since_report: int,
    prompt_estimate: int,
) -> None:
    tracker = StreamUsageTracker(
        RequestFacts(endpoint="chat.completions", prompt_tokens_estimate=prompt_estimate)
    )
    tracker._reported = reported
    tracker.generated = generated
    tracker._estimated_reasoning = estimated_reasoning
    tracker._est_since_report = since_report
    assert tracker.usage() == _plain_usage(tracker)
