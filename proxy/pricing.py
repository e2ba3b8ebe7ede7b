"""Money: token counts times configured prices, never a guessed price.

Prices come from the config's `prices` (USD per million tokens) and, underneath, from an optional
LiteLLM `model_prices_and_context_window.json` (USD per token). A model with no price costs
`Cost()` (all None): the request is counted as unpriced, because a made-up price would put wrong
numbers on a dashboard that nobody can tell from right ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from proxy.config import PriceConfig
from proxy.outcome import Cost, Savings, Usage

__all__ = ["Price", "PriceBook", "load_litellm_prices"]

_PER_MTOK = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. Cached input falls back to the input price when None."""

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None

    @classmethod
    def from_config(cls, config: PriceConfig) -> Price:
        return cls(config.input_per_mtok, config.output_per_mtok, config.cached_input_per_mtok)


def _per_token(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    # LiteLLM writes USD per token (2.5e-06); 12 significant digits drop the float noise of *1e6.
    return float(f"{value * _PER_MTOK:.12g}")


def load_litellm_prices(path: str) -> dict[str, Price]:
    """Models with per-token input and output prices; every other entry is skipped."""
    try:
        with open(path, "rb") as f:
            raw = json.load(f)
    except OSError as exc:
        raise ValueError(f"price file {path}: cannot read it: {exc.strerror or exc}") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"price file {path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"price file {path}: expected a JSON object of models, got {type(raw)}")
    prices: dict[str, Price] = {}
    for name, entry in raw.items():
        # sample_spec documents the format; image, audio and per-second models have no token price.
        if name == "sample_spec" or not isinstance(entry, dict):
            continue
        input_price = _per_token(entry.get("input_cost_per_token"))
        output_price = _per_token(entry.get("output_cost_per_token"))
        if input_price is None or output_price is None:
            continue
        cached = _per_token(entry.get("cache_read_input_token_cost"))
        prices[name] = Price(input_price, output_price, cached)
    return prices


_REMEMBERED_MODELS = 1024


def _names(model: str) -> Iterator[str]:
    """`a/b/c`, then `b/c`, then `c`: a provider-prefixed name also matches the bare one."""
    yield model
    while "/" in model:
        model = model.split("/", 1)[1]
        if model:
            yield model


class PriceBook:
    """Looks prices up by model name; see `price` for the order."""

    __slots__ = ("_configured", "_file", "_found")

    def __init__(
        self, configured: Mapping[str, Price] | None = None, file: Mapping[str, Price] | None = None
    ) -> None:
        self._configured = dict(configured or {})
        self._file = dict(file or {})
        # What `price` found for each model asked about (two or three times a request); the
        # tables never change, and model names are clients' strings: bounded, dropped whole.
        self._found: dict[str, Price | None] = {}

    @classmethod
    def from_config(cls, prices: Mapping[str, PriceConfig], price_file: str | None) -> PriceBook:
        file = load_litellm_prices(price_file) if price_file else {}
        return cls({name: Price.from_config(p) for name, p in prices.items()}, file)

    def price(self, model: str | None) -> Price | None:
        """The configured price of `model`, then of it without its provider prefixes, then the
        same in the price file. The config wins even over an exact match in the file: it is the
        operator's word on what this deployment pays."""
        if not model:
            return None
        try:
            return self._found[model]
        except KeyError:
            pass
        if len(self._found) >= _REMEMBERED_MODELS:
            self._found.clear()
        found = self._found[model] = self._look_up(model)
        return found

    def _look_up(self, model: str) -> Price | None:
        for table in (self._configured, self._file):
            for name in _names(model):
                price = table.get(name)
                if price is not None:
                    return price
        return None

    def used_usd(self, model: str | None, usage: Usage) -> float | None:
        """`cost(model, usage).used_usd`, without the `Cost` (an attempt's bill needs no more)."""
        price = self.price(model)
        return None if price is None else _used(price, usage) / _PER_MTOK

    def cost(self, model: str | None, usage: Usage, savings: Savings | None = None) -> Cost:
        """USD used, saved and wasted; `Cost()` (unpriced) when the model has no price."""
        price = self.price(model)
        if price is None:
            return Cost()
        used = _used(price, usage)
        out = price.output_per_mtok
        saved = wasted = 0.0
        if savings is not None:
            # Dollars are saved only where the bill stops at the hang-up; a self-hosted engine
            # saves compute (tokens_saved), and its tokens in flight cost no invoice either.
            if savings.billing == "stops":
                saved = savings.tokens_saved * out / _PER_MTOK
            if savings.billing != "self_hosted":
                wasted = savings.tokens_wasted * out / _PER_MTOK
        return Cost(used_usd=used / _PER_MTOK, saved_usd=saved, wasted_usd=wasted)


def used_usd_at(price: Price, usage: Usage) -> float:
    """`PriceBook.used_usd` of a price already looked up."""
    return _used(price, usage) / _PER_MTOK


def _used(price: Price, usage: Usage) -> float:
    """USD per million tokens times the tokens `usage` bills at `price` (divide by a million)."""
    prompt = max(0, usage.prompt_tokens)
    cached = min(max(0, usage.cached_tokens), prompt)
    cached_rate = price.cached_input_per_mtok
    if cached_rate is None:
        cached_rate = price.input_per_mtok
    # Reasoning tokens are part of completion_tokens and billed as output: not added again.
    used = (prompt - cached) * price.input_per_mtok + cached * cached_rate
    return used + max(0, usage.completion_tokens) * price.output_per_mtok
