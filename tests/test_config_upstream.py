"""`--upstream URL` (config_for_upstream) and the fallback check, at the config level."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError
from proxy.config_file import config_for_upstream
from tests.support import config_from

SIM = "http://127.0.0.1:9/v1"


def test_upstream_alone_is_one_upstream_and_a_catch_all_route() -> None:
    config = config_for_upstream(SIM)
    assert list(config.upstreams) == ["default"]
    assert config.upstreams["default"].base_url == SIM
    assert [(r.name, r.match.path_prefix, r.upstream) for r in config.routes] == [
        ("default", "/v1/", "default")
    ]
    assert config.source == "--upstream"


def test_upstream_over_a_config_keeps_its_settings_and_real_secrets() -> None:
    base = config_from(
        {
            "upstreams": {"a": {"base_url": "http://127.0.0.1:1/v1"}},
            "routes": [{"name": "r", "upstream": "a"}],
            "auth": {"keys": ["sk-proxy-key-1"]},
            "metrics": {"bearer_token": "scrape-token", "max_models": 7},
        }
    )
    config = config_for_upstream(SIM, base=base)
    assert list(config.upstreams) == ["default"] and config.routes[0].name == "default"
    assert config.metrics.max_models == 7
    # Not the "**********" that model_dump shows: the keys still work.
    assert [k.key.get_secret_value() for k in config.auth.keys] == ["sk-proxy-key-1"]
    assert config.metrics.bearer_token is not None
    assert config.metrics.bearer_token.get_secret_value() == "scrape-token"
    assert config.source == base.source


def test_a_bad_upstream_url_is_a_located_error() -> None:
    with pytest.raises(ConfigError) as caught:
        config_for_upstream("not a url")
    assert caught.value.file == "--upstream"
    assert caught.value.key.startswith("upstreams.default")


def test_a_fallback_to_an_unknown_upstream_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no upstream named 'nope' \(known: a\)"):
        config_from(
            {
                "upstreams": {"a": {"base_url": SIM}},
                "routes": [{"name": "r", "upstream": "a", "fallbacks": [{"upstream": "nope"}]}],
            }
        )
