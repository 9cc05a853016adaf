"""YAML loading that remembers where every value came from.

Operators and billing exports both get errors that point at ``file:line``; PyYAML's plain
``safe_load`` throws the positions away, so we compose the node tree ourselves and keep a
map from key path to line number next to the plain Python data.
"""

from __future__ import annotations

import re
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


_NULL = "tag:yaml.org,2002:null"


def _with_nulls(base: type[Any]) -> type[Any]:
    """``base`` (a plain loader) that reads an unquoted null (``null``, ``Null``, ``NULL``,
    ``~`` or no value at all) as None: JSON's ``null`` (``json.dumps`` of None) and YAML's
    empty value say "not given", which the text "null" does not. A quoted ``"null"`` stays
    that text: the resolver sees only plain scalars."""
    loader: type[Any] = type(f"{base.__name__}WithNulls", (base,), {})
    # YAML 1.1's own null pattern, as ``yaml.SafeLoader`` has it.
    loader.add_implicit_resolver(_NULL, re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
    loader.add_constructor(_NULL, lambda _loader, _node: None)
    return loader


_PlainNullLoader = _with_nulls(_PlainLoader)


#: Most nodes one document may have, counting a node again each time an alias repeats it: a
#: 400-byte "billion laughs" document expands tenfold per level of aliases, so the cap (not
#: the size of the text) is what bounds time and memory. ``load`` callers may set their own.
MAX_NODES = 200_000


def load(text: str, plain_strings: bool = False, *, nulls: bool = False, aliases: bool = True,
         max_nodes: int = MAX_NODES) -> Located:
    """Parse one YAML (or JSON, a YAML subset) document keeping line numbers.

    ``plain_strings`` keeps every scalar as the text written: for billing data, where YAML 1.1
    would otherwise turn an id like ``0123`` into 83 or ``10:20`` into 620, and an empty value
    into None. ``nulls`` (with ``plain_strings``) still reads an unquoted null (``null``,
    ``Null``, ``NULL``, ``~``, an empty value) as None, so a JSON ``null`` or ``mode: ~`` is
    "not given" rather than the text "null"; a quoted ``"null"`` stays text. ``aliases=False``
    refuses anchors and aliases (billing exports have no use for them; they only serve to make
    a small text expand). A document of more than ``max_nodes`` nodes is refused before it is
    built. Raises ``YamlSyntaxError`` and nothing else.
    """
    loader_class = (_PlainNullLoader if nulls else _PlainLoader) if plain_strings else _Loader
    try:
        loader = loader_class(text)
    except (ValueError, TypeError) as exc:     # text the reader cannot take at all (lone surrogates)
        raise YamlSyntaxError(f"cannot be read: {exc}", None) from None
    try:
        if not aliases:
            _refuse_aliases(text, loader_class)
        node = loader.get_single_node()
        if node is None:
            return Located(data=None)
        lines: dict[tuple[str | int, ...], int] = {}
        _index(node, lines, max_nodes)
        return Located(data=loader.construct_document(node), lines=lines)
    except YamlSyntaxError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise YamlSyntaxError(f"{exc.problem or exc.context}", line) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(exc), None) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # The safe constructor's own conversions, e.g. a timestamp 2026-02-30 (ValueError).
        raise YamlSyntaxError(f"a value cannot be read: {exc}", None) from None
    finally:
        loader.dispose()


def _refuse_aliases(text: str, loader_class: type) -> None:
    """Raise at the first anchor or alias; only parses (no nodes built), and only when the
    text has an ``&`` or ``*`` at all, so ordinary exports pay nothing."""
    if "&" not in text and "*" not in text:
        return
    for event in yaml.parse(text, Loader=loader_class):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            raise YamlSyntaxError("anchors and aliases (&name, *name) are not allowed here",
                                  mark.line + 1 if mark is not None else None)


def _index(root: yaml.Node, lines: dict[tuple[str | int, ...], int], max_nodes: int) -> None:
    """Record the line of every mapping key and sequence item; reject duplicate keys and more
    than ``max_nodes`` visits. Iterative, so nesting depth costs no Python stack."""
    visits = 0
    todo: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(root, ())]
    while todo:
        node, path = todo.pop()
        visits += 1
        if visits > max_nodes:
            raise YamlSyntaxError(f"more than {max_nodes} nodes, the cap (an alias counts each time it "
                                  "repeats a node)", node.start_mark.line + 1)
        lines.setdefault(path, node.start_mark.line + 1)
        children: list[tuple[yaml.Node, tuple[str | int, ...]]] = []
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
                if key in seen:
                    raise YamlSyntaxError(f"duplicate key {key!r}", key_node.start_mark.line + 1)
                seen.add(key)
                lines[path + (key,)] = key_node.start_mark.line + 1
                children.append((value_node, path + (key,)))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, path + (i,)) for i, item in enumerate(node.value)]
        todo.extend(reversed(children))          # document order, as the errors read best
