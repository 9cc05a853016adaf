"""``yamlsource.load``: line numbers kept, and with ``plain_strings`` every value is its text,
except (with ``nulls``) an unquoted null, which is None: JSON's ``null`` and YAML's ``~`` or
empty value say "not given"; the text ``"null"`` does not."""

from __future__ import annotations

import json

import pytest
import yaml

from enforcer import yamlsource


@pytest.mark.parametrize("spelling", ["~", "null", "Null", "NULL", ""])
def test_an_unquoted_null_is_none(spelling: str) -> None:
    located = yamlsource.load(f"a: {spelling}\nb: x\n", plain_strings=True, nulls=True)
    assert located.data == {"a": None, "b": "x"}
    assert located.line(("a",)) == 1 and located.line(("b",)) == 2


@pytest.mark.parametrize("spelling", ['"null"', "'null'", "'~'", '""', "nul", "nulls", "none", "None", "0"])
def test_a_quoted_null_or_another_word_stays_text(spelling: str) -> None:
    expected = yaml.safe_load(f"a: {spelling}\n")["a"] if spelling[0] in "'\"" else spelling
    assert yamlsource.load(f"a: {spelling}\n", plain_strings=True, nulls=True).data == {"a": str(expected)}


def test_json_null_is_none_and_json_strings_and_numbers_stay_text() -> None:
    text = json.dumps({"a": None, "b": "null", "c": 12, "d": [None, "~"], "e": {"f": None}}, indent=1)
    located = yamlsource.load(text, plain_strings=True, nulls=True)
    assert located.data == {"a": None, "b": "null", "c": "12", "d": [None, "~"], "e": {"f": None}}
    assert located.line(("e", "f")) == 10


def test_without_nulls_the_plain_loader_keeps_the_text() -> None:
    """The default of ``plain_strings`` is unchanged: ``~`` is the text ``~``."""
    assert yamlsource.load("a: ~\nb: null\nc:\n", plain_strings=True).data == {"a": "~", "b": "null", "c": ""}


def test_ids_that_yaml_would_turn_into_numbers_stay_text_beside_nulls() -> None:
    located = yamlsource.load("a: 0123\nb: 10:20\nc: true\nd: 1e3\ne: ~\n", plain_strings=True, nulls=True)
    assert located.data == {"a": "0123", "b": "10:20", "c": "true", "d": "1e3", "e": None}


def test_the_pure_python_loader_reads_nulls_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where PyYAML has no C extension, the Python ``BaseLoader`` is used: same answers."""
    monkeypatch.setattr(yamlsource, "_PlainNullLoader", yamlsource._with_nulls(yaml.BaseLoader))
    located = yamlsource.load('a: ~\nb: "null"\nc:\nd: 0123\ne: [null, x]\n', plain_strings=True, nulls=True)
    assert located.data == {"a": None, "b": "null", "c": None, "d": "0123", "e": [None, "x"]}


def test_aliases_are_still_refused_with_nulls() -> None:
    with pytest.raises(yamlsource.YamlSyntaxError, match="anchors and aliases"):
        yamlsource.load("a: &x ~\nb: *x\n", plain_strings=True, nulls=True, aliases=False)
