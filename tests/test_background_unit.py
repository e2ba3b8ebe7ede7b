"""The pure parts of background cancellation: the URL and what an answer means."""

from __future__ import annotations

import pytest

from proxy.engines.background import cancel_url, classify
from proxy.outcome import BackgroundCancel


def test_cancel_url_appends_to_the_base_path() -> None:
    assert str(cancel_url("https://api.openai.com/v1", "resp_123")) == (
        "https://api.openai.com/v1/responses/resp_123/cancel"
    )
    assert str(cancel_url("http://127.0.0.1:9/openai/v1", "resp_a")) == (
        "http://127.0.0.1:9/openai/v1/responses/resp_a/cancel"
    )


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"id":"resp_1","status":"cancelled"}', BackgroundCancel.CANCELLED),
        (200, b'{"id":"resp_1","status":"in_progress"}', BackgroundCancel.CANCELLED),
        (200, b'{"id":"resp_1","status":"completed"}', BackgroundCancel.ALREADY_FINISHED),
        (200, b'{"id":"resp_1","status":"failed"}', BackgroundCancel.ALREADY_FINISHED),
        (200, b"not json", BackgroundCancel.CANCELLED),
        (404, b'{"error":{"message":"no such response"}}', BackgroundCancel.FAILED),
        (500, b"", BackgroundCancel.FAILED),
    ],
)
def test_classify(status: int, body: bytes, expected: BackgroundCancel) -> None:
    assert classify(status, body) is expected
