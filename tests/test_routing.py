"""Route matching on its own: first match wins, path prefixes, case-sensitive model globs."""

from __future__ import annotations

from typing import Any

from proxy.routing import Router
from tests.support import config_from


def router(*routes: dict[str, Any]) -> Router:
    return Router(
        config_from(
            {
                "upstreams": {"a": {"base_url": "http://127.0.0.1:1/v1"}},
                "routes": [{"upstream": "a", **r} for r in routes],
            }
        )
    )


def matched(r: Router, path: str, model: str | None) -> str | None:
    route = r.match(path, model)
    return None if route is None else route.name


def test_the_first_matching_route_wins_in_config_order() -> None:
    r = router(
        {"name": "mini", "match": {"model": "gpt-4o-mini"}},
        {"name": "gpt", "match": {"model": "gpt-*"}},
        {"name": "rest"},
    )
    assert matched(r, "/v1/chat/completions", "gpt-4o-mini") == "mini"
    assert matched(r, "/v1/chat/completions", "gpt-4o") == "gpt"
    assert matched(r, "/v1/chat/completions", "llama3") == "rest"
    assert matched(r, "/v1/chat/completions", None) == "rest"


def test_globs_are_whole_match_and_case_sensitive() -> None:
    r = router({"name": "gpt", "match": {"model": "gpt-4?"}})
    assert matched(r, "/v1/chat/completions", "gpt-4o") == "gpt"
    assert matched(r, "/v1/chat/completions", "GPT-4o") is None  # model ids are case-sensitive
    assert matched(r, "/v1/chat/completions", "gpt-4o-mini") is None  # not a prefix match
    assert matched(r, "/v1/chat/completions", "my-gpt-4o") is None
    assert matched(r, "/v1/chat/completions", None) is None  # a model glob needs a model


def test_path_prefix() -> None:
    r = router(
        {"name": "emb", "match": {"path_prefix": "/v1/embeddings"}},
        {"name": "other", "match": {"path_prefix": "/v1/chat/"}},
    )
    assert matched(r, "/v1/embeddings", "m") == "emb"
    assert matched(r, "/v1/chat/completions", "m") == "other"
    assert matched(r, "/v1/completions", "m") is None


def test_route_options_and_upstream_are_resolved() -> None:
    r = router({"name": "x", "expected_completion_tokens": 42, "max_retries": 3})
    route = r.match("/v1/models", None)
    assert route is not None
    assert (route.upstream_name, route.upstream.base_url) == ("a", "http://127.0.0.1:1/v1")
    assert (route.options.expected_completion_tokens, route.options.max_retries) == (42, 3)


def test_exact_models_are_the_globs_without_wildcards() -> None:
    r = router(
        {"name": "a", "match": {"model": "gpt-4o-mini"}},
        {"name": "b", "match": {"model": "gpt-*"}},
        {"name": "c", "match": {"model": "llama[23]"}},
        {"name": "d", "match": {"model": "o1?"}},
        {"name": "e"},
    )
    assert r.exact_models() == {"gpt-4o-mini"}
