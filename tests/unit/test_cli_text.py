"""What ``status`` and ``explain`` print for a person (SPEC §1): times as UTC ISO with how long
ago, never raw unix seconds, and a header that says what the kernel really holds (found by a
SPEC audit: ``last sync partial of 3 elements in 0.001267s`` had no time at all, a payment grace
printed ``until 1796414902``, and a subscriber held back by an address clash was headed
``RESTRICTED`` while the kernel held it free)."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import enforcer.cli as cli
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import PAYMENT, RESTRICTED, Event
from enforcer.model import Mode
from enforcer.sources import ListUpdate, SourceFailure
from enforcer.subscribers import Subscriber, parse_address
from tests.daemon_helpers import SteppedClocks, clocked_enforcer, grace_config, handle_event

NOW = 1_796_414_000.0   # 2026-12-04T19:53:20Z
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
#: A unix time in seconds as the daemon keeps them (2020 to 2033), printed raw.
RAW_EPOCH = re.compile(r"(?<![\d.])1[6-9]\d{8}(\.\d+)?(?![\d])")


def sub(sid: str, *addresses: str, mode: Mode = Mode.WALLED_GARDEN) -> Subscriber:
    return Subscriber(sid, tuple(parse_address(a) for a in addresses), mode, "overdue")


def printed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            command: Callable[[Any], int], answer: dict[str, Any], now: float, *query: str) -> str:
    """``command``'s text for ``answer`` (as the control socket hands it over: JSON), read at ``now``."""
    capsys.readouterr()
    with monkeypatch.context() as patched:
        patched.setattr(cli, "_ask", lambda *args, **kw: json.loads(json.dumps(answer)))
        patched.setattr(time, "time", lambda: now)
        args = argparse.Namespace(json=False, query=query[0] if query else "")
        assert command(args) == 0
    return capsys.readouterr().out


def test_when_and_took_read_as_a_person_would() -> None:
    assert cli._when(NOW - 5, NOW) == "2026-12-04T19:53:15Z (5 s ago)"
    assert cli._when(NOW - 12 * 60, NOW) == "2026-12-04T19:41:20Z (12 min ago)"
    assert cli._when(NOW - 3 * 3600, NOW) == "2026-12-04T16:53:20Z (3 h ago)"
    assert cli._when(NOW - 3 * 86400, NOW) == "2026-12-01T19:53:20Z (3 d ago)"
    assert cli._when(NOW + 3600, NOW) == "2026-12-04T20:53:20Z (in 60 min)"
    assert cli._when(None, NOW) == cli._when(0, NOW) == "never"
    assert cli._took(0.001267) == "1.3 ms" and cli._took(2.5) == "2.50 s" and cli._took(None) == "-"


