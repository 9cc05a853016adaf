"""``walled_garden`` keys of the DNS-driven garden (docs/reference.md, "DNS-driven walled garden"):
``dns: gateway``, ``resolvers``, ``*.domain`` wildcards, ``ntp`` and ``dns_forwarder``; every bad
value named by its key path and line, and the payment-link check of ``check-config``."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from captive_portal.config_check import payment_link_problems
from enforcer.config import ConfigError, DnsForwarderConfig, parse_config
from enforcer.dns_garden.settings import ForwarderSettings
from enforcer.table_layout import base_layout

ip = ipaddress.ip_address


def config(garden: str, portal: str = "") -> str:
    return textwrap.dedent("""\
        subscribers: {source: /tmp/restricted.yaml}
        walled_garden:
        """) + textwrap.indent(textwrap.dedent(garden), "  ") + textwrap.dedent(portal)


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return [str(issue) for issue in info.value.issues]


def test_gateway_mode_reads_resolvers_wildcards_and_forwarder_defaults() -> None:
    garden = parse_config(config("""\
        allow: ["192.0.2.0/24", "Pay.Example.NET.", "*.PSP.example", "*.psp.example"]
        dns: gateway
        resolvers: ["198.51.100.53", "2001:db8::53"]
        """)).walled_garden
    assert garden.allow_hosts == ("pay.example.net",)
    assert garden.allow_domains == ("psp.example",)
    assert garden.resolvers == (ip("198.51.100.53"), ip("2001:db8::53"))
    assert garden.dns == ()                    # no resolver is reached directly
    assert garden.ntp == ()                    # gateway mode: no NTP server outside unless listed
    assert garden.forwarder == DnsForwarderConfig()


def test_forwarder_settings_and_units() -> None:
    cfg = parse_config(config("""\
        allow: ["*.psp.example", "pay.example.net"]
        dns: gateway
        resolvers: ["198.51.100.53"]
        ntp: ["198.51.100.123"]
        dns_forwarder: {port: 5301, query_rate: 5, query_burst: 50, upstream_timeout: 500ms,
                        ttl_margin: 2m, max_ttl: 1h, max_addresses: 1000}
        """))
    assert cfg.walled_garden.ntp == (ip("198.51.100.123"),)
    settings = ForwarderSettings.from_config(cfg)
    assert settings is not None
    assert settings == ForwarderSettings.from_json(settings.to_json())
    assert (settings.port, settings.resolvers, settings.names, settings.suffixes) == (
        5301, (("198.51.100.53", 53),), ("pay.example.net",), ("psp.example",))
    assert (settings.query_rate, settings.query_burst, settings.upstream_timeout, settings.ttl_margin,
            settings.max_ttl, settings.max_addresses) == (5.0, 50, 0.5, 120, 3600, 1000)
    layout = base_layout(cfg)
    assert (layout.dns_port, layout.dns_garden_size, layout.ntp) == (5301, 1001, (ip("198.51.100.123"),))  # + marker


def test_other_modes_keep_their_meaning_and_have_no_forwarder() -> None:
    any_mode = parse_config(config('allow: ["pay.example.net"]\n')).walled_garden
    assert (any_mode.dns, any_mode.ntp, any_mode.forwarder) == (None, None, None)
    listed = parse_config(config('dns: ["192.0.2.53"]\nntp: ["192.0.2.123"]\n')).walled_garden
    assert (listed.dns, listed.ntp, listed.forwarder) == ((ip("192.0.2.53"),), (ip("192.0.2.123"),), None)
    assert ForwarderSettings.from_config(parse_config(config("dns: any\n"))) is None


@pytest.mark.parametrize("garden, where, words", [
    ('dns: gateway\n', "walled_garden.resolvers", "required with dns: gateway"),
    ('dns: gateway\nresolvers: ["resolver.example"]\n', "walled_garden.resolvers[0]", "not an IP address"),
    ('dns: gateway\nresolvers: ["0.0.0.0"]\n', "walled_garden.resolvers[0]", "not an address a server"),
    ('dns: gateway\nresolvers: "198.51.100.53"\n', "walled_garden.resolvers", "expected a list"),
    ('dns: any\nresolvers: ["198.51.100.53"]\n', "walled_garden.resolvers", "only used with dns: gateway"),
    ('dns: any\ndns_forwarder: {port: 5300}\n', "walled_garden.dns_forwarder", "only used with dns: gateway"),
    ('allow: ["*.psp.example"]\n', "walled_garden.allow[0]", "needs dns: gateway"),
    ('dns: gateway\nresolvers: ["198.51.100.53"]\nallow: ["*.example"]\n', "walled_garden.allow[0]",
     "whole top-level domain"),
    ('dns: gateway\nresolvers: ["198.51.100.53"]\nallow: ["*"]\n', "walled_garden.allow[0]", "neither a CIDR"),
    ('dns: gateway\nresolvers: ["198.51.100.53"]\nallow: ["pay.*.example"]\n', "walled_garden.allow[0]",
     "neither a CIDR"),
    ('dns: resolver\n', "walled_garden.dns", "'any', 'gateway' or a list"),
    ('dns: gateway\nresolvers: ["198.51.100.53"]\ndns_forwarder: {port: 53}\n',
     "walled_garden.dns_forwarder.port", "pick a free local port"),
    ('dns: gateway\nresolvers: ["198.51.100.53"]\ndns_forwarder: {port: 70000}\n',
     "walled_garden.dns_forwarder.port", "between 1 and 65535"),
    ('dns: gateway\nresolvers: ["198.51.100.53"]\ndns_forwarder: {query_rate: 0}\n',
     "walled_garden.dns_forwarder.query_rate", "greater than zero"),
    ('dns: gateway\nresolvers: ["198.51.100.53"]\ndns_forwarder: {ttl_margin: soon}\n',
     "walled_garden.dns_forwarder.ttl_margin", "not a duration"),
    ('dns: gateway\nresolvers: ["198.51.100.53"]\ndns_forwarder: {cache: 1}\n',
     "walled_garden.dns_forwarder.cache", "unknown key"),
    ('ntp: ["pool.ntp.example"]\n', "walled_garden.ntp[0]", "not an IP address"),
    ('dns: gateway\nresolvers: ["fe80::53"]\n', "walled_garden.resolvers[0]", "link-local"),
    ('dns: gateway\nresolvers: ["198.51.100.53"]\ndns_forwarder: {max_addresses: 5000000000}\n',
     "walled_garden.dns_forwarder.max_addresses", "more than the most allowed"),
    ('dns: gateway\nresolvers: ["198.51.100.53"]\ndns_forwarder: {max_ttl: 400d}\n',
     "walled_garden.dns_forwarder.max_ttl", "more than the most allowed, 7d"),
    ('dns: gateway\nresolvers: ["198.51.100.53"]\ndns_forwarder: {port: 8080}\n',
     "walled_garden.dns_forwarder.port", "portal.listen's port too"),
    ('dns: gateway\nresolvers: ["198.51.100.53"]\ndns_forwarder: {port: 9640}\n',
     "walled_garden.dns_forwarder.port", "metrics.listen's port too"),
])
def test_each_bad_value_is_named_by_its_key_path(garden: str, where: str, words: str) -> None:
    found = issues(config(garden))
    assert any(line.startswith(where + " (") and words in line for line in found), found


PORTAL = """\
portal:
  url: "http://portal.isp.example/"
  payment_links:
    - {label: Card, url: "https://pay.psp.example/isp"}
    - {label: Bank, url: "https://bank.example.net/pay"}
    - {label: Shop, url: "http://192.0.2.10/pay"}
    - {label: Here, url: "http://portal.isp.example/pay"}
    - {label: Apex, url: "https://psp.example/"}
"""


def test_check_config_names_each_payment_link_outside_the_garden() -> None:
    cfg = parse_config(config("""\
        allow: ["*.psp.example", "192.0.2.0/24"]
        dns: gateway
        resolvers: ["198.51.100.53"]
        """, PORTAL))
    problems = payment_link_problems(cfg)
    assert [p.split(":")[0] for p in problems] == ["portal.payment_links[1].url", "portal.payment_links[4].url"]
    assert "bank.example.net is not in walled_garden.allow" in problems[0]
    covered = parse_config(config("""\
        allow: ["*.psp.example", "psp.example", "bank.example.net", "192.0.2.0/24"]
        dns: gateway
        resolvers: ["198.51.100.53"]
        """, PORTAL))
    assert payment_link_problems(covered) == []
