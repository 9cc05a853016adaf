"""Configuration loading and validation (docs/reference.md, Configuration): typed values, and
every error by key path + file:line."""

from __future__ import annotations

import ipaddress
import itertools
import textwrap
from pathlib import Path

import pytest

from enforcer import config as cfg
from enforcer.config import (
    DEFAULT_PATH,
    ConfigError,
    Listen,
    default_config_path,
    load_config,
    parse_config,
    parse_duration,
    parse_listen,
)

FULL = textwrap.dedent("""\
    state_dir: /var/lib/walled-garden
    subscribers:
      source: /var/lib/walled-garden/restricted.yaml
      poll_interval: 60
    gateway:
      subscriber_interfaces: [eth1, eth2.100]
      table: walled_garden
    walled_garden:
      allow: ["192.0.2.0/24", "pay.example.net", "2001:db8:ffff::/48"]
      dns: ["192.0.2.53", "2001:db8::53"]
    portal:
      listen: "0.0.0.0:8080"
      url: "http://portal.isp.example/"
      provider: {name: Example ISP, phone: "+420 123 456 789", email: help@isp.example,
                 website: "https://isp.example/", hours: "Mo-Fr 8-18"}
    api:
      socket: /run/walled-garden/control.sock
      listen: "[::]:8787"
      webhook_secret_file: /etc/walled-garden/webhook.secret
    metrics:
      listen: "127.0.0.1:9640"
      portal_listen: "127.0.0.1:9641"
    policy:
      payment_grace: 72h
""")

MINIMAL = "subscribers:\n  source: /srv/list.csv\n"


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line number of the ``nth`` line containing ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) >= nth, f"{needle!r} not in text"
    return hits[nth - 1]


def issues_of(text: str, path: str = "config.yaml") -> list[cfg.ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, path)
    return info.value.issues


def wheres(text: str, path: str = "config.yaml") -> list[str]:
    return [i.where for i in issues_of(text, path)]


def with_section(extra: str) -> str:
    return MINIMAL + textwrap.dedent(extra)


# -- the happy path -------------------------------------------------------------------------

def test_full_config_loads_into_typed_objects():
    c = parse_config(FULL, "/etc/walled-garden/config.yaml")
    assert c.path == "/etc/walled-garden/config.yaml"
    assert c.state_dir == "/var/lib/walled-garden"
    assert c.subscribers.source == "/var/lib/walled-garden/restricted.yaml"
    assert c.subscribers.poll_interval == 60.0
    assert not c.subscribers.is_url
    assert c.gateway.subscriber_interfaces == ("eth1", "eth2.100")
    assert c.gateway.table == "walled_garden"
    assert c.walled_garden.allow_networks == (ipaddress.ip_network("192.0.2.0/24"),
                                              ipaddress.ip_network("2001:db8:ffff::/48"))
    assert c.walled_garden.allow_hosts == ("pay.example.net",)
    assert c.walled_garden.dns == (ipaddress.ip_address("192.0.2.53"), ipaddress.ip_address("2001:db8::53"))
    assert c.portal.listen == Listen("0.0.0.0", 8080)
    assert c.portal.url == "http://portal.isp.example/"
    assert c.portal.provider == cfg.Provider(name="Example ISP", phone="+420 123 456 789",
                                             email="help@isp.example", website="https://isp.example/",
                                             hours="Mo-Fr 8-18")
    assert c.api.socket == "/run/walled-garden/control.sock"
    assert c.api.listen == Listen("::", 8787)
    assert str(c.api.listen) == "[::]:8787"
    assert c.api.webhook_secret_file == "/etc/walled-garden/webhook.secret"
    assert c.metrics.listen == Listen("127.0.0.1", 9640)
    assert str(c.metrics.listen) == "127.0.0.1:9640"
    assert c.metrics.portal_listen == Listen("127.0.0.1", 9641)
    assert c.policy.payment_grace == 72 * 3600


