"""The pure deadline logic: which deadline is in force in each phase, and what it says."""

from __future__ import annotations

from typing import Any

import pytest

from proxy import timeouts
from proxy.outcome import TimeoutKind
from proxy.route_options import TimeoutsConfig
from proxy.timeouts import (
    CLIENT_HEADERS_DEADLINE_HEADERS,
    CLIENT_READ_GAP_HEADERS,
    Budget,
    Deadlines,
    Phase,
    client_deadline,
    client_deadlines,
)

POLICY = TimeoutsConfig(connect_s=1, headers_s=5, first_token_s=10, idle_s=3, total_s=100)


def deadlines(
    policy: TimeoutsConfig = POLICY, *, stream: bool = True, client: tuple[float, str] | None = None
) -> Deadlines:
    budget = Budget.for_request(policy, client, honor_client_deadline=True)
    return Deadlines(budget, started=1000.0, watch_first_token=stream)


def phase_of(d: Deadlines) -> Phase:
    """Read through a call: after `assert d.phase is X`, mypy would narrow the attribute to X
    and call a later check against another phase unreachable."""
    return d.phase


def test_connect_phase_is_bounded_by_connect_s() -> None:
    d = deadlines()
    assert d.next() == (1001.0, TimeoutKind.CONNECT)


def test_headers_phase_starts_when_the_request_was_sent() -> None:
    d = deadlines(stream=False)
    d.headers_sent(1000.5)
    assert d.next() == (1005.5, TimeoutKind.HEADERS)


def test_first_token_bounds_the_header_wait_of_a_stream() -> None:
    policy = POLICY.model_copy(update={"headers_s": 60})
    d = deadlines(policy)
    d.headers_sent(1000.2)
    assert d.next() == (1010.0, TimeoutKind.FIRST_TOKEN)  # from the request's start


def test_keepalives_do_not_reset_first_token_only_content_does() -> None:
    d = deadlines()
    d.headers_sent(1000.1)
    d.response_started(1000.2, sse=True)
    assert d.phase is Phase.AWAIT_CONTENT
    assert d.next() == (1010.0, TimeoutKind.FIRST_TOKEN)
    # The relay calls content() only for content-bearing events; nothing else moves it.
    d.content(1004.0)
    assert phase_of(d) is Phase.STREAMING
    assert d.next() == (1007.0, TimeoutKind.IDLE)
    d.content(1006.5)
    assert d.next() == (1009.5, TimeoutKind.IDLE)


def test_plain_body_reads_reset_idle() -> None:
    d = deadlines(stream=False)
    d.headers_sent(1000.1)
    d.response_started(1000.2, sse=False)
    assert d.next() == (1003.2, TimeoutKind.IDLE)
    d.content(1002.0)
    assert d.next() == (1005.0, TimeoutKind.IDLE)


def test_total_wins_when_it_is_earliest_and_ties_go_to_the_phase() -> None:
    policy = TimeoutsConfig(connect_s=5, headers_s=None, first_token_s=None, idle_s=None, total_s=5)
    d = deadlines(policy)
    assert d.next() == (1005.0, TimeoutKind.CONNECT)
    d.headers_sent(1001.0)
    assert d.next() == (1005.0, TimeoutKind.TOTAL)


def test_everything_off_means_no_deadline() -> None:
    off = TimeoutsConfig(
        connect_s=None, headers_s=None, first_token_s=None, idle_s=None, total_s=None
    )
    d = deadlines(off)
    assert d.next() is None
    d.response_started(1001.0, sse=True)
    d.content(1002.0)
    assert d.next() is None


def test_backoff_keeps_only_first_token_and_total() -> None:
    d = deadlines()
    d.backing_off()
    assert d.next() == (1010.0, TimeoutKind.FIRST_TOKEN)
    d = deadlines(stream=False)
    d.backing_off()
    assert d.next() == (1100.0, TimeoutKind.TOTAL)


def test_done_has_no_deadline() -> None:
    d = deadlines()
    d.done()
    assert d.next() is None


