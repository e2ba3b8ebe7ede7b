"""Pure route matching: (path, model) -> the first route that matches, fully resolved."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from proxy.config import HangupConfig, UpstreamConfig
from proxy.route_options import RouteOptions


@dataclass(frozen=True, slots=True)
class Target:
    """One place a route's request may go: the primary upstream or a fallback."""

    upstream_name: str
    upstream: UpstreamConfig
    model: str | None = None  # rename the request's model for this target (None: as sent)
    long_context: bool = False  # takes requests refused with context_length_exceeded


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    path_prefix: str
    model_glob: str | None
    model_pattern: re.Pattern[str] | None
    upstream_name: str
    upstream: UpstreamConfig
    options: RouteOptions
    fallbacks: tuple[Target, ...] = ()
    # The primary first, then the fallbacks in their configured order (made once: every
    # request of the route reads it).
    targets: tuple[Target, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "targets", (Target(self.upstream_name, self.upstream), *self.fallbacks)
        )

    def matches(self, path: str, model: str | None) -> bool:
        if not path.startswith(self.path_prefix):
            return False
        if self.model_pattern is None:
            return True
        return model is not None and self.model_pattern.fullmatch(model) is not None


class Router:
    def __init__(self, config: HangupConfig) -> None:
        self.routes: tuple[Route, ...] = tuple(
            Route(
                name=route.name,
                path_prefix=route.match.path_prefix,
                model_glob=route.match.model,
                # Globs are case-sensitive: model ids are.
                model_pattern=None
                if route.match.model is None
                else re.compile(fnmatch.translate(route.match.model)),
                upstream_name=route.upstream,
                upstream=config.upstreams[route.upstream],
                options=options,
                fallbacks=tuple(
                    Target(f.upstream, config.upstreams[f.upstream], f.model, f.long_context)
                    for f in route.fallbacks
                ),
            )
            for route, options in config.route_options()
        )

    def match(self, path: str, model: str | None) -> Route | None:
        for route in self.routes:
            if route.matches(path, model):
                return route
        return None

    def encodings_for(self, path: str) -> set[str]:
        """Request Content-Encodings some route serving `path` accepts (whatever the model)."""
        return {
            e
            for r in self.routes
            if path.startswith(r.path_prefix)
            for e in r.options.request_encodings
        }

    def exact_models(self) -> set[str]:
        """Models named literally in route matches (globs without wildcards)."""
        return {
            r.model_glob
            for r in self.routes
            if r.model_glob is not None and not any(c in r.model_glob for c in "*?[")
        }
