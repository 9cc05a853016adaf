"""SPEC §9 through the daemon (fake dataplane): a newer session inside an older session's prefix
frees the prefix, and ``explain`` names the session behind an address, a paying customer's too.

Found by an audit: a restricted subscriber's Kea delegated /60 stayed walled after a RADIUS
Start gave an address inside it to a paying subscriber, and ``explain`` of that address named
the restricted subscriber; once fixed, ``explain`` said only "no restricted subscriber holds this
address", although SPEC §9 says it shows which session gave an address.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from test_cli_text import printed
from test_session_intake import NOW, Clock, _daemon

import enforcer.cli as cli
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.match import Match
from enforcer.sessions.session import Session
from enforcer.sources import ListUpdate
from enforcer.subscribers import Subscriber

KEA_MAC = "02:00:00:00:0c:ea"
PD, INSIDE = "2001:db8:100:10::/60", "2001:db8:100:10::5"


def walled(fake: FakeDataplane) -> set[str]:
    """Every key the kernel walls, of any family and prefix length."""
    return {f"{k}/{name.rsplit('_', 1)[1]}" for name, keys in fake.view.items() if name.startswith("mode")
            for k, v in keys.items() if v == "goto garden"}


@pytest.fixture
async def daemon(tmp_path: Path) -> Any:
    fake, clock = FakeDataplane(), Clock()
    e: Enforcer = await _daemon(tmp_path, fake, clock)
    await e.lists.on_list(ListUpdate([Subscriber("C-KEA", (), reason="overdue", match=Match(mac=KEA_MAC))], "l", "1"))
    await e.sessions.replace("kea", [Session("kea", PD, Match(mac=KEA_MAC), (ipaddress.ip_network(PD),),
                                             detail=f"lease {PD}")])
    assert walled(fake) == {"2001:db8:100:10::/60"}
    yield e, fake, clock
    await e.close()


async def test_a_paying_subscribers_address_inside_a_walled_prefix_frees_the_prefix(daemon: Any) -> None:
    e, fake, clock = daemon
    clock.now += 1
    payer = Session("radius", "192.0.2.2/00000001", Match(username="payer6@isp"),
                    (ipaddress.ip_network(f"{INSIDE}/128"),), expires=NOW + 900,
                    detail="radius session 00000001 from 192.0.2.2")
    await e.sessions.update("radius", [payer])
    assert walled(fake) == set(), "the payer's address lies in the restricted subscriber's old /60"
    assert e.queries.lookup(INSIDE)["restricted"] is False
    await e.sessions.update("radius", stopped=["192.0.2.2/00000001"])
    assert walled(fake) == {"2001:db8:100:10::/60"}, "the payer gone, C-KEA's lease holds the /60 again"


async def test_explain_names_the_session_behind_a_paying_customers_address(
        daemon: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    e, _, clock = daemon
    clock.now += 1
    await e.sessions.update("radius", [Session("radius", "192.0.2.2/00000001", Match(username="payer6@isp"),
                                               (ipaddress.ip_network(f"{INSIDE}/128"),), expires=NOW + 900)])
    answer = e.queries.explain(INSIDE)
    assert answer["found"] is False and "no restricted subscriber holds this address" in answer["why"]
    assert "radius session 192.0.2.2/00000001" in answer["why"]
    session = answer["session"]
    assert (session["source"], session["key"], session["subscriber"], session["expires"]) == (
        "radius", "192.0.2.2/00000001", None, NOW + 900)
    assert session["addresses"] == [f"{INSIDE}/128"] and session["match"] == {"username": "payer6@isp"}
    out = printed(monkeypatch, capsys, cli.cmd_explain, answer, NOW + 60, INSIDE)
    assert "address given by: radius session 192.0.2.2/00000001 (username=payer6@isp)" in out, out
    assert "no listed subscriber (a paying customer)" in out and "until 20" in out, out


async def test_explain_of_a_restricted_session_address_names_the_session_too(
        daemon: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    e, _, _ = daemon
    answer = e.queries.explain("2001:db8:100:10::7")
    assert answer["found"] is True and answer["subscriber"] == "C-KEA" and answer["restricted"]
    assert (answer["session"]["key"], answer["session"]["subscriber"]) == (PD, "C-KEA")
    out = printed(monkeypatch, capsys, cli.cmd_explain, answer, NOW + 60, "2001:db8:100:10::7")
    assert f"address given by: kea session {PD} (mac={KEA_MAC}), subscriber C-KEA" in out, out
    assert "(no expiry)" in out


async def test_explain_of_an_address_no_session_holds_has_no_session(daemon: Any) -> None:
    e, _, _ = daemon
    answer = e.queries.explain("2001:db8:100:20::1")
    assert answer["found"] is False and "session" not in answer
    assert answer["why"] == "no restricted subscriber holds this address"