def test_client_deadline_caps_total_but_never_extends_it() -> None:
    d = deadlines(client=(2.5, "x-hangup-timeout"))
    d.headers_sent(1000.1)
    d.response_started(1000.2, sse=True)
    d.content(1000.3)
    assert d.next() == (1002.5, TimeoutKind.TOTAL)
    assert "x-hangup-timeout" in d.describe(TimeoutKind.TOTAL, "chat")
    longer = Budget.for_request(POLICY, (500.0, "x-hangup-timeout"), honor_client_deadline=True)
    assert longer.total_s == 100 and longer.total_source is None
    ignored = Budget.for_request(POLICY, (2.0, "x-hangup-timeout"), honor_client_deadline=False)
    assert ignored.total_s == 100
    no_total = POLICY.model_copy(update={"total_s": None})
    capped = Budget.for_request(no_total, (7.0, "x-hangup-timeout"), honor_client_deadline=True)
    assert capped.total_s == 7.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        # The SDKs' headers do not bound the whole request (see the client-deadline tests).
        ({"x-stainless-timeout": "600"}, None),
        ({"x-hangup-timeout": "1.5", "x-stainless-timeout": "600"}, (1.5, "x-hangup-timeout")),
        ({"x-hangup-timeout": "30", "x-stainless-timeout": "2"}, (30.0, "x-hangup-timeout")),
        ({"x-hangup-timeout": "nan"}, None),
        ({"x-hangup-timeout": "-1"}, None),
        ({"x-hangup-timeout": "0"}, None),  # no time at all is no deadline, not an instant 504
        ({"x-hangup-timeout": "soon"}, None),
        ({"x-hangup-timeout": "0.5"}, (0.5, "x-hangup-timeout")),  # sub-second deadlines count
    ],
)
def test_client_deadline_headers(
    headers: dict[str, str], expected: tuple[float, str] | None
) -> None:
    assert client_deadline(headers) == expected


def test_messages_name_the_config_key_and_route() -> None:
    d = deadlines()
    assert d.describe(TimeoutKind.FIRST_TOKEN, "reasoning") == (
        'timeouts.first_token_s=10 exceeded on route "reasoning" '
        "(waiting for the first content token)"
    )
    assert d.describe(TimeoutKind.IDLE, "r").startswith("timeouts.idle_s=3 exceeded")


def test_remaining_budget() -> None:
    d = deadlines()
    assert d.remaining(1040.0) == 60.0
    assert d.remaining(2000.0) == 0.0
    assert deadlines(POLICY.model_copy(update={"total_s": None})).remaining(1040.0) is None


def test_sdk_headers_bound_the_wait_for_headers_not_the_stream() -> None:
    """x-stainless-timeout (Node) and x-stainless-read-timeout (Python) mean what the SDKs
    mean: response headers must arrive in time; a flowing stream is never cut by them."""
    headers = {"x-stainless-timeout": "2", "x-stainless-read-timeout": "5"}
    budget = Budget.for_request(
        POLICY,
        client_deadline(headers),
        honor_client_deadline=True,
        client_headers=client_deadline(headers, CLIENT_HEADERS_DEADLINE_HEADERS),
        read_gap=client_deadline(headers, CLIENT_READ_GAP_HEADERS),
    )
    assert (budget.total_s, budget.client_headers_s, budget.idle_s) == (100, 2.0, 3)
    d = Deadlines(budget, started=1000.0, watch_first_token=True)
    assert d.next() == (1001.0, TimeoutKind.CONNECT)
    d.headers_sent(1000.1)
    # Waiting for headers: answered 0.2 s (the margin) before the client would give up itself.
    assert d.next() == (1001.8, TimeoutKind.HEADERS)
    assert "x-stainless-timeout" in d.describe(TimeoutKind.HEADERS, "chat")
    assert d.client_commit_at() == pytest.approx(1001.6)
    d.response_started(1000.5, sse=True)
    d.client_committed()  # headers went out: the client's deadline is met
    d.content(1000.6)
    assert d.next() == (1003.6, TimeoutKind.IDLE)  # the route's idle, no client cap
    d.content(1050.0)
    assert d.next() == (1053.0, TimeoutKind.IDLE)  # still streaming at 50 s: never cut


