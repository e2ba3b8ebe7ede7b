"""config/hangup.yaml documents every config key with the code's default.

The walk goes over the pydantic models themselves, so a key added to proxy/config.py or
proxy/route_options.py fails here until the shipped config shows it (and its default) too. Keys
that only live inside an empty collection by default (`routes[].fallbacks[]`, `prices.MODEL`)
must appear in the file's commented example. The README's configuration table must name every
top-level section.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

import proxy.config as config_module
import proxy.route_options as route_options_module
from proxy.config import HangupConfig, PriceConfig
from proxy.config_file import parse_config
from proxy.route_options import FallbackConfig, RouteConfig, RouteOptions

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "hangup.yaml"
README = ROOT / "README.md"

# routes[] keys of their own; every other RouteConfig key is a RouteOptions key, documented
# once under `defaults` ("Any key of `defaults` may be set here too").
ROUTE_OWN_KEYS = {"name", "match", "upstream", "fallbacks"}
# The models `undocumented` reached through the shipped file's values.
WALKED: set[type[BaseModel]] = set()


def undocumented(model: type[BaseModel], raw: Any, parsed: BaseModel, where: str) -> list[str]:
    """Problems with one YAML mapping against its model: keys missing, defaults that differ."""
    if not isinstance(raw, dict):
        return [f"{where}: expected a mapping in {SHIPPED.name}, got {raw!r}"]
    WALKED.add(model)
    problems: list[str] = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue  # not a YAML key (HangupConfig.source)
        if model is RouteConfig and name not in ROUTE_OWN_KEYS:
            continue
        key = f"{where}.{name}" if where else name
        if name not in raw:
            problems.append(f"{key}: missing from {SHIPPED.name}")
            continue
        value = getattr(parsed, name)
        if isinstance(value, BaseModel):
            problems += undocumented(type(value), raw[name], value, key)
        elif isinstance(value, dict) and all(isinstance(v, BaseModel) for v in value.values()):
            for item_name, item in value.items():
                problems += undocumented(
                    type(item), raw[name][item_name], item, f"{key}.{item_name}"
                )
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            for i, item in enumerate(value):
                problems += undocumented(type(item), raw[name][i], item, f"{key}[{i}]")
        elif not field.is_required():
            default = field.get_default(call_default_factory=True)
            if value != default:
                problems.append(
                    f"{key}: {SHIPPED.name} shows {value!r}, the code's default is {default!r}"
                )
    return problems


def test_every_config_key_is_shown_with_its_default() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    # An empty environment: `${OPENAI_API_KEY:-}` then shows api_key's default (none).
    parsed = parse_config(text, source=str(SHIPPED), env={})
    assert undocumented(HangupConfig, raw, parsed, "") == []


def test_route_keys_are_own_keys_or_defaults_keys() -> None:
    # A routes[]-only key would otherwise escape the walk above.
    assert set(RouteConfig.model_fields) - ROUTE_OWN_KEYS == set(RouteOptions.model_fields)


def commented_examples(text: str) -> list[dict[str, Any]]:
    """The `{key: value, ...}` mappings written in the file's comment lines."""
    examples: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            continue
        for flow in re.findall(r"\{(?:[^{}]|\{[^{}]*\})*\}", line):  # ${VAR} inside is fine
            try:
                example = yaml.safe_load(flow)
            except yaml.YAMLError:
                continue
            if isinstance(example, dict):
                examples.append(example)
    return examples


def test_keys_inside_empty_collections_have_a_full_example() -> None:
    # Models held only in collections that are empty by default (routes[].fallbacks, prices,
    # auth.keys' named entries) are never reached by the walk over the file's values: the file
    # must show a valid commented example that spells out every one of their keys.
    text = SHIPPED.read_text(encoding="utf-8")
    WALKED.clear()
    undocumented(HangupConfig, yaml.safe_load(text), parse_config(text, env={}), "")
    examples = commented_examples(text)
    unwalked = reachable_models() - WALKED
    expected: set[type[BaseModel]] = {FallbackConfig, PriceConfig}
    assert expected <= unwalked
    for model in sorted(unwalked, key=lambda m: m.__name__):
        full = [e for e in examples if set(e) == set(model.model_fields)]
        assert full, f"no commented example in {SHIPPED.name} with every {model.__name__} key"
        for example in full:
            model.model_validate(example)


def nested_models(model: type[BaseModel]) -> set[type[BaseModel]]:
    """The config models `model`'s keys hold, directly or in a list or dict."""
    found: set[type[BaseModel]] = set()
    for field in model.model_fields.values():
        for class_name in re.findall(r"\b([A-Z][A-Za-z]+)\b", str(field.annotation)):
            for module in (config_module, route_options_module):
                candidate = getattr(module, class_name, None)
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    found.add(candidate)
    return found


def reachable_models() -> set[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [HangupConfig]
    while todo:
        model = todo.pop()
        if model not in seen:
            seen.add(model)
            todo += nested_models(model)
    return seen


def key_names(model: type[BaseModel]) -> set[str]:
    """Every key name in `model` and the models below it."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        if not field.exclude:
            names.add(name)
    for nested in nested_models(model):
        names |= key_names(nested)
    return names


def test_readme_config_table_names_every_key() -> None:
    readme = README.read_text(encoding="utf-8")
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    sections = [
        name
        for name, field in HangupConfig.model_fields.items()
        if not field.exclude and not re.search(rf"`{name}[.\[`]", table)
    ]
    assert sections == []
    keys = sorted(name for name in key_names(HangupConfig) if not re.search(rf"\b{name}\b", table))
    assert keys == []
