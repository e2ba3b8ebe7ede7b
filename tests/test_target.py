"""proxy/target.py on its own: the upstream URL keeps base_url's scheme, host and port
whatever the path says (the socket-level attacks are in test_hostile_requests.py)."""

from __future__ import annotations

import pytest
from yarl import URL

from proxy.errors import BadRequest
from proxy.target import TargetMismatch, checked, safe_upstream_id, upstream_url


def build(base: str, raw_path: str, query: str = "") -> URL:
    return upstream_url(base, raw_path, URL(raw_path, encoded=True).path, query)


@pytest.mark.parametrize(
    ("base", "raw_path", "query", "expected"),
    [
        ("http://127.0.0.1:8", "/v1/chat/completions", "", "http://127.0.0.1:8/chat/completions"),
        (
            "https://api.example/v1",
            "/v1/files/a%20b",
            "x=1",
            "https://api.example/v1/files/a%20b?x=1",
        ),
        (
            "http://[::1]:9/openai/v1/",
            "/v1/models/m%3Fx",
            "",
            "http://[::1]:9/openai/v1/models/m%3Fx",
        ),
        ("http://h", "/v1/@evil.example/x", "", "http://h/@evil.example/x"),
        ("http://h:1", "/v1/x", "a=@b:2/c", "http://h:1/x?a=@b:2/c"),
    ],
)
def test_the_url_is_the_base_url_plus_the_decoded_tail(
    base: str, raw_path: str, query: str, expected: str
) -> None:
    url = build(base, raw_path, query)
    assert str(url) == expected
    assert (url.scheme, url.host, url.port) == (URL(base).scheme, URL(base).host, URL(base).port)


@pytest.mark.parametrize(
    "raw_path", ["/v%31/x", "/%761/x", "/V1/x", "/v1", "//v1/x", "/v1/..%2f", "/v1/a/..%5c"]
)
def test_targets_that_do_not_begin_with_a_literal_v1_or_climb_are_refused(raw_path: str) -> None:
    with pytest.raises(BadRequest):
        build("http://10.0.0.1", raw_path)


def test_a_url_for_another_origin_is_refused() -> None:
    with pytest.raises(TargetMismatch):
        checked(URL("http://10.0.0.131/x"), "http://10.0.0.1")
    with pytest.raises(TargetMismatch):
        checked(URL("http://u@10.0.0.1/x"), "http://10.0.0.1")
    assert checked(URL("http://10.0.0.1:80/x"), "http://10.0.0.1").port == 80


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("resp_68a1b2", True),
        ("0b4c-uuid-like", True),
        ("../../admin/keys", False),
        ("a/b", False),
        ("", False),
        ("a" * 201, False),
        ("a%2f", False),
    ],
)
def test_upstream_ids_must_be_plain(value: str, safe: bool) -> None:
    assert safe_upstream_id(value) is safe


def test_remembered_urls_are_the_ones_built_and_refusals_are_never_remembered() -> None:
    """upstream_url remembers the URLs it built: asked again (and with a long target, which is
    not remembered) the answer is the same; a refused target is refused every time; the same
    target for another upstream gets that upstream's URL."""
    for _ in range(3):
        assert str(build("http://10.0.0.1:5", "/v1/chat/completions")) == (
            "http://10.0.0.1:5/chat/completions"
        )
        assert str(build("http://10.0.0.2", "/v1/chat/completions", "a=1")) == (
            "http://10.0.0.2/chat/completions?a=1"
        )
        long = "/v1/" + "x" * 600
        assert str(build("http://10.0.0.1", long)) == "http://10.0.0.1/" + "x" * 600
        for hostile in ("/v1/../x", "/v%31/x", "/v1/a\x00"):
            with pytest.raises(BadRequest):
                build("http://10.0.0.1", hostile)