def test_minimal_config_gets_the_documented_defaults():
    c = parse_config(MINIMAL)
    assert c.state_dir == "/var/lib/walled-garden"
    assert c.subscribers.poll_interval == 60.0
    assert c.gateway == cfg.GatewayConfig((), "walled_garden")
    assert c.walled_garden.dns is None  # any resolver
    assert c.walled_garden.allow_networks == () and c.walled_garden.allow_hosts == ()
    assert c.portal.listen == Listen("0.0.0.0", 8080)
    assert c.api.listen == Listen("0.0.0.0", 8787)
    assert c.metrics.listen == Listen("127.0.0.1", 9640)
    assert c.policy.payment_grace == 3 * 86400


def test_dns_any_means_unrestricted_resolvers():
    c = parse_config(with_section("walled_garden:\n  dns: any\n"))
    assert c.walled_garden.dns is None


def test_url_source_is_kept_as_is():
    c = parse_config("subscribers:\n  source: https://billing.example/restricted.csv\n  poll_interval: 15m\n")
    assert c.subscribers.source == "https://billing.example/restricted.csv"
    assert c.subscribers.is_url
    assert c.subscribers.poll_interval == 900


def test_listen_can_be_disabled_for_optional_listeners():
    c = parse_config(with_section("api:\n  listen: \"\"\nmetrics:\n  listen: null\n"))
    assert c.api.listen is None
    assert c.metrics.listen is None


# -- locations ------------------------------------------------------------------------------

def test_error_names_key_path_and_file_line():
    text = FULL.replace('url: "http://portal.isp.example/"', 'url: "ftp://portal.isp.example/"')
    issues = issues_of(text)
    assert [i.where for i in issues] == [f"portal.url (config.yaml:{line_of(text, 'url: ')})"]
    assert "ftp://portal.isp.example/" in issues[0].message
    assert str(issues[0]).startswith(f"portal.url (config.yaml:{line_of(text, 'url: ')}): ")


def test_error_location_uses_the_path_given():
    text = MINIMAL + "portal:\n  url: nope\n"
    assert wheres(text, "/etc/walled-garden/config.yaml") == ["portal.url (/etc/walled-garden/config.yaml:4)"]


def test_unknown_top_level_key():
    text = MINIMAL + "payment_grase: 3d\n"
    issues = issues_of(text)
    assert [i.where for i in issues] == ["payment_grase (config.yaml:3)"]
    assert "unknown key" in issues[0].message and "policy" in issues[0].message


@pytest.mark.parametrize("section, key", [
    ("subscribers", "pol_interval"), ("gateway", "interfaces"), ("walled_garden", "alow"),
    ("portal", "urll"), ("api", "secret"), ("metrics", "portal"), ("policy", "payment_grase"),
])
def test_unknown_key_in_each_section(section, key):
    if section == "subscribers":
        text = f"subscribers:\n  source: /srv/list.csv\n  {key}: 1\n"
        expected_line = 3
    else:
        text = MINIMAL + f"{section}:\n  {key}: 1\n"
        expected_line = 4
    issues = issues_of(text)
    assert [i.where for i in issues] == [f"{section}.{key} (config.yaml:{expected_line})"]
    assert "unknown key" in issues[0].message


def test_unknown_provider_field():
    text = MINIMAL + "portal:\n  provider:\n    name: ISP\n    fax: 123\n"
    assert wheres(text) == ["portal.provider.fax (config.yaml:6)"]


def test_section_that_is_not_a_mapping():
    text = MINIMAL + "gateway: eth1\n"
    issues = issues_of(text)
    assert [i.where for i in issues] == ["gateway (config.yaml:3)"]
    assert "mapping" in issues[0].message


# -- individual values ----------------------------------------------------------------------

