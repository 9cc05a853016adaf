"""Throttle mode: ``policy.throttle_rate``/``throttle_burst``, the rules that enforce them, and the
throttle sets the reconciler keeps (the kernel test measures the rate: tests/kernel/test_throttle_rate.py)."""

from __future__ import annotations

import ipaddress
import re

import pytest

from enforcer.config import ConfigError, parse_config, parse_rate, parse_size
from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.kernel import parse_listing
from enforcer.dataplane.layout import Layout, throttle_meter, throttle_set
from enforcer.model import Mode
from enforcer.policy import Decision
from enforcer.reconciler import Reconciler, subscriber_elements
from enforcer.subscribers import Subscriber

net = ipaddress.ip_network
MINIMAL = "subscribers:\n  source: /srv/list.csv\n"


def policy(**keys: str) -> str:
    return MINIMAL + "policy:\n" + "".join(f"  {k}: {v}\n" for k, v in keys.items())


def wheres(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return [i.where for i in info.value.issues]


# -- config ---------------------------------------------------------------------------------

def test_defaults_are_one_megabit_and_a_64_kib_burst():
    p = parse_config(MINIMAL).policy
    assert p.throttle_rate == 125_000
    assert p.throttle_burst == 65536


@pytest.mark.parametrize("text, rate", [
    ("1 mbit/s", 125_000), ("512 kbit/s", 64_000), ("2 mbyte/s", 2_000_000), ("4mbit/s", 500_000),
    ("1.5 Mbit/s", 187_500), ("10 Gbit/s", 1_250_000_000), ("100 kbyte/second", 100_000),
    ("100 KiB/s", 102_400), ("1 MB/s", 1_000_000), ("8 kbit/sec", 1000), ("1 mibit/s", 131_072),
])
def test_parse_rate(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("value", ["1 mbit", "5", 5, "1 Mb/s", "fast", "", "-1 mbit/s", "1 bit/s", "7 kbit/s",
                                   "1e3 mbit/s", True, None, "1 mbit/h"])
def test_parse_rate_rejects(value):
    with pytest.raises((ValueError, TypeError)):
        parse_rate(value)


@pytest.mark.parametrize("value, size", [(65536, 65536), ("64 kbyte", 64_000), ("64 KiB", 65536), ("1 MB", 10**6),
                                         ("0", 0), (0, 0), ("1500 bytes", 1500), ("2 mibyte", 2 << 20)])
def test_parse_size(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["64 kbit", "5 Mb", "-1", 1.5, True, None, "a lot", "5 GiB"])
def test_parse_size_rejects(value):
    with pytest.raises((ValueError, TypeError)):
        parse_size(value)


def test_configured_rate_and_burst():
    p = parse_config(policy(throttle_rate='"4 mbit/s"', throttle_burst='"128 KiB"')).policy
    assert (p.throttle_rate, p.throttle_burst) == (500_000, 131_072)


def test_default_burst_follows_the_rate():
    assert parse_config(policy(throttle_rate='"100 mbit/s"')).policy.throttle_burst == 1_250_000  # 0.1 s
    assert parse_config(policy(throttle_rate='"2 mbit/s"')).policy.throttle_burst == 65536       # the floor


def test_burst_as_plain_bytes():
    assert parse_config(policy(throttle_burst="32768")).policy.throttle_burst == 32768


@pytest.mark.parametrize("key, value", [
    ("throttle_rate", '"1 mbit"'), ("throttle_rate", "1000000"), ("throttle_rate", '"1 Mb/s"'),
    ("throttle_rate", '"1 bit/s"'), ("throttle_rate", "[1]"),
    ("throttle_burst", '"64 kbit"'), ("throttle_burst", "-1"), ("throttle_burst", "1.5"),
    ("throttle_burst", '"8 GB"'),
])
def test_bad_values_are_named_by_key_path_and_line(key, value):
    assert wheres(policy(payment_grace="3d", **{key: value})) == [f"policy.{key} (config.yaml:5)"]


def test_both_bad_are_both_reported():
    assert wheres(policy(throttle_rate='"x"', throttle_burst='"y"')) == [
        "policy.throttle_rate (config.yaml:4)", "policy.throttle_burst (config.yaml:5)"]


def test_misspelt_key_is_unknown():
    (where,) = wheres(policy(throttle_rat='"1 mbit/s"'))
    assert where == "policy.throttle_rat (config.yaml:4)"


# -- layout ---------------------------------------------------------------------------------

def layout(**kw) -> Layout:
    args = {"table": "walled_garden", "interfaces": ("eth1",), "allow": (net("192.0.2.0/24"),), "dns": None,
            "portal_port": 8080, "throttle_rate": 500_000, "throttle_burst": 65536}
    args.update(kw)
    return Layout(**args)


def chain(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"\tchain {name} {{")
    return [line.strip() for line in lines[start + 1:lines.index("\t}", start)]]


LIMIT = "limit rate over 500000 bytes/second burst 65536 bytes"


def test_layout_defaults_match_the_config_defaults():
    p = parse_config(MINIMAL).policy
    plain = Layout("t", (), (), None, 8080)
    assert (plain.throttle_rate, plain.throttle_burst) == (p.throttle_rate, p.throttle_burst)


def test_throttle_sets_and_meters_per_prefix_length():
    text = layout().with_prefixes({(4, 24)}).render()
    for version, plen in ((4, 32), (4, 24), (6, 128), (6, 64), (6, 56)):
        addr = "ipv4_addr" if version == 4 else "ipv6_addr"
        assert f"\tset throttle{version}_{plen} {{ type {addr}; }}" in text
        for direction in ("up", "down"):
            assert (f"\tset thr{direction}{version}_{plen} {{ type {addr}; size 1048576; "
                    "flags dynamic,timeout; timeout 1m; }") in text
    assert throttle_set(6, 56) == "throttle6_56" and throttle_meter(4, 32, "up") == "thrup4_32"


def test_upload_is_limited_in_the_throttle_chain_longest_prefix_first():
    rules = chain(layout().with_prefixes({(4, 24)}).render(), "throttle")
    assert rules[:4] == ["ip daddr @allow4 accept", "ip6 daddr @allow6 accept",
                         "ip daddr @allowhost4 accept", "ip6 daddr @allowhost6 accept"]
    assert rules[4:] == [
        f"ip saddr @throttle4_32 update @thrup4_32 {{ ip saddr {LIMIT} }} drop",
        "ip saddr @throttle4_32 accept",
        f"ip saddr & 255.255.255.0 @throttle4_24 update @thrup4_24 {{ ip saddr & 255.255.255.0 {LIMIT} }} drop",
        f"ip6 saddr @throttle6_128 update @thrup6_128 {{ ip6 saddr {LIMIT} }} drop",
        "ip6 saddr @throttle6_128 accept",
        (f"ip6 saddr & ffff:ffff:ffff:ffff:: @throttle6_64 update @thrup6_64 "
         f"{{ ip6 saddr & ffff:ffff:ffff:ffff:: {LIMIT} }} drop"),
        "ip6 saddr & ffff:ffff:ffff:ffff:: @throttle6_64 accept",
        (f"ip6 saddr & ffff:ffff:ffff:ff00:: @throttle6_56 update @thrup6_56 "
         f"{{ ip6 saddr & ffff:ffff:ffff:ff00:: {LIMIT} }} drop"),
    ]


def test_download_is_limited_by_daddr_before_the_subscribers_own_packets():
    text = layout().render()
    hook = chain(text, "forward")
    # one base chain; the interface tested once per direction, downloads first
    assert hook == ["type filter hook forward priority filter - 10; policy accept;",
                    'oifname { "eth1" } jump to_subscriber', 'iifname { "eth1" } jump from_subscriber']
    rules = chain(text, "to_subscriber")
    oif = ""
    assert rules[0] == (f"{oif}ip daddr @throttle4_32 ip saddr != @allow4 ip saddr != @allowhost4 "
                        f"update @thrdown4_32 {{ ip daddr {LIMIT} }} drop")
    assert rules[1] == "meta nfproto ipv4 return"
    # An address whose longest entry is another mode is never limited by a shorter throttled prefix;
    # never ``accept`` (it would end the base chain before ``from_subscriber``), only ``return``.
    assert not any(r.endswith("accept") for r in rules)
    v6 = [r for r in rules if "ip6" in r]
    assert v6 == [
        (f"{oif}ip6 daddr @throttle6_128 ip6 saddr != @allow6 ip6 saddr != @allowhost6 "
         f"update @thrdown6_128 {{ ip6 daddr {LIMIT} }} drop"),
        f"{oif}ip6 daddr @notice6_128 return",
        f"{oif}ip6 daddr @portal6_128 return",
        (f"{oif}ip6 daddr & ffff:ffff:ffff:ffff:: @throttle6_64 ip6 saddr != @allow6 ip6 saddr != @allowhost6 "
         f"update @thrdown6_64 {{ ip6 daddr & ffff:ffff:ffff:ffff:: {LIMIT} }} drop"),
        f"{oif}ip6 daddr & ffff:ffff:ffff:ffff:: @notice6_64 return",
        f"{oif}ip6 daddr & ffff:ffff:ffff:ffff:: @portal6_64 return",
        (f"{oif}ip6 daddr & ffff:ffff:ffff:ff00:: @throttle6_56 ip6 saddr != @allow6 ip6 saddr != @allowhost6 "
         f"update @thrdown6_56 {{ ip6 daddr & ffff:ffff:ffff:ff00:: {LIMIT} }} drop"),
    ]
    assert chain(layout(interfaces=()).render(), "forward")[1:] == ["jump to_subscriber", "jump from_subscriber"]


def test_notice_and_garden_chains_have_no_limit():
    text = layout().render()
    assert chain(text, "notice") == []
    forwarding = chain(text, "garden") + chain(text, "forward") + chain(text, "from_subscriber")
    assert not any("limit" in r for r in forwarding)


@pytest.mark.parametrize("change", [{"throttle_rate": 125_000}, {"throttle_burst": 1}])
def test_tag_changes_with_rate_and_burst(change):
    assert layout(**change).tag != layout().tag
    assert layout(**change).with_prefixes({(4, 24)}).throttle_rate == layout(**change).throttle_rate


def test_meters_are_not_reconciled():
    containers = layout().containers()
    assert "throttle4_32" in containers
    assert not any(re.match(r"thr(up|down)", name) for name in containers)


def test_parse_listing_reads_meter_elements_without_tripping():
    listing = {"nftables": [
        # as nft 1.0.6 lists a meter the kernel filled
        {"set": {"family": "inet", "name": "thrup4_32", "table": "walled_garden", "type": "ipv4_addr",
                 "handle": 17, "size": 1048576, "flags": ["timeout"], "timeout": 60,
                 "elem": [{"elem": {"val": "100.64.0.10", "expires": 59,
                                    "limit": {"rate": 500000, "burst": 64, "per": "second", "inv": True,
                                              "rate_unit": "bytes", "burst_unit": "kbytes"}}}]}},
        {"set": {"family": "inet", "name": "throttle4_32", "table": "walled_garden", "elem": ["100.64.0.10"]}},
    ]}
    state = parse_listing(listing, "walled_garden")
    assert state.elements["throttle4_32"] == {"100.64.0.10": None}
    assert state.elements["thrup4_32"] == {"100.64.0.10": None}


# -- reconciler -----------------------------------------------------------------------------

def restricted(sid: str, *addresses: str, mode: Mode) -> Decision:
    return Decision(sid, mode, "listed", Subscriber(sid, tuple(net(a) for a in addresses), mode, "overdue"))


def test_only_throttle_subscribers_are_in_the_throttle_sets():
    fake = FakeDataplane("walled_garden")
    rec = Reconciler(fake, layout())
    decisions = {"T": restricted("T", "100.64.0.10", "2001:db8:10::/64", mode=Mode.THROTTLE),
                 "N": restricted("N", "100.64.0.11", mode=Mode.NOTICE),
                 "W": restricted("W", "100.64.0.12", mode=Mode.WALLED_GARDEN)}
    rec.sync_all(decisions)
    assert fake.state is not None
    assert fake.state.elements["throttle4_32"] == {"100.64.0.10": None}
    assert fake.state.elements["throttle6_64"] == {"2001:db8:10::": None}
    assert fake.state.elements["notice4_32"] == {"100.64.0.10": None, "100.64.0.11": None}
    assert subscriber_elements(decisions["T"]) >= {("throttle4_32", "100.64.0.10", None)}
    assert not any(c.startswith("throttle") for c, _, _ in subscriber_elements(decisions["N"]))
    # a payment: every trace of the throttle goes, as one small diff
    released = Decision("T", Mode.FREE, "paid")
    result = rec.update({"T": released})
    assert result.kind == "partial"
    assert fake.state.elements["throttle4_32"] == {} and fake.state.elements["throttle6_64"] == {}
    # and a full sync that finds it again in the list puts it back
    decisions["T"] = restricted("T", "100.64.0.10", mode=Mode.THROTTLE)
    assert rec.sync_all(decisions).kind == "partial"
    assert fake.state.elements["throttle4_32"] == {"100.64.0.10": None}
