"""Bounded label values: every label value hangup exports comes from a set with a known maximum.

Metric labels are forever (each distinct value is a new time series in every scraper's TSDB), so
nothing a client typed reaches a label unless it passed three gates: it has the shape of the thing
it claims to be, it does not look like a credential, and there was room in the set for it. Past
the cap, values collapse into "other".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Final

OTHER = "other"
NONE = "none"

# Model ids in the wild: "gpt-4o-mini", "meta-llama/Llama-3.1-8B-Instruct", "llama3:8b-q4_K_M",
# "ft:gpt-4o-mini:org:name:9abcDEF1", "claude-3-5-sonnet@20240620". No spaces, no quotes.
_MODEL_SHAPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,127}")
# Our own endpoint names (proxy/usage/facts.py ENDPOINTS): "chat.completions", "embeddings", ...
_ENDPOINT_SHAPE = re.compile(r"[a-z][a-z0-9_.]{0,31}")

# Prefixes of API keys and tokens people paste into the wrong field.
_SECRET_PREFIXES = (
    "sk-",
    "sk_",
    "rk-",
    "rk_",
    "pk-",
    "pk_",
    "key-",
    "hf_",
    "ghp_",
    "gho_",
    "ghs_",
    "github_pat_",
    "glpat-",
    "xox",
    "akia",
    "aiza",
    "bearer",
    "eyj",  # base64 of '{"' : a JWT
)
# A long unbroken run of letters and digits that mixes both is how random tokens look; real model
# ids break every few characters ("llama-3.1-70b", "2024-08-06").
_RANDOM_RUN = re.compile(r"[A-Za-z0-9]{24,}")


def looks_like_secret(value: str) -> bool:
    """True for strings shaped like credentials; such strings never become label values."""
    if value.lower().startswith(_SECRET_PREFIXES):
        return True
    for run in _RANDOM_RUN.findall(value):
        if any(c.isdigit() for c in run) and any(c.isalpha() for c in run):
            return True
    return False


def model_shaped(value: str) -> bool:
    return _MODEL_SHAPE.fullmatch(value) is not None and not looks_like_secret(value)


def endpoint_shaped(value: str) -> bool:
    return _ENDPOINT_SHAPE.fullmatch(value) is not None and not looks_like_secret(value)


class BoundedLabel:
    """A preset of trusted values plus at most `capacity` admitted ones; the rest is "other".

    `label()` only looks up; `admit()` may grow the set. Keeping them apart lets the caller decide
    when a value has earned a slot (for models: only once the upstream accepted the request, so a
    client cannot fill the slots with made-up names that the upstream rejects).
    """

    def __init__(self, preset: Iterable[str], capacity: int, shaped: Callable[[str], bool]) -> None:
        self._preset = frozenset(preset)
        self._seen: set[str] = set()
        # The preset and the admitted values: each is its own label for good (nothing leaves
        # either set), so a caller that finds a value here needs neither `label` nor `admit`.
        self.known: set[str] = set(self._preset)
        self._capacity = capacity
        self._shaped = shaped

    def label(self, value: str | None) -> str:
        if value is None:
            return NONE
        if value in self.known:
            return value
        return OTHER

    def admit(self, value: str | None) -> str:
        """The label for `value`, taking a free slot for it if it is well shaped."""
        if value is None:
            return NONE
        if value in self.known:
            return value
        if len(self._seen) < self._capacity and self._shaped(value):
            self._seen.add(value)
            self.known.add(value)
            return value
        return OTHER

    @property
    def size_bound(self) -> int:
        """How many distinct values `label()` can ever return (preset, admitted, other, none)."""
        return len(self._preset) + self._capacity + 2


def status_class(status: int | None) -> str:
    """ "2xx".."5xx" for the status the client got; "none" when no response was sent."""
    return CLASS_OF_STATUS.get(status, NONE)


STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", NONE)
# Every status with a class, looked up (the facade reads it inline, without a call).
CLASS_OF_STATUS: Final[dict[int | None, str]] = {
    status: STATUS_CLASSES[status // 100 - 2] for status in range(200, 600)
}