async def test_status_says_when_the_last_sync_and_the_list_were_and_how_long_ago(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clocks = SteppedClocks(NOW)
    async with clocked_enforcer(grace_config(tmp_path, 3600), clocks, FakeDataplane(),
                                [sub("C-1", "100.64.0.10"), sub("C-2", "100.64.0.20")]) as e:
        e.lists.report_failure(SourceFailure("l.yaml", "parse", "l.yaml:3: not an address"))
        status = e.queries.status()
    json_keys = set(status["last_sync"])
    out = printed(monkeypatch, capsys, cli.cmd_status, status, NOW + 5)
    assert json_keys == {"kind", "at", "seconds", "elements"}, "--json keeps its keys"
    kernel = next(line for line in out.splitlines() if line.startswith("kernel:"))
    assert re.fullmatch(r"kernel: in sync; last sync 2026-12-04T19:53:20Z \(5 s ago\), (full|partial), "
                        r"\d+ elements, \d+\.\d ms", kernel), kernel
    assert "list in force: 2 entries from l.yaml, accepted 2026-12-04T19:53:20Z (5 s ago)" in out, out
    assert "source error 2026-12-04T19:53:20Z (5 s ago): l.yaml:3: not an address" in out, out
    assert not RAW_EPOCH.search(out), out


def test_status_before_any_sync_and_with_sessions_held_changes_and_a_clash(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The other times ``status`` has: a session source's last change, read and request, a held
    list's start, an address clash's start, a quarantined database's moment."""
    status = {"modes": {"walled-garden": 0}, "last_sync": {}, "kernel_in_sync": True,
              "source": {"configured": "/etc/l.yaml", "list_in_force": {}, "list_age_seconds": None,
                         "last_error": None},
              "held_changes": [{"origin": "l.yaml", "entries": 9, "restricting": 500, "lifting": 0,
                                "since": NOW - 120, "why": "500 > max_restrict 100", "digest": "d"}],
              "graces": 0, "overrides": 0,
              "sessions": {"dnsmasq": {"kind": "dnsmasq", "sessions": 3, "changes": 4, "last_change": NOW - 30,
                                       "last_lag_seconds": 0.0042, "last_read": NOW - 1, "problems": {},
                                       "last_problem": None},
                           "radius": {"kind": "radius", "sessions": 0, "changes": 0, "last_change": None,
                                      "last_lag_seconds": None, "last_request": NOW - 7200, "problems": {}}},
              "address_conflicts": {"C-6": {"detail": "an address is enforced for subscriber C-5",
                                            "since": NOW - 60, "wanted": "walled-garden"}},
              "address_conflicts_total": 1,
              "state": {"quarantined": {"path": "/var/lib/wg/state.sqlite3.corrupt-1", "reason": "not a database",
                                        "at": NOW - 3600}, "rows_quarantined": 0}}
    out = printed(monkeypatch, capsys, cli.cmd_status, status, NOW)
    assert "kernel: in sync; no sync yet since the start" in out, out
    assert "list in force: 0 entries, none accepted yet" in out, out
    assert "(held since 2026-12-04T19:51:20Z (2 min ago))" in out, out
    assert ("sessions dnsmasq: 3 now, 4 changes, last change 2026-12-04T19:52:50Z (30 s ago), last lag 4.2 ms, "
            "last read 2026-12-04T19:53:19Z (1 s ago); problems: none") in out, out
    assert "sessions radius: 0 now, 0 changes, last request 2026-12-04T17:53:20Z (2 h ago); problems: none" in out
    assert "C-6: wanted walled-garden; an address is enforced for subscriber C-5 (since 2026-12-04T19:52:20Z" in out
    assert "STATE QUARANTINED at 2026-12-04T18:53:20Z (60 min ago)" in out, out
    assert not RAW_EPOCH.search(out), out


async def test_explain_prints_the_payment_grace_and_the_last_event_as_iso_times(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clocks = SteppedClocks(NOW)
    async with clocked_enforcer(grace_config(tmp_path, 3600), clocks, FakeDataplane(),
                                [sub("C-1", "100.64.0.10")]) as e:
        status, _ = await handle_event(e, Event("pay1", PAYMENT, NOW, "C-1"), 0.0)
        assert status == 200
        answer = e.queries.explain("C-1")
    assert answer["payment_grace"]["until"] == NOW + 3600, "--json keeps unix seconds"
    out = printed(monkeypatch, capsys, cli.cmd_explain, answer, NOW + 60, "C-1")
    assert "C-1 [" in out and "]: free" in out, out
    assert "  payment grace: event pay1 (payment.received), until 2026-12-04T20:53:20Z (in 59 min)" in out, out
    assert "  last event: " not in out or re.search(rf"  last event: .*, at {ISO} \(", out), out
    assert not RAW_EPOCH.search(out), out


async def test_explain_of_a_subscriber_held_back_by_an_address_clash_says_it_is_not_enforced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Billing restricts E-11 on 100.64.0.3; a list then names C-3 on the same address: C-3 is
    held back (the kernel holds it free), and ``explain`` must say so on its first line."""
    clocks = SteppedClocks(NOW)
    async with clocked_enforcer(grace_config(tmp_path, 3600), clocks, FakeDataplane(),
                                [sub("C-1", "100.64.0.10")]) as e:
        status, _ = await handle_event(e, Event("r11", RESTRICTED, NOW, "E-11", sub("E-11", "100.64.0.3")), 0.0)
        assert status == 200
        clocks.pass_(10)
        await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.10"), sub("C-3", "100.64.0.3")], "l.yaml", "2"))
        assert "C-3" in e.engine.conflicts
        answer = e.queries.explain("C-3")
        holder = e.queries.explain("E-11")
        status, _ = await handle_event(e, Event("p3", PAYMENT, NOW + 10, "C-3"), 0.0)   # C-3 pays meanwhile
        assert status == 200
        paid = e.queries.explain("C-3")
    assert paid["address_conflict"] is None, "free now: no clash keeps a restriction out of the kernel"
    assert answer["address_conflict"]["holder"] == "E-11" and answer["address_conflict"]["address"] == "100.64.0.3"
    assert answer["enforced_in_kernel"] == "free"
    out = printed(monkeypatch, capsys, cli.cmd_explain, answer, NOW + 70, "C-3")
    header = out.splitlines()[0]
    assert re.fullmatch(r"C-3 \[WG-\S+\]: wanted walled-garden, NOT ENFORCED \(address 100\.64\.0\.3 held by E-11\)",
                        header), header
    assert "RESTRICTED" not in out, out
    assert "  address conflict since 2026-12-04T19:53:30Z (60 s ago): address 100.64.0.3 held by E-11" in out, out
    assert "  in the kernel now: free" in out
    assert holder["address_conflict"] is None
    out = printed(monkeypatch, capsys, cli.cmd_explain, holder, NOW + 70, "E-11")
    assert re.match(r"E-11 \[WG-\S+\]: RESTRICTED \(walled-garden\)\n", out), out


def test_explain_header_when_the_kernel_has_not_caught_up(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Without a clash the policy and the kernel can differ for a moment (a grace just ended, a
    kernel write being retried): the header says both."""
    answer = {"found": True, "subscriber": "C-1", "reference": "WG-AAAA-BBBB", "restricted": True,
              "mode": "walled-garden", "why": "listed", "addresses": [], "list": None, "override": None,
              "payment_grace": {"paid_at": NOW - 7200, "until": NOW - 1, "cause": "event p (payment.received)"},
              "enforced_in_kernel": "free", "address_conflict": None}
    out = printed(monkeypatch, capsys, cli.cmd_explain, answer, NOW, "C-1")
    assert out.startswith("C-1 [WG-AAAA-BBBB]: wanted walled-garden, NOT ENFORCED yet (the kernel holds them free)\n")
    assert "until 2026-12-04T19:53:19Z (1 s ago)" in out, out
    lifted = answer | {"restricted": False, "mode": "free", "enforced_in_kernel": "notice", "payment_grace": None}
    out = printed(monkeypatch, capsys, cli.cmd_explain, lifted, NOW, "C-1")
    assert out.startswith("C-1 [WG-AAAA-BBBB]: wanted free, the kernel still holds notice\n"), out


async def test_explain_of_a_subscriber_enforced_but_for_one_address_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Billing restricts E-11 on 100.64.0.3; a list then names C-3 on that address and on
    100.64.0.4: C-3 is enforced on .4 (``claims.uncontested``), and the header says which
    address it is not enforced on and who holds it."""
    clocks = SteppedClocks(NOW)
    async with clocked_enforcer(grace_config(tmp_path, 3600), clocks, FakeDataplane(),
                                [sub("C-1", "100.64.0.10")]) as e:
        status, _ = await handle_event(e, Event("r11", RESTRICTED, NOW, "E-11", sub("E-11", "100.64.0.3")), 0.0)
        assert status == 200
        await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.10"), sub("C-3", "100.64.0.3", "100.64.0.4")],
                                         "l.yaml", "2"))
        answer = e.queries.explain("C-3")
    assert answer["enforced_in_kernel"] == "walled-garden" and answer["address_conflict"]["holder"] == "E-11"
    out = printed(monkeypatch, capsys, cli.cmd_explain, answer, NOW + 70, "C-3")
    header = out.splitlines()[0]
    assert re.fullmatch(r"C-3 \[WG-\S+\]: RESTRICTED \(walled-garden\) but for address 100\.64\.0\.3 held by E-11",
                        header), header
