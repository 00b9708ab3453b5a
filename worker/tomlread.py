"""Typed reads out of a parsed TOML table, each error naming the file, the section and the key."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from scheduler.durations import parse_duration
from scheduler.errors import ConfigError

T = TypeVar("T")


class Section:
    """One TOML table; remembers which keys were read so unknown ones can be refused."""

    def __init__(self, path: Path, where: str, data: Mapping[str, Any]) -> None:
        self.path = path
        self.where = where
        self.data = data
        self._seen: set[str] = set()

    def fail(self, key: str, problem: str) -> ConfigError:
        place = f"[{self.where}] {key}" if key else f"[{self.where}]"
        return ConfigError(f"{self.path}: {place}: {problem}")

    def _get(self, key: str, kind: type[T] | tuple[type, ...], label: str) -> T | None:
        self._seen.add(key)
        if key not in self.data:
            return None
        value = self.data[key]
        # bool is an int in Python; a TOML `true` must not pass as a number.
        if isinstance(value, bool) and kind is not bool:
            raise self.fail(key, f"expected {label}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(key, f"expected {label}, got {type(value).__name__} {value!r}")
        return value  # type: ignore[return-value]

    def raw(self, key: str) -> Any:
        """The value as parsed (or None), for keys validated elsewhere."""
        self._seen.add(key)
        return self.data.get(key)

    def string(self, key: str, default: str | None = None, *, nonempty: bool = True) -> str | None:
        value = self._get(key, str, "a string")
        if value is None:
            return default
        if nonempty and not value.strip():
            raise self.fail(key, "must not be empty")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, bool, "true or false")
        return default if value is None else value

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self._get(key, int, "an integer")
        if value is None:
            return default
        if not low <= value <= high:
            raise self.fail(key, f"{value} is out of range {low}..{high}")
        return value

    def duration(
        self, key: str, default: str, *, low: timedelta | None = None,
        high: timedelta | None = None,
    ) -> timedelta:
        text = self._get(key, str, 'a duration string with a unit, such as "30s" or "5m"')
        try:
            value = parse_duration(text if text is not None else default)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from exc
        if low is not None and value < low:
            raise self.fail(key, f"{text} is shorter than the minimum {low.total_seconds():g}s")
        if high is not None and value > high:
            raise self.fail(key, f"{text} is longer than the maximum {high.total_seconds():g}s")
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self._get(key, list, "a list of strings")
        if value is None:
            return None
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(key, f"item {i} must be a string, got {type(item).__name__}")
        return list(value)

    def table(self, key: str) -> Mapping[str, Any]:
        value = self._get(key, dict, "a table")
        return {} if value is None else value

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        read = self._get(key, str, "a string")
        value = default if read is None else read
        if value not in allowed:
            raise self.fail(key, f"{value!r} is not one of {', '.join(allowed)}")
        return value

    def check_unknown(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise self.fail(unknown[0], "unknown key" + (
                f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))
