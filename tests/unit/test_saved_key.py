"""``subscribers.saved_key`` (a restart's short way from a saved address to its kernel key)
answers exactly as ``network_key(parse_network(text))`` does, or refuses what it refuses."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.subscribers import key_text, network_key, parse_network, saved_key


def _reference(text: str) -> tuple[int, int, str] | None:
    try:
        return network_key(parse_network(text))
    except ValueError:
        return None


def _ours(text: str) -> tuple[int, int, str] | None:
    try:
        return saved_key(text)
    except ValueError:
        return None


networks = st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
        lambda t: ipaddress.IPv4Network((t[0] >> (32 - t[1]) << (32 - t[1]), t[1]))),
    st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
        lambda t: ipaddress.IPv6Network((t[0] >> (128 - t[1]) << (128 - t[1]), t[1]))))


@settings(max_examples=3000, deadline=None)
@given(networks)
def test_what_key_text_wrote_reads_back_as_its_key(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    key = network_key(network)
    assert saved_key(key_text(key)) == key == _reference(key_text(key))


@settings(max_examples=3000, deadline=None)
@given(st.one_of(networks.map(str), st.text(alphabet="0123456789abcdef:./ x%-+", max_size=45),
                 networks.map(lambda n: f"{n.network_address}/{n.prefixlen}".upper()),
                 networks.map(lambda n: f"{n.broadcast_address}/{n.prefixlen}")))
def test_any_text_reads_as_the_full_parse_reads_it(text: str) -> None:
    assert _ours(text) == _reference(text)


@pytest.mark.parametrize("text", ["::1.2.3.4/128", "::ffff:1.2.3.4/128", "100.64.0.1", "2001:DB8::/56",
                                  "100.64.0.1/33", "100.64.0.1/24", "100.64.0.0/024", "1.2.3.4/ 32"])
def test_unusual_spellings_take_the_long_way_and_agree(text: str) -> None:
    assert _ours(text) == _reference(text)