@pytest.mark.parametrize("value, fragment", [
    ('"0.0.0.0"', "ADDRESS:PORT"),
    ('"0.0.0.0:99999"', "out of range"),
    ('"0.0.0.0:0"', "out of range"),
    ('"localhost:8080"', ""),
    ('"300.1.1.1:8080"', ""),
    ('"0.0.0.0:http"', "ADDRESS:PORT"),
    ("8080", "ADDRESS:PORT"),
])
def test_bad_portal_listen(value, fragment):
    text = MINIMAL + f"portal:\n  listen: {value}\n"
    issues = issues_of(text)
    assert [i.where for i in issues] == ["portal.listen (config.yaml:4)"]
    assert fragment in issues[0].message


def test_parse_listen_accepts_bracketed_ipv6():
    assert parse_listen("[::1]:9640") == Listen("::1", 9640)
    assert parse_listen("192.0.2.1:1") == Listen("192.0.2.1", 1)
    assert parse_listen("0.0.0.0:65535").port == 65535
    with pytest.raises(ValueError):
        parse_listen("[::1]")


@pytest.mark.parametrize("listen_key", ["api.listen", "metrics.listen", "metrics.portal_listen"])
def test_bad_port_in_every_listener(listen_key):
    section, key = listen_key.split(".")
    text = MINIMAL + f"{section}:\n  {key}: \"127.0.0.1:70000\"\n"
    issues = issues_of(text)
    assert [i.where for i in issues] == [f"{listen_key} (config.yaml:4)"]
    assert "70000" in issues[0].message


@pytest.mark.parametrize("table", ["1table", "wall-garden", "a" * 33, "", "with space"])
def test_bad_table_name(table):
    text = MINIMAL + f"gateway:\n  table: \"{table}\"\n"
    assert wheres(text) == ["gateway.table (config.yaml:4)"]


@pytest.mark.parametrize("table", ["walled_garden", "wg2", "_x", "A" * 32])
def test_good_table_name(table):
    assert parse_config(MINIMAL + f"gateway:\n  table: {table}\n").gateway.table == table


@pytest.mark.parametrize("name", ["averyveryverylongname", "eth 1", "", "eth/1", "*", "p*p", "ppp**",
                                  "averyverylongna*"])
def test_bad_interface_name(name):
    text = MINIMAL + f"gateway:\n  subscriber_interfaces:\n    - eth0\n    - \"{name}\"\n"
    issues = issues_of(text)
    assert [i.where for i in issues] == ["gateway.subscriber_interfaces[1] (config.yaml:6)"]
    assert "interface name" in issues[0].message


def test_interface_wildcards_name_every_interface_with_that_prefix():
    """A PPPoE BNG has one interface per session (ppp0, ppp1, ...): ``ppp*`` names them all."""
    text = MINIMAL + "gateway:\n  subscriber_interfaces: [eth1, 'ppp*', 'vlan1*', 'averyverylong*']\n"
    assert parse_config(text).gateway.subscriber_interfaces == ("eth1", "ppp*", "vlan1*", "averyverylong*")


def test_interface_list_must_be_a_list():
    text = MINIMAL + "gateway:\n  subscriber_interfaces: eth1\n"
    assert wheres(text) == ["gateway.subscriber_interfaces (config.yaml:4)"]


def test_empty_interface_list_means_any():
    assert parse_config(MINIMAL + "gateway:\n  subscriber_interfaces: []\n").gateway.subscriber_interfaces == ()


@pytest.mark.parametrize("name", ["eth0:1", ".", ".."])
def test_interface_names_linux_rejects_are_errors(name):
    text = MINIMAL + f"gateway:\n  subscriber_interfaces: [\"{name}\"]\n"
    assert wheres(text) == ["gateway.subscriber_interfaces[0] (config.yaml:4)"]


def test_allow_list_with_junk_reports_each_bad_item():
    text = MINIMAL + textwrap.dedent("""\
        walled_garden:
          allow:
            - 192.0.2.0/24
            - pay.example.net
            - "not a host"
            - 999.1.1.1
            - 192.0.2.0/33
            - 42
            - bad_host.example
    """)
    issues = issues_of(text)
    assert [i.where for i in issues] == [
        f"walled_garden.allow[{i}] (config.yaml:{line})"
        for i, line in [(2, 7), (3, 8), (4, 9), (5, 10), (6, 11)]
    ]
    assert all("neither a CIDR, a hostname nor a *.domain" in i.message for i in issues)


