"""Fuzzing the nft JSON reader: whatever JSON comes back, a ``TableState`` or ``DataplaneError``.

The reader takes libnftables' output, which changes between nft releases and can be anything
when another tool owns a same-named table; a ``KeyError`` or ``TypeError`` there would escape the
reconciler's error handling and stop table repair.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.dataplane.backend import DataplaneError
from enforcer.dataplane.kernel import _element, _key, parse_listing
from enforcer.dataplane.state import TableState

TABLE = "walled_garden"

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
#: Any JSON value, biased towards the keys nft uses so the interesting branches are reached.
KEYS = (st.sampled_from(["nftables", "set", "map", "rule", "table", "name", "elem", "val", "prefix", "addr",
                         "len", "chain", "comment", "goto", "target", "accept", "counter", "layout"])
        | st.text(max_size=8))
json_values = st.recursive(scalars | st.just(TABLE) | st.just("layout")
                           | st.just("walled-garden layout 0123abcd"),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                           max_leaves=40)

element = st.one_of(
    st.text(max_size=20), st.integers(), json_values,
    st.fixed_dictionaries({"prefix": st.fixed_dictionaries({"addr": json_values, "len": json_values})}),
    st.fixed_dictionaries({"elem": st.fixed_dictionaries({"val": json_values})}),
    st.lists(json_values, min_size=2, max_size=2),
    st.tuples(json_values, st.dictionaries(KEYS, json_values, min_size=1, max_size=1)).map(list),
)
container = st.fixed_dictionaries({"table": st.just(TABLE), "name": json_values | st.text(max_size=10)},
                                  optional={"elem": st.lists(element, max_size=5) | json_values})
nft_object = st.one_of(
    st.fixed_dictionaries({"set": container}), st.fixed_dictionaries({"map": container}),
    st.fixed_dictionaries({"rule": st.fixed_dictionaries({"chain": st.just("layout") | json_values},
                                                         optional={"comment": json_values})}),
    json_values)
listings = st.one_of(json_values, st.fixed_dictionaries({"nftables": st.lists(nft_object, max_size=6) | json_values}))


def _reads(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except DataplaneError as exc:
        assert str(exc).startswith("nft listing:"), exc
        return exc


@settings(max_examples=600, deadline=None)
@given(listings)
def test_any_listing_gives_a_table_state_or_a_dataplane_error(data: Any) -> None:
    result = _reads(parse_listing, data, TABLE)
    if isinstance(result, TableState):
        assert result.layout_tag is None or isinstance(result.layout_tag, str)
        for name, items in result.elements.items():
            assert isinstance(name, str)
            assert all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in items.items())
        assert result.sealed <= set(result.elements)


@settings(max_examples=400, deadline=None)
@given(element)
def test_any_element_gives_a_key_or_a_dataplane_error(raw: Any) -> None:
    for result in (_reads(_element, raw), _reads(_key, raw)):
        assert isinstance(result, (tuple, str, DataplaneError))


def test_deeply_nested_elements_are_no_recursion_error() -> None:
    raw: Any = "100.64.0.1"
    for _ in range(100_000):
        raw = {"elem": {"val": raw}}
    assert _key(raw) == "100.64.0.1"


def test_known_bad_shapes_are_named() -> None:
    for data, words in [
        ([], "not a JSON object"),
        ({"nftables": {}}, "'nftables' is not a list"),
        ({"nftables": [{"set": {"table": TABLE, "name": 3}}]}, "without a name"),
        ({"nftables": [{"set": {"table": TABLE, "name": "portal4_32", "elem": {}}}]},
         "portal4_32: 'elem' is not a list"),
        ({"nftables": [{"map": {"table": TABLE, "name": "m", "elem": [["100.64.0.1"]]}}]}, "m: map element"),
        ({"nftables": [{"set": {"table": TABLE, "name": "s", "elem": [{"prefix": {"addr": "100.64.0.0"}}]}}]},
         "s: prefix"),
        ({"nftables": [{"set": {"table": TABLE, "name": "s", "elem": [None]}}]}, "s: unexpected element None"),
    ]:
        result = _reads(parse_listing, data, TABLE)
        assert isinstance(result, DataplaneError) and words in str(result), (data, result)
