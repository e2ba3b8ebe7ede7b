"""Config errors name the environment variable, never its value; a base_url with credentials
is refused at start-up (issue 13 items 7 and 9)."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError
from proxy.config_file import parse_config

SECRET = "s3cr3t-from-the-environment-91x"
DOC = """\
upstreams:
  a: {base_url: "${UPSTREAM_URL}"}
routes: [{name: d, upstream: a}]
"""


@pytest.mark.parametrize(
    "value",
    [f"http://user:{SECRET}@upstream.internal", f"ftp://{SECRET}", f"no url {SECRET}"],
    ids=["userinfo", "scheme", "garbage"],
)
def test_a_bad_value_from_the_environment_is_named_not_printed(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(DOC, env={"UPSTREAM_URL": value})
    message = str(caught.value)
    assert SECRET not in message
    assert "${UPSTREAM_URL}" in message
    assert "upstreams.a.base_url" in message


def test_a_port_from_the_environment_is_named_not_printed() -> None:
    doc = DOC.replace('"${UPSTREAM_URL}"', "http://127.0.0.1:9") + 'listen: {port: "${P}"}\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(doc, env={"P": SECRET})
    assert SECRET not in str(caught.value) and "${P}" in str(caught.value)


def test_a_base_url_with_credentials_is_refused() -> None:
    doc = DOC.replace('"${UPSTREAM_URL}"', "http://user:pw@127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="must not carry credentials"):
        parse_config(doc, env={})
