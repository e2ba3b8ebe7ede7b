from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import PriceConfig
from proxy.outcome import Cost, Savings, Usage
from proxy.pricing import Price, PriceBook, load_litellm_prices

LITELLM = str(Path(__file__).parent / "fixtures/litellm/model_prices_and_context_window.json")


def test_litellm_file_keeps_token_priced_models_only() -> None:
    prices = load_litellm_prices(LITELLM)
    # sample_spec, dall-e-3 (per pixel) and whisper-1 (per second) are skipped
    assert set(prices) == {
        "gpt-4o",
        "gpt-4o-mini",
        "text-embedding-3-small",
        "openrouter/meta-llama/llama-3-70b-instruct",
    }
    assert prices["gpt-4o"] == Price(2.5, 10.0, 1.25)  # 2.5e-06 USD per token = 2.5 per million
    assert prices["gpt-4o-mini"] == Price(0.15, 0.6, 0.075)
    assert prices["text-embedding-3-small"] == Price(0.02, 0.0, None)


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"{not json", "not valid JSON"), (b"[]", "expected a JSON object"), (b"\xff", "not valid")],
)
def test_bad_price_file_names_the_file(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "prices.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=problem) as info:
        load_litellm_prices(str(path))
    assert str(path) in str(info.value)
    missing = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="cannot read") as info:
        PriceBook.from_config({}, missing)
    assert missing in str(info.value)


def test_lookup_order() -> None:
    book = PriceBook.from_config(
        {"gpt-4o": PriceConfig(input_per_mtok=2.0, output_per_mtok=8.0)}, LITELLM
    )
    assert book.price("gpt-4o") == Price(2.0, 8.0)  # the config wins over the file
    assert book.price("openai/gpt-4o") == Price(2.0, 8.0)  # provider prefix stripped
    assert book.price("azure/gpt-4o-mini") == Price(0.15, 0.6, 0.075)  # from the file
    llama = "openrouter/meta-llama/llama-3-70b-instruct"
    assert book.price(llama) == Price(0.59, 0.79)  # an exact, prefixed file key
    assert book.price("meta-llama/llama-3-70b-instruct") is None  # no key ends the other way
    assert book.price("gpt-4o-2024-08-06") is None  # no fuzzy matching of versions
    assert book.price(None) is None and book.price("") is None


def test_cost() -> None:
    book = PriceBook({"gpt-4o": Price(2.5, 10.0, 1.25)})
    usage = Usage(prompt_tokens=1000, completion_tokens=200, cached_tokens=400, reasoning_tokens=50)
    savings = Savings(tokens_saved=380, tokens_wasted=3)
    cost = book.cost("gpt-4o", usage, savings)
    # 600 * 2.5 + 400 * 1.25 + 200 * 10 = 4000 USD per million tokens; reasoning is in the 200
    assert cost.used_usd == pytest.approx(0.004)
    assert cost.saved_usd == pytest.approx(380 * 10 / 1e6)
    assert cost.wasted_usd == pytest.approx(3 * 10 / 1e6)
    assert cost.priced


def test_cached_input_without_its_own_price_costs_input() -> None:
    book = PriceBook({"m": Price(2.0, 4.0)})
    cost = book.cost("m", Usage(prompt_tokens=100, completion_tokens=0, cached_tokens=100))
    assert cost.used_usd == pytest.approx(100 * 2.0 / 1e6)
    assert (cost.saved_usd, cost.wasted_usd) == (0.0, 0.0)  # priced: nothing saved is 0, not None


def test_unknown_model_is_unpriced_never_guessed() -> None:
    book = PriceBook.from_config({}, LITELLM)
    cost = book.cost("my-finetune", Usage(prompt_tokens=10, completion_tokens=10), Savings())
    assert cost == Cost() and not cost.priced


def test_remembered_prices_are_the_ones_looked_up() -> None:
    """`price` remembers what it found per model name (found or not), within a bound: asked
    again, after the bound was passed and cleared, the answers are the same."""
    configured = Price(input_per_mtok=1.0, output_per_mtok=2.0)
    filed = Price(input_per_mtok=3.0, output_per_mtok=4.0)
    book = PriceBook({"gpt-x": configured}, {"gpt-x": filed, "llama": filed})
    expected = {
        "gpt-x": configured,
        "openai/gpt-x": configured,
        "a/b/llama": filed,
        "llama/": None,  # no name after the slash
        "unknown": None,
        "": None,
        None: None,
    }
    for _ in range(2):
        for model, price in expected.items():
            assert book.price(model) is price, model
    for i in range(2500):  # past the bound: what is remembered is dropped, not wrong
        assert book.price(f"client-{i}/gpt-x") is configured
        assert len(book._found) <= 1024
    for model, price in expected.items():
        assert book.price(model) is price, model


@given(
    st.sampled_from(["gpt-4o", "m", "unpriced", None]),
    st.builds(
        Usage,
        prompt_tokens=st.integers(-5, 10**6),
        completion_tokens=st.integers(-5, 10**6),
        cached_tokens=st.integers(-5, 10**6),
        reasoning_tokens=st.integers(0, 10),
    ),
)
def test_used_usd_is_what_cost_says_was_used(model: str | None, usage: Usage) -> None:
    """An attempt's bill reads `used_usd` (no `Cost` made): the same float `cost` gives."""
    book = PriceBook({"gpt-4o": Price(2.5, 10.0, 1.25), "m": Price(0.15, 0.6)})
    assert book.used_usd(model, usage) == book.cost(model, usage).used_usd
    if model in ("gpt-4o", "m") and usage.completion_tokens > 0:
        assert book.used_usd(model, usage) is not None
