"""The config's shape: frozen, typed objects, validated once at start-up (reading the YAML
file, `${VAR}` references and located error messages: `proxy/config_file.py`). The top-level
sections are here; routes and their options in `proxy/route_options.py`.

Unknown keys are errors (a typo must not silently fall back to a default); cross-field checks
raise `_Located` so that the error names the key it is about.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from yarl import URL

from proxy.config_types import LABEL_SAFE, LABEL_SAFE_PROBLEM, ConfigModel, PositiveInt, Seconds
from proxy.route_options import NOT_NULL, RouteConfig
from proxy.route_options import RouteOptions as RouteOptions  # proxy/accounting.py imports it here


class ConfigError(Exception):
    """A config problem, located. `str()` is the message an operator sees."""

    def __init__(self, file: str, key: str, problem: str, line: int | None = None) -> None:
        self.file, self.key, self.problem, self.line = file, key, problem, line
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


class ListenConfig(ConfigModel):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # aiohttp's default of 128 drops connections under bursts; the kernel caps it at somaxconn.
    backlog: PositiveInt = 4096
    # Host names served besides IP literals, localhost, *.localhost and `host` (DNS rebinding
    # guard; see docs/security.md). "*.example.com" matches subdomains; "*" accepts any Host.
    allowed_hosts: list[str] = Field(default_factory=list)


class LimitsConfig(ConfigModel):
    # aiohttp's own default is 1 MiB, too small for long prompts and audio uploads.
    max_request_body_mb: Annotated[float, Field(gt=0)] = 64.0
    # A compressed request body (routes' request_encodings) may inflate to at most this many
    # times its compressed size (past 1 MiB): JSON compresses ~5-20x, a deflate bomb ~1000x.
    max_inflate_ratio: Annotated[float, Field(ge=1)] = 100.0

    @property
    def max_request_body_bytes(self) -> int:
        return int(self.max_request_body_mb * 1024 * 1024)


Engine = Literal["generic", "openai", "vllm", "sglang", "llamacpp"]
# stops: billing stops at the hang-up (only what was generated is billed); full: the whole
# answer is billed anyway; self_hosted: no per-token bill (savings are compute, not dollars).
BillingPolicy = Literal["stops", "full", "self_hosted"]


class BillingConfig(ConfigModel):
    """Per upstream, for requests hangup cancels (client gone, timeout, shutdown). None: the
    default recognised from the upstream's host and engine."""

    stream: BillingPolicy | None = None
    non_stream: BillingPolicy | None = None


class ConnectionsConfig(ConfigModel):
    """Client connections: deadlines, a cap, and a bound on each request head. Defaults and
    reasons in docs/security.md ("Connection and body limits")."""

    # Accept (or a kept-alive request's first byte) -> the complete request head.
    header_timeout_s: Seconds = 10.0
    # Idle between two requests on one connection (aiohttp's own default is 3,630 s).
    keepalive_timeout_s: Seconds = 75.0
    # Longest silence while a request body is arriving.
    body_timeout_s: Seconds = 30.0
    # Once a body has been arriving for body_timeout_s, its average rate must stay above this.
    body_min_rate_bytes_s: Annotated[int, Field(ge=0)] = 1024
    # Concurrent client connections; past this, requests get an OpenAI-shaped 503.
    max_connections: PositiveInt = 1024
    # Extra connections, above max_connections, that may only ask /healthz, /readyz or the
    # metrics path: probes keep answering while the proxy is full.
    probe_headroom: Annotated[int, Field(ge=1, le=1024)] = 16
    # Request line plus all header lines, in KiB; past it, 431.
    max_head_kb: Annotated[int, Field(ge=1, le=1024)] = 32
    # After an answer that left request bytes unread: send FIN, discard (never parse or
    # inflate) what still arrives for this long so the client can read the answer, then close.
    # 0: close at once (a client still sending may then see a reset instead of the status).
    linger_s: Annotated[float, Field(ge=0, le=30)] = 1.0


_KEY_CHARS = re.compile(r"[\x21-\x7e]+")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e](?:[ \t\x21-\x7e]*[\x21-\x7e])?)?")


