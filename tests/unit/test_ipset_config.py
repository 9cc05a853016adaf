"""The ipset backend's configuration (``gateway.backend``, ``gateway.ipset.rules`` /
``.iptables``), what ``check-config`` and ``render`` say about it, and the pure parts of its
iptables rules (the stamp, the throttle's charges, the bucket names). The kernel side is in
``test_dataplane_conformance.py`` and ``tests/kernel/test_backends.py`` / ``test_ipset_backend.py``.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from test_cli import _setup

from enforcer.cli import main
from enforcer.config import ConfigError, parse_config
from enforcer.config.reload import reloadable
from enforcer.dataplane import iptables_rules
from enforcer.dataplane.layout import Layout

BASE = "subscribers:\n  source: /srv/list.csv\n"


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + text)
    return [str(issue) for issue in caught.value.issues]


# -- the keys ------------------------------------------------------------------------------------

def test_the_default_is_nftables_and_ipset_defaults_to_own_rules_and_auto() -> None:
    assert parse_config(BASE).gateway.backend == "nftables"
    config = parse_config(BASE + "gateway:\n  backend: ipset\n")
    assert (config.gateway.backend, config.gateway.ipset.rules, config.gateway.ipset.iptables) == \
        ("ipset", "own", "auto")
    config = parse_config(BASE + "gateway:\n  backend: ipset\n  ipset: {rules: external, iptables: legacy}\n")
    assert (config.gateway.ipset.rules, config.gateway.ipset.iptables) == ("external", "legacy")


@pytest.mark.parametrize(("text", "key", "words"), [
    ("gateway:\n  backend: iptables\n", "gateway.backend", "'iptables' is not one of nftables, ipset"),
    ("gateway:\n  backend: ipset\n  ipset: {rules: mine}\n", "gateway.ipset.rules",
     "'mine' is not one of own, external"),
    ("gateway:\n  backend: ipset\n  ipset: {iptables: nf}\n", "gateway.ipset.iptables",
     "'nf' is not one of auto, nft, legacy"),
    ("gateway:\n  backend: ipset\n  ipset: {rule: own}\n", "gateway.ipset.rule", "unknown key"),
    ("gateway:\n  ipset: {rules: own}\n", "gateway.ipset", "applies only with gateway.backend: ipset"),
    ("gateway:\n  backend: ipset\nwalled_garden:\n  dns: gateway\n", "walled_garden.dns",
     "dns: gateway needs gateway.backend: nftables"),
    ("gateway:\n  backend: ipset\npolicy:\n  throttle_rate: 8 kbit/s\n", "policy.throttle_rate",
     "below the ipset backend's minimum of 16 kbit/s"),
])
def test_each_error_names_its_key(text: str, key: str, words: str) -> None:
    errors = _errors(text)
    assert any(key in e and words in e for e in errors), errors


def test_the_lowest_rates_and_dns_gateway_stay_fine_with_nftables() -> None:
    config = parse_config(BASE + "policy:\n  throttle_rate: 8 kbit/s\n")
    assert config.policy.throttle_rate == 1000
    assert parse_config(BASE + "gateway:\n  backend: ipset\npolicy:\n  throttle_rate: 16 kbit/s\n"
                        ).policy.throttle_rate == 2000


def test_the_backend_waits_for_a_restart() -> None:
    old = parse_config(BASE)
    new = parse_config(BASE + "gateway:\n  backend: ipset\n  ipset: {rules: external}\n")
    kept, waiting = reloadable(old, new)
    assert kept.gateway.backend == "nftables" and kept.gateway.ipset == old.gateway.ipset
    assert {"gateway.backend", "gateway.ipset"} <= set(waiting)


# -- check-config and render ---------------------------------------------------------------------

def test_check_config_names_the_ipset_keys_by_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, "gateway:\n  backend: ipset\n  ipset:\n    rules: mine\n"
                              "walled_garden:\n  dns: gateway\n")
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"gateway.ipset.rules ({config}:9)" in err and "own, external" in err
    assert f"walled_garden.dns ({config}:11)" in err and "needs gateway.backend: nftables" in err


def test_check_config_accepts_an_ipset_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, "gateway:\n  backend: ipset\n  ipset: {rules: external, iptables: nft}\n")
    assert main(["check-config", "--config", str(config)]) == 0
    assert "OK" in capsys.readouterr().out


def test_render_prints_ipset_and_iptables_restore_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, "gateway:\n  backend: ipset\n  subscriber_interfaces: [eth1]\n")
    assert main(["render", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ipset restore -exist\n")
    assert "add walled-portal4-32 100.64.0.10\n" in out and "add walled-portal6-56 2001:db8:1::/56\n" in out
    assert re.search(r"^create walled-portal4-32 hash:net family inet hashsize \d+ maxelem 65536$", out, re.M)
    assert "# iptables-restore --noflush\n*filter\n" in out and "# ip6tables-restore --noflush\n" in out
    assert "-I FORWARD 1 -j WALLED-GARDEN-FWD" in out and "-I PREROUTING 1 -j WALLED-GARDEN-PRE" in out
    external = _setup(tmp_path, "gateway:\n  backend: ipset\n  ipset: {rules: external}\n")
    assert main(["render", "--config", str(external)]) == 0
    out = capsys.readouterr().out
    assert "iptables-restore" not in out and "WALLED-GARDEN-" not in out, "rules: external: no chain of ours"
    assert "# rules: external" in out and "iptables -N WG-RESTRICTED" in out, "the operator's lines, to copy"


# -- the rules' pure parts -----------------------------------------------------------------------

def _layout(rate: int, burst: int = 65536) -> Layout:
    return Layout("t", ("eth1",), (ipaddress.ip_network("203.0.113.0/24"),), None, 8080,
                  throttle_rate=rate, throttle_burst=burst).with_prefixes({(4, 24)})


def test_a_packet_is_charged_once_per_second_at_the_rate_of_its_length() -> None:
    assert iptables_rules.charges(10_000) == [10_000, 20_000, 30_000, 40_000, 50_000, 60_000]
    assert iptables_rules.charges(125_000) == [], "at 64 KiB/s and more one charge covers any packet"
    assert iptables_rules.charges(2000)[-1] == 64_000 and len(iptables_rules.charges(2000)) == 32
    down = [line for line in iptables_rules.chains(_layout(10_000), 4)["filter"]
            if line.startswith("-A WALLED-GARDEN-DOWN") and "walled-throttle4-24 " in line and "hashlimit" in line]
    assert len(down) == 7 and "--length" not in down[0] and "-m length ! --length 0:60000 " in down[-1]
    assert len({re.search(r"--hashlimit-name (\S+)", line).group(1) for line in down}) == 1, "one bucket"


def test_bucket_names_fit_and_change_with_the_parameters() -> None:
    def names(layout: Layout) -> set[str]:
        text = "\n".join(iptables_rules.chains(layout, 6)["filter"])
        return set(re.findall(r"--hashlimit-name (\S+)", text))
    slow, fast = names(_layout(10_000)), names(_layout(20_000))
    assert slow and all(len(name) <= 15 for name in slow | fast), "hashlimit names are at most 15 characters"
    assert not slow & fast, "a new rate gets a new kernel table, not the old one's parameters"
    assert "wgd6-128-" in " ".join(slow) and "wgu6-56-" in " ".join(slow)


def test_burst_and_expiry() -> None:
    layout = _layout(10_000, burst=65536)
    assert iptables_rules.hashlimit_burst(layout) == 65536
    assert iptables_rules.hashlimit_expire_ms(layout) == 6554, "the time the nftables bucket takes to fill"
    assert iptables_rules.hashlimit_burst(_layout(1_000_000, burst=100_000)) == 1_000_000, "at least a second"
    assert iptables_rules.hashlimit_expire_ms(_layout(1_000_000, burst=100_000)) == 1000


def test_the_stamp_covers_the_layout_and_the_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _layout(10_000)
    stamp = iptables_rules.stamp(layout)
    assert stamp.startswith(f"{layout.tag} rules ") and len(stamp.split()[-1]) == 16
    fwd = [line for line in iptables_rules.chains(layout, 4)["filter"] if line.startswith("-A WALLED-GARDEN-FWD")]
    assert fwd[-1] == f'-A WALLED-GARDEN-FWD -m comment --comment "{iptables_rules.TAG_COMMENT}{stamp}"'
    assert iptables_rules.stamp(_layout(20_000)).split()[0] != layout.tag, "another configuration, another tag"
    local = iptables_rules._local
    monkeypatch.setattr(iptables_rules, "_local", lambda *args: local(*args)[1:])   # "another release"
    iptables_rules.stamp.cache_clear()
    try:
        other = iptables_rules.stamp(layout)
    finally:
        iptables_rules.stamp.cache_clear()
    assert other.split()[0] == layout.tag and other != stamp, "same configuration, other rules: another stamp"


def test_a_start_expects_the_stamp_of_the_configuration_with_the_sets_prefix_lengths() -> None:
    """``IpsetDataplane._expected_stamp``: which rules a start expects for the tag it read back."""
    from enforcer.dataplane.ipset import IpsetDataplane
    from enforcer.dataplane.ipset_sets import set_name

    base = _layout(10_000)
    wider = base.with_prefixes({(4, 24), (4, 16)})
    names = [set_name(c) for c in wider.containers()] + ["walled-portal4", "walledtmp-portal4-8", "other-set"]
    dataplane = IpsetDataplane("t", "own", "nft", base)
    assert dataplane._expected_stamp(wider.tag, names) == iptables_rules.stamp(wider)
    assert dataplane._expected_stamp("0123456789abcdef", names) == "0123456789abcdef rules ", \
        "an unknown layout: only its tag can be checked"
    assert IpsetDataplane("t", "own", "nft")._expected_stamp(wider.tag, names) == f"{wider.tag} rules "
