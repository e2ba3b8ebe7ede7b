"""What accounting takes from a finished request: the record sealed at the end of the relay,
and the work on it that must wait for I/O (steps 1 and 2 of proxy/accounting.py's three).

1. `seal(record, exchange)`: the one step at the end of the relay that copies what accounting
   needs from the exchange onto the record (usage as counted from the stream or found in the
   body, generated and delivered tokens, drained, terminal event, the request's limits). Cheap
   and bounded: a non-streamed body's usage is found in its tail, never by parsing it whole.
   `attempt_closed` does the same for each attempt, where the relay closes it.
2. `Facts.complete(record)` (only when needed, after the request ended, bounded in time): what
   takes I/O or real CPU: decoding a compressed body in a worker thread, counting the prompt
   with a tokenizer (`proxy/tokenize`).

Which outcomes and endpoints the upstream billed a prompt for (`_UPSTREAM_HAD_IT`,
`_COUNTED_ENDPOINTS`, `_refused`, `_no_answer`) is decided here, for the seal's prompt count and
for accounting's usage alike.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDict

from proxy.attempts import Attempt
from proxy.bills import is_billed
from proxy.config import UpstreamConfig
from proxy.outcome import OUTCOME_COMPLETED, Outcome, RequestRecord
from proxy.request_body import RequestBody
from proxy.tokenize import PromptCounter
from proxy.usage import RequestFacts, StreamUsageTracker, body_usage
from proxy.usage.body import FULL_PARSE_MAX, decode_body, is_identity

if TYPE_CHECKING:
    from proxy.relay import Exchange

__all__ = ["Facts", "attempt_closed", "seal"]

# Endpoints whose requests generate completion tokens (savings make sense for them).
_GENERATING: Final = frozenset({"chat.completions", "completions", "responses"})
_CUT_SHORT: Final = frozenset({Outcome.CLIENT_CANCELLED, Outcome.TIMEOUT, Outcome.SHUTDOWN})
# Outcomes after which the upstream may have processed the prompt without our seeing usage.
_UPSTREAM_HAD_IT: Final = _CUT_SHORT | {Outcome.COMPLETED, Outcome.UPSTREAM_ERROR}
_COUNTED_ENDPOINTS: Final = _GENERATING | {"embeddings"}


@dataclass(slots=True)
class Facts:
    """The part of accounting that waits for I/O or a worker thread, run after the request
    ended (the record waits for it, the client does not)."""

    counter: PromptCounter
    upstream: UpstreamConfig
    endpoint: str
    model: str | None
    request_body: RequestBody
    headers: CIMultiDict[str]
    compressed_body: bytes | None = None
    content_encoding: str | None = None
    prompt_source: str | None = None
    request_facts: RequestFacts | None = None  # for the compressed body's usage

    async def complete(self, record: RequestRecord) -> None:
        if self.compressed_body is not None:
            # zlib releases the GIL: a large gzip body decodes beside the loop, not on it.
            decoded = await asyncio.to_thread(
                decode_body, self.compressed_body, self.content_encoding
            )
            facts = self.request_facts
            if decoded is not None and facts is not None:
                record.seen_usage = body_usage(decoded, facts, None)
                record.generated_tokens = record.seen_usage.completion_tokens
                _answer_usage(record)
            self.compressed_body = None
        if self.prompt_source is None and _needs_prompt_count(record):
            self.prompt_source = self.counter.source_for(
                self.upstream.engine, self.upstream.base_url, self.endpoint, self.model
            )
        if self.prompt_source is not None and _needs_prompt_count(record):
            count = await self.counter.count(
                self.prompt_source,
                base_url=self.upstream.base_url,
                endpoint=self.endpoint,
                model=self.model,
                body=self.request_body,
                headers=self.headers,
            )
            if count is not None:
                record.prompt_tokenized = count
                record.tokenizer = self.prompt_source


def _needs_prompt_count(record: RequestRecord) -> bool:
    """The upstream saw the prompt but its count was not reported."""
    seen = record.seen_usage
    if seen is not None and not seen.prompt_estimated:
        # The usual answer: the prompt was reported, for the request and each of its attempts.
        # Every test below then ends in False: answered without asking them.
        for a in record.attempts:
            if a.usage is None or a.usage.prompt_estimated:
                break
        else:
            return False
    if not record.sent_upstream or record.outcome not in _UPSTREAM_HAD_IT:
        return False
    if _refused(record) or (record.outcome is Outcome.UPSTREAM_ERROR and _no_answer(record)):
        return False
    if record.endpoint not in _COUNTED_ENDPOINTS:
        return False
    if seen is None or seen.prompt_estimated:
        return True
    # An attempt on the primary target whose prompt was not reported (a hedge loser, a failed
    # first try): the count is for its target (proxy/bills.py applies it there).
    if not record.attempts:
        return False
    primary = record.attempts[0]
    for a in record.attempts:  # the cheapest test first: most attempts have a reported prompt
        if (
            (a.usage is None or a.usage.prompt_estimated)
            and a.reason != "continue"
            and (a.upstream, a.model) == (primary.upstream, primary.model)
            and is_billed(a)
        ):
            return True
    return False


def attempt_closed(attempt: Attempt, tracker: StreamUsageTracker | None) -> None:
    """An attempt's stream is closed: keep what it generated and reported on the attempt (the
    relay calls this where it closes an attempt), so the record prices every attempt."""
    if tracker is not None:
        attempt.tokens_generated = tracker.generated_tokens
        attempt.usage = tracker.usage()


def _answer_usage(record: RequestRecord) -> None:
    """A non-streamed answer's usage (found in its body) belongs to its attempt, the last."""
    if record.attempts and record.seen_usage is not None and not record.stream:
        answer = record.attempts[-1]
        answer.usage = record.seen_usage
        answer.tokens_generated = record.generated_tokens


