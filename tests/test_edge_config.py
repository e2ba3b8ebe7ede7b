"""The edge's config keys (shipped defaults, located errors) and its rate-limited log."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import ConfigError, ConnectionsConfig, LimitsConfig
from proxy.config_file import parse_config
from proxy.edge.ratelog import RateLimitedLog

ROOT = Path(__file__).resolve().parent.parent
BASE = "upstreams: {u: {base_url: 'http://127.0.0.1:9/v1'}}\nroutes: [{name: r, upstream: u}]\n"


def test_the_shipped_config_states_every_edge_default() -> None:
    shipped: dict[str, Any] = yaml.safe_load((ROOT / "config/hangup.yaml").read_text())
    assert shipped["connections"] == ConnectionsConfig().model_dump()
    limits = LimitsConfig()
    assert shipped["limits"]["max_inflate_ratio"] == limits.max_inflate_ratio
    assert shipped["defaults"]["request_encodings"] == []


@pytest.mark.parametrize(
    ("snippet", "key"),
    [
        ("connections: {max_head_kb: 0}", "connections.max_head_kb"),
        ("connections: {header_timeout_s: -1}", "connections.header_timeout_s"),
        ("connections: {linger_s: 60}", "connections.linger_s"),
        ("connections: {max_conections: 5}", "connections.max_conections"),
        ("defaults: {request_encodings: [br]}", "defaults.request_encodings"),
        ("limits: {max_inflate_ratio: 0.5}", "limits.max_inflate_ratio"),
    ],
)
def test_bad_edge_values_are_located(snippet: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + snippet, source="t.yaml")
    assert caught.value.key.startswith(key), str(caught.value)


def test_a_route_can_accept_an_encoding_the_defaults_refuse() -> None:
    text = BASE.replace("upstream: u}", "upstream: u, request_encodings: [gzip]}")
    config = parse_config(text, source="t.yaml")
    ((_, options),) = config.route_options()
    assert options.request_encodings == ("gzip",)


def test_the_rate_limited_log_says_how_many_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    ratelog = RateLimitedLog(logging.getLogger("hangup.test"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="hangup.test"):
        assert ratelog.warning("flood", "event %d", 1)
        for i in range(500):
            now[0] += 0.001
            assert not ratelog.warning("flood", "event %d", i)
        assert ratelog.warning("other", "a different kind is not held back")
        now[0] += 10.0
        assert ratelog.warning("flood", "event %d", 2)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "event 1",
        "a different kind is not held back",
        "event 2 (and 500 more like it in the last 10s)",
    ]
    assert ratelog.counts == {"flood": 502, "other": 1}
