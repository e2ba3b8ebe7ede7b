"""The usual chat body's prompt estimate (`_plain_chat_estimate`) against the general way."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.usage.prompt import _estimate, _plain_chat_estimate, estimate_prompt_tokens

_TEXT = st.text(max_size=40)
# Values a client may put where the fast path looks: text, nothing, and the wrong types.
_ANY = st.one_of(
    st.none(),
    _TEXT,
    st.integers(),
    st.lists(st.one_of(_TEXT, st.dictionaries(st.sampled_from(["text", "type"]), _TEXT))),
    st.dictionaries(_TEXT, _TEXT, max_size=3),
)
_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": _TEXT}),
    st.fixed_dictionaries(
        {"role": st.just("user"), "content": _ANY},
        optional={"name": _ANY, "tool_calls": _ANY},
    ),
    _ANY,
)
_BODY = st.fixed_dictionaries(
    {},
    optional={
        "model": _TEXT,
        "messages": st.one_of(st.lists(_MESSAGE, max_size=5), _ANY),
        "tools": _ANY,
        "functions": _ANY,
    },
)


@given(_BODY)
def test_the_plain_chat_estimate_is_the_general_one(body: dict[str, Any]) -> None:
    plain = _plain_chat_estimate(body)
    general = _estimate("chat.completions", body)
    if plain is not None:
        assert plain == general
    assert estimate_prompt_tokens("chat.completions", body) == general


def test_the_plain_way_takes_the_usual_body_and_leaves_the_rest() -> None:
    """A check that the property above tests the fast way at all: it takes plain messages."""
    usual = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    }
    assert _plain_chat_estimate(usual) == -(-11 // 4) + 2 * 4 + 3
    for other in (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
        {"messages": [{"role": "user", "content": "Hi", "name": "bob"}]},
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}]},
        {"messages": [], "tools": [{"type": "function"}]},
        {"messages": [], "functions": [{"name": "f"}]},
        {"messages": "Hi"},
        {},
    ):
        assert _plain_chat_estimate(other) is None, other
