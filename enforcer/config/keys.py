"""Walking the parsed YAML key by key: every problem is recorded with its key path and
``file:line`` (``portal.url (config.yaml:7)``) and reading goes on with the default, so one run
names them all.

A module of its own so that the section readers (``sections``) and the entry points
(``reader``) can both use it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import yamlsource
from ..issues import Issue

ConfigIssue = Issue  # location is "key.path (file:line)"

KeyPath = tuple[str | int, ...]


def dotted(path: KeyPath) -> str:
    """``subscribers.sessions[1].listen``: a key path as the documentation writes it."""
    return ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path).replace(".[", "[")


def where(located: yamlsource.Located | None, filename: str, path: KeyPath) -> str:
    """``portal.url (config.yaml:7)``: the key path and the line of its closest known ancestor."""
    line = located.line(path) if located is not None else None
    location = f"{filename}:{line}" if line else filename
    return f"{dotted(path) or '(top level)'} ({location})"


class KeyReader:
    """Walks the raw mapping, records issues with key path and line, returns typed values."""

    def __init__(self, located: yamlsource.Located, filename: str) -> None:
        self.located = located
        self.filename = filename
        self.issues: list[ConfigIssue] = []
        #: Key paths whose value was refused, so a default stands in (see ``reader.Reading``).
        self.refused: set[KeyPath] = set()

    def where(self, path: KeyPath) -> str:
        return where(self.located, self.filename, path)

    def given(self, path: KeyPath) -> bool:
        """Whether the file itself names the key (not a default standing in)."""
        return path in self.located.lines

    def fail(self, path: KeyPath, message: str) -> None:
        self.issues.append(ConfigIssue(self.where(path), message))
        self.refused.add(path)

    def flag(self, path: KeyPath, message: str) -> None:
        """An error about keys whose values are each valid but do not go together (two listeners
        on one address): named, but no value is refused, so the checks that use them still run."""
        self.issues.append(ConfigIssue(self.where(path), message))

    def section(self, raw: Any, path: KeyPath, known: set[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail(path, f"expected a mapping, got {type(raw).__name__}")
            return {}
        for key in raw:
            if key not in known:
                # An error, but not a refused value: no value of a known key is replaced by its default.
                self.issues.append(ConfigIssue(self.where(path + (str(key),)),
                                               f"unknown key; expected one of: {', '.join(sorted(known))}"))
        return raw

    def get(self, raw: dict[str, Any], path: KeyPath, convert: Callable[[Any], Any], default: Any) -> Any:
        key = path[-1]
        if key not in raw:
            return default
        try:
            return convert(raw[key])
        except (ValueError, TypeError) as exc:
            self.fail(path, str(exc))
            return default