def test_a_python_sdk_read_timeout_caps_idle() -> None:
    headers = {"x-stainless-read-timeout": "1.5"}
    budget = Budget.for_request(
        POLICY,
        None,
        honor_client_deadline=True,
        client_headers=client_deadline(headers, CLIENT_HEADERS_DEADLINE_HEADERS),
        read_gap=client_deadline(headers, CLIENT_READ_GAP_HEADERS),
    )
    assert (budget.idle_s, budget.idle_source, budget.client_headers_s) == (
        1.5,
        "x-stainless-read-timeout",
        1.5,
    )
    d = Deadlines(budget, started=1000.0, watch_first_token=True)
    assert "x-stainless-read-timeout" in d.describe(TimeoutKind.IDLE, "chat")
    ignored = Budget.for_request(
        POLICY,
        None,
        honor_client_deadline=False,
        client_headers=(1.0, "x-stainless-timeout"),
        read_gap=(1.0, "x-stainless-read-timeout"),
    )
    assert (ignored.idle_s, ignored.client_headers_s) == (3, None)


def test_a_client_deadline_equal_to_total_s_leaves_the_route_as_the_source() -> None:
    """Only a strictly tighter client deadline takes over (and is then named in the message)."""
    tie = Budget.for_request(POLICY, (100.0, "x-hangup-timeout"), honor_client_deadline=True)
    assert (tie.total_s, tie.total_source) == (100, None)
    d = Deadlines(tie, started=1000.0, watch_first_token=True)
    assert d.describe(TimeoutKind.TOTAL, "r").startswith("timeouts.total_s=100 exceeded")


def test_only_total_is_blamed_on_the_client_deadline() -> None:
    d = deadlines(client=(2.5, "x-stainless-timeout"))
    assert "x-stainless-timeout" in d.describe(TimeoutKind.TOTAL, "r")
    for kind in (TimeoutKind.CONNECT, TimeoutKind.HEADERS, TimeoutKind.IDLE):
        message = d.describe(kind, "r")
        assert message.startswith(f"{kind.config_key}=") and "x-stainless" not in message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # A bad first header does not hide a good second one.
        ({"x-stainless-timeout": "soon", "x-stainless-read-timeout": "9"}, 9.0),
        ({"x-stainless-timeout": "inf", "x-stainless-read-timeout": "9"}, 9.0),
        ({"x-stainless-timeout": "0", "x-stainless-read-timeout": "9"}, 9.0),
    ],
)
def test_every_named_header_is_considered(headers: dict[str, str], expected: float) -> None:
    assert client_deadline(headers, CLIENT_HEADERS_DEADLINE_HEADERS) == (
        expected,
        "x-stainless-read-timeout",
    )


def test_a_tie_names_the_first_header_in_order() -> None:
    headers = {"x-stainless-timeout": "5", "x-stainless-read-timeout": "5"}
    assert client_deadline(headers, CLIENT_HEADERS_DEADLINE_HEADERS) == (
        5.0,
        "x-stainless-timeout",
    )


def test_a_retry_attempt_restarts_the_connect_deadline_from_now() -> None:
    d = deadlines(stream=False)
    d.headers_sent(1000.1)
    d.backing_off()
    assert d.next() == (1100.0, TimeoutKind.TOTAL)  # backing off: only total runs
    d.connecting(1030.0)
    assert d.phase is Phase.CONNECT
    assert d.next() == (1031.0, TimeoutKind.CONNECT)  # connect_s=1 from the new attempt
    d.headers_sent(1030.5)
    assert d.next() == (1035.5, TimeoutKind.HEADERS)


def test_a_fallback_target_gets_its_own_connect_and_first_token_time_but_not_total() -> None:
    d = deadlines()
    d.headers_sent(1000.1)
    d.next_target(1006.0)  # the first target failed at 6 s: the next one starts afresh
    assert d.next() == (1007.0, TimeoutKind.CONNECT)
    d.headers_sent(1006.2)
    assert d.next() == (1011.2, TimeoutKind.HEADERS)
    d.response_started(1006.5, sse=True)
    assert d.next() == (1016.0, TimeoutKind.FIRST_TOKEN)  # 10 s from the new target's start
    d.content(1099.0)
    assert d.next() == (1100.0, TimeoutKind.TOTAL)  # total is one budget for all targets


def test_the_clients_headers_deadline_is_known_to_have_fired() -> None:
    headers = {"x-stainless-timeout": "2"}
    budget = Budget.for_request(
        POLICY,
        None,
        honor_client_deadline=True,
        client_headers=client_deadline(headers, CLIENT_HEADERS_DEADLINE_HEADERS),
    )
    d = Deadlines(budget, started=1000.0, watch_first_token=True)
    # Answered 0.2 s (the margin) before the client's own 2 s run out.
    assert not d.client_headers_expired(1001.7)
    assert d.client_headers_expired(1001.8)
    assert not deadlines().client_headers_expired(5000.0)  # no client deadline: never