class UpstreamConfig(ConfigModel):
    base_url: str
    # Server-side key. Without it, the client's own Authorization header is passed through.
    api_key: SecretStr | None = None
    # Extra headers sent on every request to this upstream (e.g. OpenAI-Organization).
    headers: dict[str, str] = Field(default_factory=dict)
    # The server software behind base_url: engine aborts (docs/cancellation.md) and exact prompt
    # counts through its tokenize endpoint (docs/accounting.md).
    engine: Engine = "generic"
    # What this upstream bills for a request hangup cancels; omitted keys are recognised from
    # the host and engine (proxy/billing.py, docs/accounting.md "Billing policy").
    billing: BillingConfig = Field(default_factory=lambda: BillingConfig())
    # How this upstream continues an assistant message (for continue_cut_streams): "prefix"
    # (DeepSeek, Mistral), "continue_final_message" (vLLM), or "none" (never asked; OpenAI).
    assistant_prefix: Literal["none", "prefix", "continue_final_message"] = "none"

    @field_validator("base_url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        try:
            url = URL(value)
        except ValueError as exc:
            raise ValueError(f"not a URL: {value!r}") from exc
        if url.user is not None or url.password is not None:
            # aiohttp would send them as Basic auth on every request, beside the api_key.
            raise ValueError("must not carry credentials (user:password@): use api_key or headers")
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {value!r}")
        if url.query_string or url.fragment:
            raise ValueError(f"must not carry a query or fragment, got {value!r}")
        return value.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        # `api_key: ${OPENAI_API_KEY:-}` with the variable unset means "no server-side key".
        if value is not None and not value.get_secret_value():
            return None
        # A key read from a file often ends in a newline: aiohttp then refuses the header on
        # every request (an internal_error each). Refused here, without echoing the value.
        if value is not None and not _KEY_CHARS.fullmatch(value.get_secret_value()):
            raise ValueError(
                "must be printable ASCII without spaces (a trailing newline from a file?)"
            )
        return value

    @field_validator("headers")
    @classmethod
    def _sendable_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, field_value in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {name!r} is not an HTTP token")
            if not _HEADER_VALUE.fullmatch(field_value):
                # The value may be a secret: name the header, never the value.
                raise ValueError(
                    f"header {name!r}: its value must be printable ASCII (no control "
                    "characters, no trailing newline)"
                )
        return value


class PriceConfig(ConfigModel):
    """USD per million tokens."""

    input_per_mtok: Annotated[float, Field(ge=0)]
    output_per_mtok: Annotated[float, Field(ge=0)]
    cached_input_per_mtok: Annotated[float, Field(ge=0)] | None = None


class MetricsConfig(ConfigModel):
    enabled: bool = True
    path: str = "/metrics"
    bearer_token: SecretStr | None = None
    # Models seen in requests beyond the configured ones become label "other" past this many.
    max_models: Annotated[int, Field(ge=1, le=1000)] = 50


class ClientKey(ConfigModel):
    """A named client: the name (never the key) appears in logs, metrics and traces."""

    name: str
    key: SecretStr

    @field_validator("name")
    @classmethod
    def _label_safe(cls, value: str) -> str:
        # Client names become metric label values: short and printable, like route names.
        if not LABEL_SAFE.fullmatch(value):
            raise ValueError(LABEL_SAFE_PROBLEM)
        return value


def unnamed_client(index: int) -> str:
    """The name a bare-string entry of `auth.keys` is known by: its position in the list."""
    return f"key-{index}"


class AuthConfig(ConfigModel):
    # Bearer tokens clients must present: bare strings, or {name: team-search, key: ${KEY}}.
    # A bare string is the client named by its position, "key-0", "key-1", ...
    keys: list[ClientKey] = Field(default_factory=list)
    # Needed to run an open relay that injects a server-side key on a non-loopback listener.
    allow_unauthenticated: bool = False

    @field_validator("keys", mode="before")
    @classmethod
    def _name_bare_keys(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        return [
            {"name": unnamed_client(i), "key": entry} if isinstance(entry, str) else entry
            for i, entry in enumerate(value)
        ]

    @model_validator(mode="after")
    def _unique_names(self) -> AuthConfig:
        seen: set[str] = set()
        for i, entry in enumerate(self.keys):
            if entry.name in seen:
                raise _Located(
                    ("auth", "keys", i, "name"), f"two auth.keys entries are named {entry.name!r}"
                )
            seen.add(entry.name)
        return self

    def client_names(self) -> list[str]:
        return [entry.name for entry in self.keys]


class CorsConfig(ConfigModel):
    """Browsers: refused unless their page's origin is listed (see docs/security.md)."""

    # Exact origins, e.g. "https://app.example.com", or "*" for any page on the web.
    allowed_origins: list[str] = Field(default_factory=list)
    # Pass the upstream's Access-Control-* response headers on (dropped by default).
    relay_upstream_headers: bool = False


class ShutdownConfig(ConfigModel):
    grace_s: Annotated[float, Field(ge=0)] = 30.0


class LoggingConfig(ConfigModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = True
    health_checks: bool = False  # log /healthz, /readyz and /metrics hits as traffic
    # json: one JSON object a line (for collectors). text: one readable line (for terminals).
    format: Literal["json", "text"] = "json"


class TracingConfig(ConfigModel):
    """OpenTelemetry traces (needs `pip install 'hangup[otel]'`); see docs/observability.md.

    The standard OTEL_* environment variables configure the exporter, sampler and resource; the
    keys here only fill in what the environment leaves unset."""

    # auto: on when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set.
    enabled: bool | Literal["auto"] = "auto"
    # The OTLP/HTTP traces URL, e.g. http://otel-collector:4318/v1/traces.
    endpoint: str | None = None
    service_name: str = "hangup"
    # Finished requests waiting for export (each becomes 1 + attempts spans); past this the
    # oldest are dropped (a warning in the log), so a collector that is down never grows memory.
    max_queued_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 2048


class HangupConfig(ConfigModel):
    listen: ListenConfig = Field(default_factory=ListenConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    connections: ConnectionsConfig = Field(default_factory=ConnectionsConfig)
    upstreams: Annotated[dict[str, UpstreamConfig], Field(min_length=1)]
    routes: Annotated[list[RouteConfig], Field(min_length=1)]
    defaults: RouteOptions = Field(default_factory=RouteOptions)
    prices: dict[str, PriceConfig] = Field(default_factory=dict)
    # A LiteLLM `model_prices_and_context_window.json`; `prices` entries take precedence.
    price_file: str | None = None
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    cors: CorsConfig = Field(default_factory=CorsConfig)
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)

    # Where the config came from, for messages (not a YAML key).
    source: str = Field(default="<config>", exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> HangupConfig:
        names: set[str] = set()
        for i, route in enumerate(self.routes):
            if route.name in names:
                raise _Located(("routes", i, "name"), f"duplicate route name {route.name!r}")
            names.add(route.name)
            if route.upstream not in self.upstreams:
                known = ", ".join(sorted(self.upstreams))
                raise _Located(
                    ("routes", i, "upstream"),
                    f"no upstream named {route.upstream!r} (known: {known})",
                )
            for j, fallback in enumerate(route.fallbacks):
                if fallback.upstream not in self.upstreams:
                    known = ", ".join(sorted(self.upstreams))
                    raise _Located(
                        ("routes", i, "fallbacks", j, "upstream"),
                        f"no upstream named {fallback.upstream!r} (known: {known})",
                    )
            for key in sorted(route.model_fields_set & NOT_NULL):
                if getattr(route, key) is None:
                    raise _Located(
                        ("routes", i, key),
                        f"must not be null (leave {key} out to inherit defaults.{key})",
                    )
            explicit = route.timeouts.model_fields_set if route.timeouts is not None else set()
            problem = route.resolved(self.defaults).timeouts.impossible(explicit)
            if problem is not None:
                raise _Located(("routes", i, "timeouts", problem[0]), problem[1])
        problem = self.defaults.timeouts.impossible(self.defaults.timeouts.model_fields_set)
        if problem is not None:
            raise _Located(("defaults", "timeouts", problem[0]), problem[1])
        if not self.metrics.path.startswith("/") or self.metrics.path.startswith("/v1"):
            raise _Located(("metrics", "path"), "must start with / and not be under /v1")
        return self

    def route_options(self) -> Iterator[tuple[RouteConfig, RouteOptions]]:
        for route in self.routes:
            yield route, route.resolved(self.defaults)


class _Located(ValueError):
    """Raised by cross-field checks so the error lands on the right key, not the root."""

    def __init__(self, loc: tuple[str | int, ...], problem: str) -> None:
        super().__init__(problem)
        self.loc, self.problem = loc, problem
