"""dnsmasq lease file parsing. ``data/leases/dnsmasq.leases`` was written by the real dnsmasq
2.90 (Debian bookworm) for udhcpc and dhclient -6 (DUID-LL and DUID-LLT) clients in network
namespaces; the other lines follow what its ``lease_update_file`` writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from enforcer.match import Match
from enforcer.sessions.dnsmasq import parse_leases
from enforcer.sessions.lease_file import Reading
from enforcer.sessions.session import Session

NOW = 1796092000.0
REAL = (Path(__file__).parent / "data" / "leases" / "dnsmasq.leases").read_text()


def parse(text: str) -> tuple[dict[str, tuple[str, float | None, str]], Reading]:
    reading = parse_leases(text, "dnsmasq", "/var/lib/misc/dnsmasq.leases", NOW)
    return {s.key: (s.match.mac, s.expires, s.detail) for s in reading.sessions}, reading


def test_the_real_file_v4_v6_infinite_and_duid_macs() -> None:
    found, reading = parse(REAL)
    assert found == {
        "192.0.2.200": ("02:00:00:00:10:02", None, "lease 192.0.2.200"),                 # expiry 0: infinite
        "192.0.2.149": ("02:00:00:00:10:01", 1796095675.0, "lease 192.0.2.149, hostname pc1"),
        "2001:db8:1::1e1": ("02:00:00:00:10:02", 1796099278.0, "lease 2001:db8:1::1e1"),  # DUID-LLT
        "2001:db8:1::174": ("02:00:00:00:10:01", 1796099276.0, "lease 2001:db8:1::174"),  # DUID-LL
    }
    assert reading.complete and not reading.problems
    session = next(s for s in reading.sessions if s.key == "2001:db8:1::174")
    assert session.match == Match(mac="02:00:00:00:10:01") and str(session.addresses[0]) == "2001:db8:1::174/128"


def test_expired_leases_end_and_macless_ones_are_skipped_and_counted() -> None:
    found, reading = parse(
        "1796091999 02:00:00:00:10:01 192.0.2.10 * *\n"                   # expired a second ago
        "1796095675 20-00:11:22:33:44:55:66:77:88:99:aa:bb 192.0.2.11 * *\n"   # InfiniBand: no MAC
        "duid 00:01:00:01:32:a0:ed:27:02:00:00:00:00:01\n"
        "1796099276 T4097 2001:db8:1::5 * 00:03:00:01:02:00:00:00:10:05\n"    # temporary address
        "1796099276 4098 2001:db8:1::6 * 00:02:00:00:ab:11:01:02:03:04\n"     # DUID-EN: no MAC
        "1796099276 4099 2001:db8:1::7 * *\n")
    assert set(found) == {"2001:db8:1::5"}
    assert reading.skipped == {"expired": 1, "no_mac": 3} and reading.complete


@pytest.mark.parametrize(("line", "why"), [
    ("1796095675 02:00:00:00:10:01 192.0.2.10 *", "4 fields, expected 5"),
    ("soon 02:00:00:00:10:01 192.0.2.10 * *", "expiry 'soon' is not seconds"),
    ("1796095675 02:00:00:00:10 192.0.2.10 * *", "not a MAC address"),
    ("1796095675 02:00:00:00:10:01 192.0.2.300 * *", "address '192.0.2.300' is not an IP address"),
    ("1796095675 iaid 2001:db8::1 * *", "IAID 'iaid' is not a number"),
    ("duid", "'duid' line has 1 fields"),
])
def test_a_malformed_line_is_reported_with_file_and_line_and_makes_the_set_incomplete(line: str, why: str) -> None:
    found, reading = parse("1796095675 02:00:00:00:10:01 192.0.2.9 * *\n" + line + "\n")
    assert set(found) == {"192.0.2.9"} and not reading.complete
    [(kind, detail, _)] = reading.problems
    assert kind == "malformed" and detail.startswith("/var/lib/misc/dnsmasq.leases:2: ") and why in detail


def test_a_line_read_before_is_not_parsed_again_but_still_expires() -> None:
    line = "1796095675 02:00:00:00:10:01 100.64.0.9 pc1 *"
    lines: dict[str, Session] = {}
    first = parse_leases(line + "\n", "dnsmasq", "f", 1_796_000_000, {}, lines)
    [session] = first.sessions
    again = parse_leases(line + "\n", "dnsmasq", "f", 1_796_000_000, lines, {})
    assert again.sessions[0] is session, "the same line: the same session, not parsed again"
    late = parse_leases(line + "\n", "dnsmasq", "f", 1_796_095_675, lines, {})
    assert late.sessions == [] and late.skipped == {"expired": 1}