def test_a_retry_wait_fits_the_budget_and_a_streams_first_token_deadline() -> None:
    # POLICY: first_token 10 s, total 100 s, from 1000.0.
    stream = deadlines(stream=True)
    # A stream's first-token deadline keeps running through the wait: 10 - 3 = 7 s left.
    assert stream.retry_window(1003.0) == pytest.approx(7.0)
    assert stream.retry_window(1012.0) == 0.0  # past it: no wait fits
    plain = deadlines(stream=False)
    assert plain.retry_window(1003.0) == pytest.approx(97.0)  # only the total applies
    stream.next_target(1020.0)  # a fallback gets its own first-token time
    assert stream.retry_window(1021.0) == pytest.approx(9.0)
    no_limits = Deadlines(
        Budget.for_request(
            TimeoutsConfig(
                connect_s=None, headers_s=None, first_token_s=None, idle_s=None, total_s=None
            ),
            None,
            honor_client_deadline=True,
        ),
        started=1000.0,
        watch_first_token=True,
    )
    assert no_limits.retry_window(1003.0) is None


def test_client_deadlines_in_one_pass_agree_with_each_lookup() -> None:
    """Admission reads the three client deadlines in one call: for every mix of missing,
    invalid, tied and differing values it must answer as the three lookups do."""
    values = [None, "", "abc", "nan", "inf", "-1", "0", "2", "2.0", "5", " 3 "]
    names = ("x-hangup-timeout", "x-stainless-timeout", "x-stainless-read-timeout")
    checked = 0
    for total in values:
        for whole in values:
            for gap in values:
                headers = {
                    name: value
                    for name, value in zip(names, (total, whole, gap), strict=True)
                    if value is not None
                }
                assert client_deadlines(headers) == (
                    client_deadline(headers),
                    client_deadline(headers, CLIENT_HEADERS_DEADLINE_HEADERS),
                    client_deadline(headers, CLIENT_READ_GAP_HEADERS),
                ), headers
                checked += 1
    assert checked == len(values) ** 3


def test_a_shared_budget_is_the_one_its_inputs_make() -> None:
    """Budgets are shared between requests with the same inputs: any input that differs
    (the policy, whether client deadlines count, and each of the three client deadlines)
    gets the budget those inputs make, never another request's."""
    other_policy = TimeoutsConfig(connect_s=2, headers_s=6, first_token_s=11, idle_s=4, total_s=90)
    cases: list[tuple[TimeoutsConfig, bool, Any, Any, Any]] = []
    for policy in (POLICY, other_policy):
        for honor in (True, False):
            for client in (None, (5.0, "x-hangup-timeout"), (50.0, "x-hangup-timeout")):
                for headers in (None, (8.0, "x-stainless-timeout")):
                    for gap in (None, (2.0, "x-stainless-read-timeout")):
                        cases.append((policy, honor, client, headers, gap))
    for _ in range(2):  # the second round is answered from the shared budgets
        for policy, honor, client, headers, gap in cases:
            made = Budget._made(
                policy, client, honor_client_deadline=honor, client_headers=headers, read_gap=gap
            )
            shared = Budget.for_request(
                policy, client, honor_client_deadline=honor, client_headers=headers, read_gap=gap
            )
            assert shared == made, (policy, honor, client, headers, gap)


def test_a_budget_kept_for_a_policy_no_longer_alive_is_not_reused() -> None:
    """The budgets are keyed by the policy's id, which a new policy may reuse: a kept budget
    is taken only for the very policy it was made for, and the cache stays bounded."""
    stale = TimeoutsConfig(connect_s=99, headers_s=99, first_token_s=99, idle_s=99, total_s=99)
    key = (id(POLICY), True, None, None, None)
    timeouts._BUDGETS[key] = (
        stale,
        Budget._made(stale, None, honor_client_deadline=True, client_headers=None, read_gap=None),
    )
    budget = Budget.for_request(POLICY, None, honor_client_deadline=True)
    assert budget.connect_s == POLICY.connect_s
    for n in range(timeouts.BUDGETS_KEPT + 10):
        Budget.for_request(POLICY, (1.0 + n, "x-hangup-timeout"), honor_client_deadline=True)
    assert len(timeouts._BUDGETS) <= timeouts.BUDGETS_KEPT
