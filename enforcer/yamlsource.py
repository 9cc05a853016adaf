"""YAML loading that remembers where every value came from.

Operators and billing exports both get errors that point at ``file:line``; PyYAML's plain
``safe_load`` throws the positions away, so we compose the node tree ourselves and keep a
map from key path to line number next to the plain Python data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class Located:
    """Plain data plus the 1-based source line of each key path (``("portal", "url")``)."""

    data: Any
    lines: dict[tuple[str | int, ...], int] = field(default_factory=dict)

    def line(self, path: tuple[str | int, ...]) -> int | None:
        """Line of the closest known ancestor of ``path``."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())


class YamlSyntaxError(ValueError):
    """A document that is not YAML at all; ``line`` is 1-based."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PlainLoader = getattr(yaml, "CBaseLoader", yaml.BaseLoader)


def load(text: str, plain_strings: bool = False) -> Located:
    """Parse one YAML (or JSON, a YAML subset) document keeping line numbers.

    ``plain_strings`` keeps every scalar as the text written: for billing data, where YAML 1.1
    would otherwise turn an id like ``0123`` into 83 or ``10:20`` into 620, and an empty value
    into None.
    """
    loader = (_PlainLoader if plain_strings else _Loader)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Located(data=None)
        lines: dict[tuple[str | int, ...], int] = {}
        _index(node, (), lines)
        return Located(data=loader.construct_document(node), lines=lines)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise YamlSyntaxError(f"{exc.problem or exc.context}", line) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(exc), None) from None
    finally:
        loader.dispose()


def _index(node: yaml.Node, path: tuple[str | int, ...], lines: dict) -> None:
    """Record the line of every mapping key and sequence item; reject duplicate keys."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            if key in seen:
                raise YamlSyntaxError(f"duplicate key {key!r}", key_node.start_mark.line + 1)
            seen.add(key)
            _index(value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, path + (i,), lines)