def seal(record: RequestRecord, exchange: Exchange, counter: PromptCounter) -> Facts | None:
    """The relay's one sealing step: put on the record what accounting needs from the exchange.

    Returns the work that must wait for I/O (a compressed body, a prompt to tokenize), or None.
    """
    facts, plan = exchange.facts, exchange.plan
    if facts is None:
        return None
    record.sent_upstream = plan is not None
    record.max_tokens = facts.max_tokens
    record.prompt_estimate = facts.prompt_tokens_estimate
    record.drained = exchange.drained
    tracker = exchange.tracker
    pending_body: bytes | None = None
    if tracker is not None:
        record.seen_usage = tracker.usage()
        record.generated_tokens = tracker.generated_tokens
        record.delivered_tokens = exchange.delivered_tokens
        if record.client_gone_at is None:
            record.delivered_tokens = record.generated_tokens
        record.stream_terminated = tracker.terminated
    elif exchange.json_body is not None and (
        record.outcome is OUTCOME_COMPLETED or exchange.drained
    ):
        body = exchange.json_body  # not copied: only its tail is read
        encoding = exchange.content_encoding
        if encoding is None or is_identity(encoding) or len(body) <= FULL_PARSE_MAX // 4:
            seen = record.seen_usage = body_usage(body, facts, encoding)
            record.generated_tokens = seen.completion_tokens
            if not exchange.drained:
                record.delivered_tokens = record.generated_tokens
            if record.attempts and not record.stream:  # `_answer_usage`, inline
                answer = record.attempts[-1]
                answer.usage = seen
                answer.tokens_generated = record.generated_tokens
        else:
            pending_body = bytes(body)
            if not exchange.drained:
                record.delivered_tokens = record.generated_tokens
            _answer_usage(record)
    if plan is None:
        return None
    upstream = plan.route.upstream
    prompt_source = None
    if pending_body is None:  # decided before building Facts: most requests need none
        if not _needs_prompt_count(record):
            return None
        prompt_source = counter.source_for(
            upstream.engine, upstream.base_url, facts.endpoint, facts.model
        )
        if prompt_source is None:
            return None
    pending = Facts(
        counter=counter,
        upstream=upstream,
        endpoint=facts.endpoint,
        model=facts.model,
        request_body=plan.body,
        headers=plan.headers,
        compressed_body=pending_body,
        content_encoding=exchange.content_encoding,
        request_facts=facts,
    )
    if prompt_source is not None:
        pending.prompt_source = prompt_source
    return pending


def _refused(record: RequestRecord) -> bool:
    """The upstream answered with an error status (also when the client left while reading
    it): nothing was generated or billed."""
    return record.upstream_status is not None and record.upstream_status >= 400


def _no_answer(record: RequestRecord) -> bool:
    return record.upstream_status is None or record.upstream_status >= 400