def test_allow_list_splits_networks_and_hosts():
    c = parse_config(MINIMAL + 'walled_garden:\n  allow: ["198.51.100.7", pay.example.net., "2001:db8::/32"]\n')
    assert c.walled_garden.allow_networks == (ipaddress.ip_network("198.51.100.7/32"),
                                              ipaddress.ip_network("2001:db8::/32"))
    assert c.walled_garden.allow_hosts == ("pay.example.net",)


def test_allow_must_be_a_list():
    assert wheres(MINIMAL + "walled_garden:\n  allow: pay.example.net\n") == ["walled_garden.allow (config.yaml:4)"]


def test_dns_list_bad_entries_and_wrong_type():
    text = MINIMAL + "walled_garden:\n  dns:\n    - 192.0.2.53\n    - resolver.example\n"
    issues = issues_of(text)
    assert [i.where for i in issues] == ["walled_garden.dns[1] (config.yaml:6)"]
    assert "not an IP address" in issues[0].message
    assert wheres(MINIMAL + "walled_garden:\n  dns: 192.0.2.53\n") == ["walled_garden.dns (config.yaml:4)"]


# -- durations ------------------------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    (90, 90.0), (1.5, 1.5), ("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("72h", 259200.0),
    ("3d", 259200.0), ("500ms", 0.5), (" 2h ", 7200.0), (0, 0.0),
])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["-1", -1, "3 days", "h", "", True, "1w", None])
def test_parse_duration_rejects(value):
    with pytest.raises((ValueError, TypeError)):
        parse_duration(value)


@pytest.mark.parametrize("value", ['"-1"', "-1", "soon", "0", "true"])
def test_bad_poll_interval(value):
    text = f"subscribers:\n  source: /srv/list.csv\n  poll_interval: {value}\n"
    assert wheres(text) == ["subscribers.poll_interval (config.yaml:3)"]


@pytest.mark.parametrize("value, seconds", [("72h", 259200.0), ("3d", 259200.0), ("90", 90.0), ("0", 0.0)])
def test_payment_grace_durations(value, seconds):
    assert parse_config(MINIMAL + f"policy:\n  payment_grace: {value}\n").policy.payment_grace == seconds


@pytest.mark.parametrize("value", ['"-1"', "-5", "forever"])
def test_bad_payment_grace(value):
    assert wheres(MINIMAL + f"policy:\n  payment_grace: {value}\n") == ["policy.payment_grace (config.yaml:4)"]


@pytest.mark.parametrize("key", ["subscribers.poll_interval", "policy.payment_grace"])
def test_nan_duration_is_rejected(key):
    if key.startswith("subscribers"):
        text = "subscribers:\n  source: /srv/list.csv\n  poll_interval: .nan\n"
        line = 3
    else:
        text = MINIMAL + "policy:\n  payment_grace: .nan\n"
        line = 4
    assert wheres(text) == [f"{key} (config.yaml:{line})"]


# -- subscribers.source ---------------------------------------------------------------------

def test_missing_subscribers_section():
    issues = issues_of("state_dir: /nonexistent/wg-unit\n")
    assert [i.where for i in issues] == ["subscribers.source (config.yaml:1)"]
    assert "required" in issues[0].message


def test_missing_subscribers_source():
    text = "state_dir: /nonexistent/wg-unit\nsubscribers:\n  poll_interval: 30\n"
    issues = issues_of(text)
    assert [i.where for i in issues] == ["subscribers.source (config.yaml:2)"]


def test_subscribers_source_must_be_a_string():
    assert wheres("subscribers:\n  source: [a, b]\n") == ["subscribers.source (config.yaml:2)"]


