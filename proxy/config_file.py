"""Reading the YAML config file into a `HangupConfig`.

Every error names the file, the line, the dotted key and the problem, e.g.
    config/hangup.yaml:14: routes[0].timeouts.first_token_s: must not exceed total_s (1800)
and the proxy does not start. `${VAR}` and `${VAR:-default}` are read from the environment in
string values; an error about such a value names the variable, never its value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from proxy.config import ConfigError, HangupConfig, _Located

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
Path_ = tuple[str | int, ...]


def dotted(loc: Path_) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _line_map(text: str) -> dict[Path_, int]:
    """Map each key path of the YAML document to its 1-based line, for error messages."""
    lines: dict[Path_, int] = {}

    def walk(node: yaml.Node, path: Path_) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                walk(value_node, key)
                lines[key] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return lines


def _line_for(lines: Mapping[Path_, int], loc: Path_) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def _interpolate(
    value: Any, loc: Path_, env: Mapping[str, str], fail: Any, templated: dict[Path_, str]
) -> Any:
    """`value` with ${VAR} references replaced; `templated` learns which keys had them."""
    if isinstance(value, str):
        if _ENV_REF.search(value):
            templated[loc] = value

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problem = f"environment variable {name} is not set and has no default"
            fail(loc, f"{problem} (write ${{{name}:-default}})")
            return ""

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, str(k)), env, fail, templated) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, i), env, fail, templated) for i, v in enumerate(value)]
    return value


def _hide_env_value(message: str, value: object, template: str) -> str:
    """A message about a value that came from the environment names the variable instead:
    the environment is where secrets live, and error output goes to CI logs."""
    if isinstance(value, str) and value:
        message = message.replace(repr(value), template).replace(value, template)
    return message


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def parse_config(
    text: str, *, source: str = "<config>", env: Mapping[str, str] | None = None
) -> HangupConfig:
    """Parse and validate a YAML document; raise `ConfigError` naming file, line and key."""
    env = os.environ if env is None else env
    try:
        raw = yaml.safe_load(text)
        lines = _line_map(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        hint = ""
        if "${" in text and "flow" in str(exc.context or ""):
            hint = " (inside {...} or [...], quote values that use ${VAR})"
        raise ConfigError(source, "", f"invalid YAML: {exc.problem}{hint}", line) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "", "the document must be a mapping of keys", 1)

    def fail(loc: Path_, problem: str) -> None:
        raise ConfigError(source, dotted(loc), problem, _line_for(lines, loc))

    templated: dict[Path_, str] = {}
    data = _interpolate(raw, (), env, fail, templated)
    try:
        config = HangupConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelt key shows up twice: as unknown, and as its real name missing. The
        # unknown one is the operator's actual mistake.
        err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        loc: Path_ = tuple(err["loc"])
        ctx_error = err.get("ctx", {}).get("error")
        if isinstance(ctx_error, _Located):
            fail(ctx_error.loc, ctx_error.problem)
        message = _MESSAGES.get(err["type"], err["msg"])
        if message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        message = message.replace("Input should be", "must be")
        template = templated.get(loc)
        if template is not None:
            message = _hide_env_value(message, err.get("input"), template)
            message += f" (from {template})"
        elif err["type"] not in ("missing", "extra_forbidden", "value_error") and "input" in err:
            value = err["input"]
            if isinstance(value, str | int | float | bool) or value is None:
                message += f" (got {value!r})"
        fail(loc, message)
        raise AssertionError("unreachable") from exc
    return config.model_copy(update={"source": source})


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> HangupConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read the file: {exc.strerror}") from exc
    return parse_config(text, source=str(path), env=env)


def config_for_upstream(base_url: str, *, base: HangupConfig | None = None) -> HangupConfig:
    """`--upstream URL`: one upstream and one catch-all route, other settings kept from `base`."""
    data: dict[str, Any] = {} if base is None else base.model_dump(exclude={"upstreams", "routes"})
    if base is not None:
        # model_dump turns secrets into "**********": carry the real values over.
        data["auth"]["keys"] = [
            {"name": k.name, "key": k.key.get_secret_value()} for k in base.auth.keys
        ]
        if base.metrics.bearer_token is not None:
            data["metrics"]["bearer_token"] = base.metrics.bearer_token.get_secret_value()
    data["upstreams"] = {"default": {"base_url": base_url}}
    data["routes"] = [{"name": "default", "match": {"path_prefix": "/v1/"}, "upstream": "default"}]
    try:
        return HangupConfig.model_validate(data).model_copy(
            update={"source": base.source if base else "--upstream"}
        )
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelt key shows up twice: as unknown, and as its real name missing. The
        # unknown one is the operator's actual mistake.
        err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        raise ConfigError("--upstream", dotted(tuple(err["loc"])), err["msg"]) from exc
