"""check-config: can subscribers reach ``portal.url`` as configured? (``reachability``)"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from test_portal import CONFIG_YAML

from captive_portal import reachability
from captive_portal.config_check import validate
from enforcer.config import Config, Listen, PortalTls, parse_config

PLAIN = Listen("0.0.0.0", 8080)
TLS = PortalTls(Listen("0.0.0.0", 8443), "/etc/walled-garden/portal.crt", "/etc/walled-garden/portal.key")
GATEWAY = ipaddress.ip_address("192.0.2.1")


def portal(url: str, *, listen: Listen = PLAIN, tls: PortalTls | None = None) -> Config:
    config = parse_config(CONFIG_YAML)
    return replace(config, portal=replace(config.portal, url=url, listen=listen, tls=tls))


@pytest.mark.parametrize("url,listen,tls", [
    ("http://portal.isp.example/", Listen("0.0.0.0", 8080), None),
    ("http://portal.isp.example:80/welcome", Listen("0.0.0.0", 8080), None),
    ("http://portal.isp.example:8080/", Listen("0.0.0.0", 8080), None),     # the listener's own port
    ("http://192.0.2.1/", Listen("::", 80), None),
    ("https://portal.isp.example/", Listen("0.0.0.0", 8080), TLS),
    ("https://portal.isp.example:8443/", Listen("0.0.0.0", 8080), TLS),
    ("http://portal.isp.example/", Listen("192.0.2.1", 8080), TLS),
    ("http://[2001:db8::1]/", Listen("0.0.0.0", 8080), None),
])
def test_urls_the_table_or_a_listener_answers_are_fine(url: str, listen: Listen, tls: PortalTls | None) -> None:
    assert reachability.problems(portal(url, listen=listen, tls=tls)) == []


@pytest.mark.parametrize("url,listen,tls,expected", [
    ("https://portal.isp.example/", Listen("0.0.0.0", 8080), None, "is https but portal.tls is not set"),
    ("http://portal.isp.example:8081/", Listen("0.0.0.0", 8080), None, "port 8081 is neither 80"),
    ("http://portal.isp.example:443/", Listen("0.0.0.0", 8080), TLS, "port 443 is neither 80"),
    ("https://portal.isp.example:8444/", Listen("0.0.0.0", 8080), TLS, "port 8444 is neither 443"),
    ("https://portal.isp.example:8080/", Listen("0.0.0.0", 8080), TLS, "port 8080 is neither 443"),
    ("http://127.0.0.1/", Listen("0.0.0.0", 8080), None, "loopback, unspecified or multicast"),
    ("http://[::1]/", Listen("0.0.0.0", 8080), None, "loopback, unspecified or multicast"),
    ("http://0.0.0.0/", Listen("0.0.0.0", 8080), None, "loopback, unspecified or multicast"),
    ("http://localhost/", Listen("0.0.0.0", 8080), None, "each subscriber's own machine"),
    ("http://portal.isp.example/", Listen("127.0.0.1", 8080), None, "portal.listen: 127.0.0.1:8080 is a loopback"),
    ("http://portal.isp.example/", Listen("0.0.0.0", 8080), replace(TLS, listen=Listen("::1", 8443)),
     "portal.tls.listen: [::1]:8443 is a loopback"),
])
def test_urls_nothing_answers_are_errors_naming_the_key(url: str, listen: Listen, tls: PortalTls | None,
                                                        expected: str) -> None:
    found = reachability.problems(portal(url, listen=listen, tls=tls))
    assert len(found) == 1 and expected in found[0], found
    assert found[0].startswith(("portal.url: ", "portal.listen: ", "portal.tls.listen: "))


def test_validate_reports_reachability_with_branding() -> None:
    """``validate`` is what check-config calls: its lines are errors there."""
    assert validate(portal("http://portal.isp.example/")) == []
    assert any("portal.tls is not set" in p for p in validate(portal("https://portal.isp.example/")))


def fake_resolver(answers: dict[str, list[str]]) -> reachability.Callable[[str], list[reachability.Address]]:
    def resolve(host: str) -> list[reachability.Address]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(a) for a in answers[host]]
    return resolve


def local(address: reachability.Address) -> bool:
    return address == GATEWAY


@pytest.mark.parametrize("url,expected", [
    ("http://192.0.2.1/", None),
    ("http://192.0.2.2/", "192.0.2.2 is not an address of this machine"),
    ("http://portal.isp.example/", None),
    ("http://elsewhere.isp.example/", "resolves to 198.51.100.7 on this machine, none of them an address"),
    ("http://nowhere.isp.example/", "nowhere.isp.example does not resolve on this machine (Name or service"),
    ("http://127.0.0.1/", None),  # an error of its own (problems), not a hint on top
])
def test_warnings_about_the_host_as_seen_from_this_machine(url: str, expected: str | None) -> None:
    resolve = fake_resolver({"portal.isp.example": ["198.51.100.7", "192.0.2.1"],
                             "elsewhere.isp.example": ["198.51.100.7"]})
    found = reachability.warnings(portal(url), resolve=resolve, is_local=local)
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith("portal.url: ") and expected in found[0], found


def test_local_addresses_are_found_by_binding() -> None:
    assert reachability.is_local_address(ipaddress.ip_address("127.0.0.1"))
    assert not reachability.is_local_address(ipaddress.ip_address("192.0.2.254"))  # TEST-NET: never ours here
    assert reachability.resolve_host("localhost")
    with pytest.raises(OSError):
        reachability.resolve_host("no-such-host.invalid")


def test_the_shipped_example_url_adds_up() -> None:
    example = Path(__file__).parents[2] / "config" / "config.example.yaml"
    text = example.read_text().replace("  socket_group: walled-garden\n", "")  # a group this machine may lack
    config = parse_config(text)
    assert reachability.problems(config) == []