def test_bad_source_url():
    assert wheres("subscribers:\n  source: \"http://\"\n") == ["subscribers.source (config.yaml:2)"]


def test_relative_source_resolved_next_to_config_file(tmp_path: Path):
    conf = tmp_path / "etc" / "config.yaml"
    conf.parent.mkdir()
    conf.write_text("subscribers:\n  source: lists/restricted.csv\n")
    c = load_config(str(conf))
    assert c.subscribers.source == str((tmp_path / "etc" / "lists" / "restricted.csv").resolve())
    assert c.path == str(conf)


def test_absolute_source_unchanged(tmp_path: Path):
    conf = tmp_path / "config.yaml"
    conf.write_text("subscribers:\n  source: /srv/billing/restricted.yaml\n")
    assert load_config(str(conf)).subscribers.source == "/srv/billing/restricted.yaml"


# -- the config path -----------------------------------------------------------------------

def test_default_path_and_env_override(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("WALLED_GARDEN_CONFIG", raising=False)
    assert default_config_path() == DEFAULT_PATH == "/etc/walled-garden/config.yaml"
    conf = tmp_path / "wg.yaml"
    conf.write_text(MINIMAL)
    monkeypatch.setenv("WALLED_GARDEN_CONFIG", str(conf))
    assert default_config_path() == str(conf)
    loaded = load_config()
    assert loaded.path == str(conf)
    assert loaded.subscribers.source == "/srv/list.csv"


def test_explicit_path_beats_env(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("WALLED_GARDEN_CONFIG", str(tmp_path / "absent.yaml"))
    conf = tmp_path / "real.yaml"
    conf.write_text(MINIMAL)
    assert load_config(str(conf)).path == str(conf)


def test_unreadable_file_is_a_config_error(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing))
    assert info.value.issues[0].where == str(missing)
    assert "cannot read" in info.value.issues[0].message


def test_errors_from_a_file_name_the_file(tmp_path: Path):
    conf = tmp_path / "config.yaml"
    conf.write_text(MINIMAL + "portal:\n  listen: nowhere\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(conf))
    assert [i.where for i in info.value.issues] == [f"portal.listen ({conf}:4)"]


# -- whole-document problems ----------------------------------------------------------------

def test_yaml_syntax_error_gives_a_line():
    text = MINIMAL + "portal:\n  url: [unclosed\n  listen: x\n"
    issues = issues_of(text)
    assert len(issues) == 1
    assert issues[0].where.startswith("config.yaml:")
    line = int(issues[0].where.rsplit(":", 1)[1])
    assert 4 <= line <= 6
    assert "not valid YAML" in issues[0].message


def test_duplicate_key_is_an_error_with_its_line():
    text = MINIMAL + "portal:\n  url: http://a.example/\n  url: http://b.example/\n"
    issues = issues_of(text)
    assert [i.where for i in issues] == ["config.yaml:5"]
    assert "duplicate key 'url'" in issues[0].message


def test_duplicate_top_level_key():
    issues = issues_of(MINIMAL + "subscribers:\n  source: /b\n")
    assert [i.where for i in issues] == ["config.yaml:3"]


def test_empty_file():
    issues = issues_of("")
    assert any("empty" in i.message for i in issues)
    assert any(i.where.startswith("subscribers.source") for i in issues)


def test_top_level_not_a_mapping():
    issues = issues_of("- a\n- b\n")
    assert issues[0].where == "(top level) (config.yaml:1)"
    assert "mapping" in issues[0].message


def test_many_errors_are_all_reported_in_one_go():
    text = textwrap.dedent("""\
        state_dir: ""
        subscribers:
          poll_interval: -1
        gateway:
          subscriber_interfaces: ["this-name-is-far-too-long"]
          table: "bad-table"
        walled_garden:
          allow: ["not a host!"]
          dns: [nope]
        portal:
          listen: "0.0.0.0:0"
          url: gopher://x
          provider: {name: ""}
        api:
          listen: "1.2.3.4:99999"
          colour: blue
        metrics:
          listen: nowhere
        policy:
          payment_grace: -1d
        extra: 1
    """)
    issues = issues_of(text)
    where = {i.where for i in issues}
    expected = {
        "state_dir (config.yaml:1)",
        "subscribers.source (config.yaml:2)",
        "subscribers.poll_interval (config.yaml:3)",
        "gateway.subscriber_interfaces[0] (config.yaml:5)",
        "gateway.table (config.yaml:6)",
        "walled_garden.allow[0] (config.yaml:8)",
        "walled_garden.dns[0] (config.yaml:9)",
        "portal.listen (config.yaml:11)",
        "portal.url (config.yaml:12)",
        "portal.provider.name (config.yaml:13)",
        "api.listen (config.yaml:15)",
        "api.colour (config.yaml:16)",
        "metrics.listen (config.yaml:18)",
        "policy.payment_grace (config.yaml:20)",
        "extra (config.yaml:21)",
    }
    assert where == expected
    assert len(issues) == len(expected)
    # str() lists them one per line, each with its location
    lines = str(ConfigError(issues)).splitlines()
    assert len(lines) == len(expected)
    assert all(" (config.yaml:" in line for line in lines)


# -- gateway.subscriber_prefixes -------------------------------------------------------------

def test_subscriber_prefixes_are_typed_networks():
    config = parse_config(with_section("""\
        gateway:
          subscriber_prefixes: ["100.64.0.0/10", "2001:db8::/32"]
    """))
    assert config.gateway.subscriber_prefixes == (ipaddress.ip_network("100.64.0.0/10"),
                                                  ipaddress.ip_network("2001:db8::/32"))
    assert parse_config(MINIMAL).gateway.subscriber_prefixes == ()     # absent: any unicast address


@pytest.mark.parametrize("value, where, words", [
    ('["100.64.0.1/10"]', "gateway.subscriber_prefixes[0]", "host bits"),
    ('["nope"]', "gateway.subscriber_prefixes[0]", "nope"),
    ('["100.64.0.0/10", 42]', "gateway.subscriber_prefixes[1]", "CIDR"),
    ('["127.0.0.0/8"]', "gateway.subscriber_prefixes[0]", "loopback"),
    ('["::/0"]', "gateway.subscriber_prefixes[0]", "unspecified"),
    ('["100.64.0.0/10", "100.64.0.0/10"]', "gateway.subscriber_prefixes[1]", "twice"),
    ("[]", "gateway.subscriber_prefixes", "non-empty list"),
    ("100.64.0.0/10", "gateway.subscriber_prefixes", "list of CIDRs"),
])
def test_bad_subscriber_prefixes_are_named_by_key(value: str, where: str, words: str):
    text = with_section(f"gateway:\n  subscriber_prefixes: {value}\n")
    found = issues_of(text)
    assert [i.where for i in found] == [f"{where} (config.yaml:4)"] and words in found[0].message, found


# -- any YAML is a Config or a ConfigError (fuzzing) -----------------------------------------

def test_config_alias_bomb_is_refused_at_once():
    import time

    levels = "abcdefghi"
    lines = [f"x{levels[0]}: &{levels[0]} [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"x{b}: &{b} [" + ", ".join([f"*{a}"] * 9) + "]" for a, b in itertools.pairwise(levels)]
    text = MINIMAL + "\n".join(lines) + "\nwalled_garden:\n  allow: *i\n"
    started = time.perf_counter()
    found = issues_of(text)
    assert time.perf_counter() - started < 1.0
    assert any("nodes" in i.message and "cap" in i.message for i in found), found


@pytest.mark.parametrize("text", ["x: 2026-02-30\n", "subscribers: {source: /a}\nstate_dir: !!binary 'x'\n",
                                  "subscribers: {source: /a}\nportal: {url: \ud800}\n", "\x00", "- [\n"])
def test_odd_yaml_is_a_config_error(text: str):
    with pytest.raises(ConfigError):
        parse_config(text, "c.yaml")
