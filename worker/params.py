"""Job parameters: fan-out sets from `params` / `params_file`, and `{param.name}` argv elements."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError

# Parameter names become CRONSUL_PARAM_<NAME> environment variables.
PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# A whole argv element that stands for one parameter's value.
PLACEHOLDER = re.compile(r"^\{param\.([A-Za-z_][A-Za-z0-9_]{0,63})\}$")
# Values travel in every run message and environment; a megabyte of them is a mistake.
MAX_VALUE_BYTES = 4096
# One tick fans out into at most this many runs (the enqueue of 10,000 takes well under 1 s).
MAX_SETS = 100_000


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def normalise_sets(raw: Any, where: str) -> tuple[dict[str, str], ...]:
    """Validate a list of parameter tables; values become strings. Raises ConfigError."""
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected a list of tables such as [{{app = \"a\"}}]")
    if len(raw) > MAX_SETS:
        raise ConfigError(f"{where}: {len(raw)} parameter sets exceed the limit of {MAX_SETS}")
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not item:
            raise ConfigError(f"{where}: item {i} must be a non-empty table of name = value")
        clean: dict[str, str] = {}
        upper: dict[str, str] = {}
        for name, value in item.items():
            if not PARAM_NAME.match(name):
                raise ConfigError(f"{where}: item {i}: parameter name {name!r} must match "
                                  "[A-Za-z_][A-Za-z0-9_]*")
            if name.upper() in upper:  # both would be CRONSUL_PARAM_<NAME>: one value lost
                raise ConfigError(f"{where}: item {i}: parameters {upper[name.upper()]!r} and "
                                  f"{name!r} differ only in case; both would be "
                                  f"CRONSUL_PARAM_{name.upper()}")
            upper[name.upper()] = name
            text = _scalar(value)
            if text is None:
                raise ConfigError(f"{where}: item {i}: {name} must be a string, number or "
                                  f"boolean, not {type(value).__name__}")
            check_value(name, text, f"{where}: item {i}")
            clean[name] = text
        key = json.dumps(clean, sort_keys=True)
        if key in seen:
            raise ConfigError(f"{where}: item {i} repeats an earlier parameter set {clean}")
        seen.add(key)
        out.append(clean)
    return tuple(out)


def check_value(name: str, value: str, where: str) -> None:
    if "\0" in value:
        raise ConfigError(f"{where}: {name} contains a NUL byte")
    try:
        size = len(value.encode())
    except UnicodeEncodeError as exc:  # JSON's "\ud800": a lone surrogate is no text
        raise ConfigError(f"{where}: {name} is not valid Unicode ({exc.reason} at "
                          f"{exc.start})") from exc
    if size > MAX_VALUE_BYTES:
        raise ConfigError(f"{where}: {name} is longer than {MAX_VALUE_BYTES} bytes")


def load_params_file(path: Path, where: str) -> tuple[dict[str, str], ...]:
    """A TOML file with `params = [...]`, or a JSON file holding the list itself."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read params_file {path}: {exc.strerror}") from exc
    try:
        if path.suffix == ".json":
            raw: Any = json.loads(text)
        else:
            raw = tomllib.loads(text).get("params")
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{where}: params_file {path} is invalid: {exc}") from exc
    except RecursionError as exc:  # json and tomllib recurse into nested arrays
        raise ConfigError(f"{where}: params_file {path} is nested too deeply") from exc
    return normalise_sets(raw, f"{where} params_file {path}")


def placeholders(command: Sequence[str], where: str) -> set[str]:
    """Names used as whole `{param.name}` elements; a placeholder inside a longer string is
    refused, since splicing values into strings is how shell injection starts."""
    names: set[str] = set()
    for i, arg in enumerate(command):
        m = PLACEHOLDER.match(arg)
        if m:
            names.add(m.group(1))
        elif "{param." in arg:
            raise ConfigError(
                f"{where}: command item {i} {arg!r}: {{param.NAME}} must be a whole argv "
                "element (values are never spliced into strings); for --name=value write two "
                "elements [\"--name\", \"{param.name}\"] if the program takes that, or read "
                "$CRONSUL_PARAM_NAME in a script")
    return names


def render_argv(command: Sequence[str], params: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for arg in command:
        m = PLACEHOLDER.match(arg)
        out.append(params[m.group(1)] if m else arg)
    return out
