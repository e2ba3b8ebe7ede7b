"""Billing policy for cancelled requests: does hanging up stop the bill?

Closing the connection stops generation and billing at some providers and not at others, and
for non-streamed requests the hosted APIs bill the whole answer whatever happens to the
connection. hangup claims dollars saved only where billing stops (`stops`); a self-hosted engine
saves GPU time but no invoice (`self_hosted`); everywhere else the provider generates and bills
the full answer (`full`), so nothing is saved.

Per upstream, `upstreams.<name>.billing.stream` / `.non_stream` set it; what is not set comes
from `default_policy`: the engine (self-hosted engines), then the host, from the table below,
which follows OpenRouter's documented list ("Stream Cancellation",
openrouter.ai/docs/api-reference/streaming). Unknown hosted providers get `full`: no source
says their billing stops, and a saving that did not happen is worse than one not claimed.
docs/accounting.md has the table with sources.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Final

from yarl import URL

from proxy.config import BillingPolicy, UpstreamConfig

__all__ = [
    "STREAM_BILLED_IN_FULL",
    "STREAM_BILLING_STOPS",
    "default_policy",
    "is_local_host",
    "policy_for",
]

_SELF_HOSTED_ENGINES: Final = frozenset({"vllm", "sglang", "llamacpp"})

# Hosts (suffix match) whose streams stop billing when the connection closes: OpenRouter's list of
# providers for which an aborted stream "immediately stops model processing and billing".
STREAM_BILLING_STOPS: Final[dict[str, str]] = {
    "api.openai.com": "OpenAI",
    "openai.azure.com": "Azure OpenAI",
    "services.ai.azure.com": "Azure AI Foundry",
    "api.anthropic.com": "Anthropic",
    "api.fireworks.ai": "Fireworks",
    "api.deepinfra.com": "DeepInfra",
    "api.together.xyz": "Together",
    "api.together.ai": "Together",
    "api.cohere.ai": "Cohere",
    "api.cohere.com": "Cohere",
    "api.hyperbolic.xyz": "Hyperbolic",
    "api.x.ai": "xAI",
    "api.friendli.ai": "Friendli",
    "llm.chutes.ai": "Chutes",
    "api.deepseek.com": "DeepSeek",
}
# Hosts that bill the whole answer of a cancelled stream: OpenRouter's "not supported" list, and
# Novita, whose own billing guide says a request cancelled once inference started is billed
# (it outranks OpenRouter's listing of Novita as "stops").
STREAM_BILLED_IN_FULL: Final[dict[str, str]] = {
    "amazonaws.com": "AWS Bedrock",
    "api.groq.com": "Groq",
    "generativelanguage.googleapis.com": "Google AI Studio",
    "aiplatform.googleapis.com": "Google Vertex AI",
    "api.mistral.ai": "Mistral",
    "api.perplexity.ai": "Perplexity",
    "huggingface.co": "Hugging Face",
    "api.replicate.com": "Replicate",
    "api.ai21.com": "AI21",
    "api.featherless.ai": "Featherless",
    "api.lambda.ai": "Lambda",
    "api.sambanova.ai": "SambaNova",
    "aliyuncs.com": "Alibaba",
    "nebius.ai": "Nebius",
    "nebius.com": "Nebius",
    "api.minimax.io": "Minimax",
    "modal.run": "Modal",
    "api.novita.ai": "Novita",
    "openrouter.ai": "OpenRouter (depends on the provider it picks)",
}


def _host_matches(host: str, suffix: str) -> bool:
    return host == suffix or host.endswith("." + suffix)


def is_local_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


# Asked for every finished request; parsing the URL and its host cost ~10 us each time, and the
# arguments come from the few configured upstreams.
@functools.lru_cache(maxsize=256)
def default_policy(base_url: str, engine: str, *, stream: bool) -> BillingPolicy:
    """The policy when the config does not say: self-hosted engines and local hosts bill
    nothing per token; a hosted stream stops billing only on a host listed as stopping; a
    non-streamed hosted request is billed in full (OpenRouter: "For non-streaming requests
    ... you will be billed for the complete response")."""
    if engine in _SELF_HOSTED_ENGINES:
        return "self_hosted"
    host = (URL(base_url).host or "").lower()
    if is_local_host(host):
        return "self_hosted"
    if not stream:
        return "full"
    if any(_host_matches(host, suffix) for suffix in STREAM_BILLING_STOPS):
        return "stops"
    return "full"


def policy_for(upstream: UpstreamConfig, *, stream: bool) -> BillingPolicy:
    """The configured policy for this kind of request, else the recognised default."""
    configured = upstream.billing.stream if stream else upstream.billing.non_stream
    if configured is not None:
        return configured
    return default_policy(upstream.base_url, upstream.engine, stream=stream)
