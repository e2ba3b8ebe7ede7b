"""Per-route behaviour: `RouteOptions` (every key, with its default; `defaults` in the
config), a route as written (`RouteConfig`: the same keys, each optional, plus what the route
matches and where it goes) and how the two resolve into one route's options; its timeouts
(`TimeoutsConfig`) and fallbacks. The top-level config is proxy/config.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator

from proxy.config_types import LABEL_SAFE, LABEL_SAFE_PROBLEM, ConfigModel, PositiveInt, Seconds

TIMEOUT_KEYS = ("connect_s", "headers_s", "first_token_s", "idle_s", "total_s")


class TimeoutsConfig(ConfigModel):
    """Five phases, seconds, `null` = off. See docs/timeouts.md for start points and responses.

    The defaults leave room for reasoning models (a non-streaming answer arrives only after the
    whole generation, headers_s; a streamed one may think before its first visible token,
    first_token_s) while a silent upstream costs at most 2 minutes on a stream, 5 without.
    With fallbacks, headers_s and first_token_s apply per attempt: tighten them per route.
    """

    connect_s: Seconds | None = 10.0
    headers_s: Seconds | None = 300.0
    first_token_s: Seconds | None = 120.0
    idle_s: Seconds | None = 60.0
    total_s: Seconds | None = 3600.0

    def merged(self, override: TimeoutsConfig) -> TimeoutsConfig:
        """Key by key: only the keys the override spelled out (even as null) replace ours."""
        return self.model_copy(update={k: getattr(override, k) for k in override.model_fields_set})

    def impossible(self, explicit: frozenset[str] | set[str]) -> tuple[str, str] | None:
        """A (key, problem) pair when a phase someone set explicitly can never be reached.

        Only keys in `explicit` count: a route that lowers total_s to 60 s while inheriting
        headers_s: 600 is fine (the total caps it); a route that sets first_token_s above its
        total is a contradiction worth stopping for."""
        total = self.total_s
        if total is None:
            return None
        for key in ("connect_s", "headers_s", "first_token_s"):
            value = getattr(self, key)
            if key in explicit and value is not None and value > total:
                return key, f"{value:g} must not exceed total_s ({total:g})"
        return None


class MatchConfig(ConfigModel):
    path_prefix: str = "/v1/"
    model: str | None = None  # a glob, e.g. "gpt-4o*" or "o*"; None matches any (or no) model

    @field_validator("path_prefix")
    @classmethod
    def _under_v1(cls, value: str) -> str:
        if not value.startswith("/v1"):
            raise ValueError(f"must start with /v1, got {value!r}")
        return value


OnDisconnect = Literal["cancel", "drain"]
RequestEncoding = Literal["gzip", "deflate"]
OnDisconnectBackground = Literal["cancel", "keep"]


class RouteOptions(ConfigModel):
    """Per-route behaviour. In `routes[]` every key is optional and inherits from `defaults`."""

    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    # Content-Encodings accepted on request bodies (inflated off the event loop, bounded by
    # limits.max_request_body_mb and limits.max_inflate_ratio). Empty: any encoding gets 415.
    request_encodings: tuple[RequestEncoding, ...] = ()
    # Apply the client's own deadlines: x-hangup-timeout caps total_s; the SDKs'
    # x-stainless-timeout / x-stainless-read-timeout bound the wait for response headers.
    honor_client_deadline: bool = True
    # Let OpenAI SDKs retry our 504s (they do by default; we send x-should-retry: false).
    sdk_retry: bool = False
    # Ask the upstream for a usage chunk on streams (and hide it from clients that did not ask).
    include_usage: bool = True
    # vLLM: per-chunk usage, so counts are exact at the moment we hang up.
    continuous_usage_stats: bool = False
    # Typical completion length assumed for "tokens saved" until enough history exists.
    expected_completion_tokens: PositiveInt = 256
    # cancel: close the upstream when the client leaves. drain: keep reading up to drain_max_s
    # for exact usage (for providers that bill the full response anyway).
    on_disconnect: OnDisconnect = "cancel"
    drain_max_s: Seconds = 30.0
    # Responses API `background: true` streams: cancel the provider-side job, or keep it.
    on_disconnect_background: OnDisconnectBackground = "cancel"
    # Forward the remaining deadline to the upstream in this header (off when null).
    deadline_header: str | None = None
    # Retries on the same target of attempts the upstream refused without starting them
    # (connect failure, 502/503, 429): see docs/resilience.md.
    max_retries: Annotated[int, Field(ge=0, le=10)] = 0
    retry_backoff_s: Seconds = 0.5
    # A 429's Retry-After (or retry-after-ms) is honoured on the same target up to this many
    # seconds; a longer wait moves on to the next target instead.
    retry_after_max_s: Annotated[float, Field(ge=0)] = 2.0
    # Circuit breaking per upstream: after this many consecutive failed attempts the upstream
    # is skipped for circuit_cooldown_s, then one probe request is let through (0: off).
    circuit_failures: Annotated[int, Field(ge=0)] = 5
    circuit_cooldown_s: Seconds = 10.0
    # Hedging (streams, opt-in): when the attempt has sent no content token after this many
    # seconds, start the next target in parallel; the first content token wins, the other is
    # closed at once. None: off.
    hedge_after_s: Seconds | None = None
    # Chat streams cut or stalled after content reached the client: ask a target that accepts
    # an assistant prefix (upstreams.*.assistant_prefix) to continue, and splice it in.
    continue_cut_streams: bool = False


class FallbackConfig(ConfigModel):
    """One more target for a route, tried in order when the previous one failed before any
    content reached the client (see docs/resilience.md)."""

    upstream: str
    # The model to ask this target for; None sends the client's model unchanged.
    model: str | None = None
    # This target takes requests the previous one refused with context_length_exceeded.
    long_context: bool = False


def _takes_null(annotation: Any) -> bool:
    try:
        TypeAdapter(annotation).validate_python(None)
    except ValidationError:
        return False
    return True


# Route options that have no "off" value: in a route, `key: null` is an error (leave the key
# out to inherit `defaults`), not a None slipping past validation into the running options.
# (`timeouts: null` inherits, as `resolved` merges timeouts key by key.)
NOT_NULL = frozenset(
    key
    for key, field in RouteOptions.model_fields.items()
    if key != "timeouts" and not _takes_null(field.annotation)
)


class RouteConfig(ConfigModel):
    name: str
    match: MatchConfig = Field(default_factory=MatchConfig)
    upstream: str
    fallbacks: list[FallbackConfig] = Field(default_factory=list)
    timeouts: TimeoutsConfig | None = None
    request_encodings: tuple[RequestEncoding, ...] | None = None
    honor_client_deadline: bool | None = None
    sdk_retry: bool | None = None
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None
    expected_completion_tokens: PositiveInt | None = None
    on_disconnect: OnDisconnect | None = None
    drain_max_s: Seconds | None = None
    on_disconnect_background: OnDisconnectBackground | None = None
    deadline_header: str | None = None
    max_retries: Annotated[int, Field(ge=0, le=10)] | None = None
    retry_backoff_s: Seconds | None = None
    retry_after_max_s: Annotated[float, Field(ge=0)] | None = None
    circuit_failures: Annotated[int, Field(ge=0)] | None = None
    circuit_cooldown_s: Seconds | None = None
    hedge_after_s: Seconds | None = None
    continue_cut_streams: bool | None = None

    @field_validator("name")
    @classmethod
    def _label_safe(cls, value: str) -> str:
        # Route names become metric label values: keep them short and printable.
        if not LABEL_SAFE.fullmatch(value):
            raise ValueError(LABEL_SAFE_PROBLEM)
        return value

    def resolved(self, defaults: RouteOptions) -> RouteOptions:
        update: dict[str, Any] = {}
        for key in RouteOptions.model_fields:
            if key == "timeouts" or key not in self.model_fields_set:
                continue
            update[key] = getattr(self, key)
        timeouts = defaults.timeouts
        if self.timeouts is not None:
            timeouts = timeouts.merged(self.timeouts)
        update["timeouts"] = timeouts
        return defaults.model_copy(update=update)
