"""OpenAI-shaped errors as the simulated provider sends them.

The simulator plays the upstream, so it mirrors what OpenAI puts on the wire (`type` and `code`
per status), not hangup's own error vocabulary in `proxy/errors.py`.
"""

from __future__ import annotations

import json

# status -> (type, code), after the shapes api.openai.com returns.
_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", None),
    409: ("invalid_request_error", None),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
}


class ApiError(Exception):
    """An error the simulator answers with; raised before the response is prepared."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = 1.0,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def payload(self) -> dict[str, object]:
        return error_payload(self.status, self.message, param=self.param, code=self.code)

    def headers(self) -> dict[str, str]:
        # Like OpenAI: a 429 tells the client when to come back (the SDK honours it).
        if self.status != 429 or self.retry_after is None:
            return {}
        return {"retry-after": f"{self.retry_after:g}"}


def error_payload(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    kind, default_code = _KINDS.get(status, ("server_error", None))
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code if code is not None else default_code,
        }
    }


def error_json(status: int, message: str, **kw: str | None) -> bytes:
    return json.dumps(error_payload(status, message, **kw), separators=(",", ":")).encode()
