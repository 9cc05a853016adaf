"""Sessions through the daemon: a restriction follows the subscriber's current addresses.

The fake dataplane stands in for the kernel; everything else is the daemon's own code: the
session intake, the policy, the engine's diff, the store (a restart reads the sessions back).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from daemon_helpers import NoConntrack, cli, handle_event
from enforcer.api import http
from enforcer.api.control import control_app
from enforcer.api.listeners import start_unix_site
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import parse_event
from enforcer.match import Match
from enforcer.sessions.session import Session
from enforcer.sessions.source import SessionChangeFailed
from enforcer.sources import ListUpdate
from enforcer.store import StoreError
from enforcer.subscribers import Subscriber, parse_address

NOW = 1_795_000_000.0
MAC_1, MAC_2 = "02:00:00:00:10:01", "02:00:00:00:10:02"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                    f"gateway: {{subscriber_prefixes: [100.64.0.0/16, '2001:db8::/32']}}\n"
                    f"api: {{socket: {tmp_path}/control.sock}}\n")
    return parse_config(path.read_text(), str(path))


async def _daemon(tmp_path: Path, fake: FakeDataplane, clock: Clock) -> Enforcer:
    e = Enforcer(_config(tmp_path), dataplane=fake, conntrack=NoConntrack(), clock=clock)  # type: ignore[arg-type]
    await e.engine.restore()
    return e


def _lease(address: str, mac: str, expires: float | None = None) -> Session:
    return Session("dnsmasq", address, Match(mac=mac), (ipaddress.ip_network(address),), expires=expires,
                   detail=f"lease {address}")


def walled(fake: FakeDataplane) -> set[str]:
    return {k for k, v in fake.view.get("mode4_32", {}).items() if v == "goto garden"}


@pytest.fixture
async def daemon(tmp_path: Path) -> Any:
    fake, clock = FakeDataplane(), Clock()
    e = await _daemon(tmp_path, fake, clock)
    await e.lists.on_list(ListUpdate([Subscriber("C-1", (), reason="overdue", match=Match(mac=MAC_1))], "l", "1"))
    yield e, fake, clock
    await e.close()


async def test_a_lease_walls_its_address_and_a_renewal_elsewhere_frees_the_old_one(daemon: Any) -> None:
    e, fake, _ = daemon
    assert walled(fake) == set(), "restricted, but no session yet: nothing to wall"
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.5", MAC_1)])
    assert walled(fake) == {"100.64.0.5"}
    # C-1 renews to .6; .5 goes to a paying subscriber (MAC_2 is on no list).
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.6", MAC_1), _lease("100.64.0.5", MAC_2)])
    assert walled(fake) == {"100.64.0.6"}, "the old address, now a paying subscriber's, is free"
    explained = e.queries.explain("100.64.0.6")
    assert explained["subscriber"] == "C-1" and explained["restricted"]
    [session] = explained["sessions"]
    assert session["source"] == "dnsmasq" and session["addresses"] == ["100.64.0.6/32"]
    assert "session addresses: 100.64.0.6/32 from dnsmasq session 100.64.0.6" in explained["why"]
    audit = e.engine.store.audit("C-1")
    assert any("100.64.0.6" in row["cause"] for row in audit), audit


async def test_a_payment_frees_the_session_address_and_the_next_lease_stays_free(daemon: Any) -> None:
    e, fake, _ = daemon
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.5", MAC_1)])
    payment = parse_event("p1", json.dumps({"type": "payment.received", "timestamp": NOW,
                                             "data": {"subscriber": "C-1"}}))
    assert (await handle_event(e, payment))[0] == 200
    assert walled(fake) == set()
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.7", MAC_1)])
    assert walled(fake) == set()


async def test_sessions_survive_a_restart(daemon: Any, tmp_path: Path) -> None:
    e, _, clock = daemon
    await e.sessions.update("radius", [Session("radius", "nas/1", Match(mac=MAC_1),
                                               (parse_address("100.64.0.9"),))])
    await e.close()
    again = await _daemon(tmp_path, FakeDataplane(), clock)
    try:
        assert [s.key for s in again.engine.inputs.sessions_of("C-1")] == ["nas/1"]
        assert again.queries.lookup("100.64.0.9")["restricted"]
    finally:
        await again.close()


async def test_an_expired_lease_frees_its_address(daemon: Any) -> None:
    e, fake, clock = daemon
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.5", MAC_1, expires=NOW + 60)])
    assert walled(fake) == {"100.64.0.5"}
    assert e.sessions.due() == pytest.approx(60)
    clock.now += 61
    await e.sessions.run()
    assert walled(fake) == set()
    assert e.engine.inputs.sessions.counts() == {}


async def test_a_failed_save_changes_nothing_and_tells_the_source(daemon: Any, monkeypatch: Any) -> None:
    e, fake, _ = daemon

    def broken(*args: Any, **kwargs: Any) -> None:
        raise StoreError("record_state", "disk I/O error")

    monkeypatch.setattr(e.engine.store, "record_state", broken)
    with pytest.raises(SessionChangeFailed):
        await e.sessions.replace("dnsmasq", [_lease("100.64.0.5", MAC_1)])
    assert walled(fake) == set() and len(e.engine.inputs.sessions) == 0
    assert e.sessions.status()["dnsmasq"]["problems"] == {"commit_failed": 1}


async def test_a_failed_kernel_change_changes_nothing(daemon: Any) -> None:
    e, fake, _ = daemon
    fake.fail_next = "netlink: Error: Could not process rule"
    with pytest.raises(SessionChangeFailed):
        await e.sessions.replace("dnsmasq", [_lease("100.64.0.5", MAC_1)])
    assert len(e.engine.inputs.sessions) == 0
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.5", MAC_1)])
    assert walled(fake) == {"100.64.0.5"}


async def test_session_events_start_and_stop_and_a_retry_gets_the_same_answer(daemon: Any) -> None:
    e, fake, _ = daemon
    body = {"type": "session.started", "timestamp": NOW,
            "data": {"username": "c1@isp", "mac": MAC_1, "addresses": ["100.64.0.20", "2001:db8:1::/56"]}}
    status, answer = await handle_event(e, parse_event("s1", json.dumps(body)))
    assert status == 200 and answer["subscribers"] == ["C-1"], answer
    assert walled(fake) == {"100.64.0.20"}
    assert fake.view["mode6_56"]["2001:db8:1::"] == "goto garden"
    assert (await handle_event(e, parse_event("s1", json.dumps(body)))) == (status, answer)
    stop = {"type": "session.stopped", "timestamp": NOW, "data": {"mac": MAC_1}}
    assert (await handle_event(e, parse_event("s2", json.dumps(stop))))[0] == 200
    assert walled(fake) == set() and not fake.view.get("mode6_56")


async def test_a_session_event_outside_the_subscriber_prefixes_is_refused(daemon: Any) -> None:
    e, _, _ = daemon
    body = {"type": "session.started", "timestamp": NOW, "data": {"mac": MAC_1, "addresses": ["198.51.100.7"]}}
    status, answer = await handle_event(e, parse_event("s3", json.dumps(body)))
    assert status == 400 and "198.51.100.7" in answer["error"]
    assert len(e.engine.inputs.sessions) == 0


async def test_a_session_on_another_subscribers_list_address_does_not_take_it(daemon: Any) -> None:
    e, fake, _ = daemon
    await e.lists.on_list(ListUpdate([Subscriber("C-1", (), reason="overdue", match=Match(mac=MAC_1)),
                                      Subscriber("C-2", (parse_address("100.64.0.30"),), reason="overdue")],
                                     "l", "2"))
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.30", MAC_1), _lease("100.64.0.31", MAC_1)])
    assert walled(fake) == {"100.64.0.30", "100.64.0.31"}, "C-2 keeps its listed address; C-1 gets the rest"
    assert "C-1" in e.engine.conflicts
    assert e.queries.status()["address_conflicts_total"] == 1
    assert "held back (enforced for another subscriber): 100.64.0.30/32" in e.engine.decisions["C-1"].cause


async def test_one_contested_session_address_does_not_freeze_the_subscribers_other_addresses(daemon: Any) -> None:
    """A session address that is another subscriber's is held back alone: the subscriber's later
    addresses are walled and its old ones freed (they may be a paying customer's now), and once
    the holder lets go the held-back address is taken at the timer's retry."""
    e, fake, clock = daemon
    await e.lists.on_list(ListUpdate([Subscriber("C-1", (), reason="overdue", match=Match(mac=MAC_1)),
                                      Subscriber("C-2", (parse_address("100.64.0.30"),), reason="overdue")],
                                     "l", "2"))
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.10", MAC_1)])
    assert walled(fake) == {"100.64.0.10", "100.64.0.30"}
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.10", MAC_1), _lease("100.64.0.30", MAC_1)])
    assert "C-1" in e.engine.conflicts and walled(fake) == {"100.64.0.10", "100.64.0.30"}
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.10", MAC_1), _lease("100.64.0.30", MAC_1),
                                         _lease("100.64.0.11", MAC_1)])
    assert walled(fake) == {"100.64.0.10", "100.64.0.11", "100.64.0.30"}, "the new address is walled"
    # .10 re-leased to a paying customer: freed at once, though C-1's .30 is still contested
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.30", MAC_1), _lease("100.64.0.11", MAC_1),
                                         _lease("100.64.0.10", MAC_2)])
    assert walled(fake) == {"100.64.0.11", "100.64.0.30"}
    assert e.engine.inputs.sessions and "C-1" in e.engine.conflicts
    # C-2 leaves the list: the timer's retry gives C-1 the address, the conflict is gone
    await e.lists.on_list(ListUpdate([Subscriber("C-1", (), reason="overdue", match=Match(mac=MAC_1))], "l", "3"))
    clock.now += 60
    await e.timers.tick()
    assert walled(fake) == {"100.64.0.11", "100.64.0.30"} and "C-1" not in e.engine.conflicts
    assert e.engine.reconciler.owned["C-1"].subscriber is not None
    assert {k[2] for k in e.engine.reconciler.owned["C-1"].subscriber.keys} == {"100.64.0.11", "100.64.0.30"}


async def test_the_cli_reports_a_bng_session(daemon: Any, tmp_path: Path) -> None:
    e, fake, _ = daemon
    runner = await start_unix_site(control_app(e), str(tmp_path / "control.sock"))
    try:
        config = str(tmp_path / "config.yaml")
        code, out = await cli("session", "start", "--config", config, "--mac", MAC_1.upper().replace(":", "-"),
                              "--address", "100.64.0.40")
        assert code == 0 and "C-1" in out, out
        assert walled(fake) == {"100.64.0.40"}
        code, out = await cli("explain", "--config", config, "100.64.0.40")
        assert code == 0 and f"session cli 100.64.0.40: 100.64.0.40/32 (mac={MAC_1})" in out, out
        assert "from cli session 100.64.0.40 (mac=" in out
        code, out = await cli("status", "--config", config)
        assert code == 0 and "sessions cli: 1 now, 1 changes" in out, out
        code, out = await cli("session", "stop", "--config", config, "--mac", MAC_1, "--address", "100.64.0.40")
        assert code == 0 and "C-1" in out, out
        assert walled(fake) == set()
        code, out = await cli("session", "start", "--config", config, "--address", "100.64.0.41")
        assert code == 1
        status = e.queries.status()["sessions"]
        assert status["cli"]["changes"] == 2 and status["cli"]["sessions"] == 0
    finally:
        await runner.cleanup()


async def test_an_operator_restricts_a_subscriber_known_only_by_match_keys(daemon: Any, tmp_path: Path) -> None:
    e, fake, _ = daemon
    await e.lists.on_list(ListUpdate([], "l", "2"))
    await e.lists.on_list(ListUpdate([Subscriber("C-1", (), reason="overdue", match=Match(mac=MAC_1))], "l", "3"))
    payment = parse_event("p2", json.dumps({"type": "payment.received", "timestamp": NOW,
                                             "data": {"subscriber": "C-1"}}))
    assert (await handle_event(e, payment))[0] == 200
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.5", MAC_1)])
    assert walled(fake) == set()
    status, answer = http(await e.operator.change("noc", "C-1", True, "called, refused to pay", None, None))
    assert status == 200, answer
    assert walled(fake) == {"100.64.0.5"}, "the override keeps the match keys: the session's address is walled"


async def test_a_late_retry_of_an_older_session_event_changes_nothing(daemon: Any) -> None:
    e, fake, _ = daemon

    def body(kind: str, mac: str, at: float) -> str:
        return json.dumps({"type": kind, "timestamp": at, "data": {"mac": mac, "addresses": ["100.64.0.50"]}})

    assert (await handle_event(e, parse_event("a", body("session.started", MAC_1, NOW))))[0] == 200
    assert walled(fake) == {"100.64.0.50"}
    status, answer = await handle_event(e, parse_event("b", body("session.started", MAC_2, NOW + 10)))
    assert status == 200 and answer["subscribers"] == [] and walled(fake) == set(), "handed to a paying MAC"
    # C-1's start, retried by the BNG after the address moved on, must not wall a paying customer;
    # and an older stop must not end the newer session.
    status, answer = await handle_event(e, parse_event("c", body("session.started", MAC_1, NOW + 5)))
    assert (status, answer["result"], answer["ignored"]) == (200, "ignored", ["100.64.0.50"]), answer
    assert walled(fake) == set()
    status, answer = await handle_event(e, parse_event("d", body("session.stopped", MAC_2, NOW + 5)))
    assert answer["result"] == "ignored"
    assert [s.match.mac for s in e.engine.inputs.sessions.sessions.values()] == [MAC_2]
    # The order survives a restart (billing_order is saved with the change).
    assert ("session:100.64.0.50", "session", NOW + 10) in e.engine.store.billing_order()


async def test_a_list_moving_a_match_key_moves_the_session_and_frees_the_old_owner(daemon: Any) -> None:
    """C-1 is walled on a session carrying both a username and C-1's MAC; the list then gives
    the username to C-2, who has paid: the session is C-2's (the more specific key), so its
    address is free, though C-1's own entry did not change."""
    e, fake, _ = daemon
    await e.sessions.update("radius", [Session("radius", "nas/1", Match(username="u@isp", mac=MAC_1),
                                               (parse_address("100.64.0.60"),))])
    assert walled(fake) == {"100.64.0.60"}
    await e.lists.on_list(ListUpdate([Subscriber("C-1", (), reason="overdue", match=Match(mac=MAC_1)),
                                      Subscriber("C-2", (), reason="overdue", match=Match(username="u@isp"),
                                                 exempt_until=NOW + 86400, exempt_category="arrangement")],
                                     "l", "2"))
    assert walled(fake) == set(), "the address is the exempt C-2's now"


async def test_the_expiry_duty_does_not_end_a_renewal_committed_since(daemon: Any) -> None:
    e, fake, clock = daemon
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.5", MAC_1, expires=NOW + 60)])
    clock.now += 61
    renewal = asyncio.ensure_future(e.sessions.replace("dnsmasq", [_lease("100.64.0.5", MAC_1, expires=NOW + 600)]))
    await asyncio.sleep(0)   # queued before the duty's stop
    await e.sessions.run()
    await renewal
    assert walled(fake) == {"100.64.0.5"} and len(e.engine.inputs.sessions) == 1


@pytest.mark.parametrize(("gainer", "loser"), [("C-1", "C-2"), ("C-2", "C-1")])
async def test_a_session_moving_an_address_between_restricted_subscribers_moves_it_at_once(
        daemon: Any, monkeypatch: Any, gainer: str, loser: str) -> None:
    """C-1 and C-2 are restricted (by MAC); a lease of 100.64.0.40 passes from the loser's MAC to
    the gainer's. Both are decided again in one batch: the loser's release is claimed before the
    gainer's claim, so the address stays walled, now the gainer's, with no conflict reported
    (claimed in a set's order, the gainer could meet it still held: left in ``conflicts`` with
    the address free until the timer's retry). When the save fails, the undo moves it back the
    same way: walled for the loser, no conflict. Both directions run: either set order fails one."""
    e, fake, _ = daemon
    macs = {"C-1": MAC_1, "C-2": MAC_2}
    await e.lists.on_list(ListUpdate([Subscriber(sid, (), reason="overdue", match=Match(mac=mac))
                                      for sid, mac in macs.items()], "l", "2"))
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.40", macs[loser])])
    assert e.engine.reconciler.owner_of("mode4_32", "100.64.0.40") == loser

    def broken(*args: Any, **kwargs: Any) -> None:
        raise StoreError("record_state", "disk I/O error")
    with monkeypatch.context() as patched:
        patched.setattr(e.engine.store, "record_state", broken)
        with pytest.raises(SessionChangeFailed):
            await e.sessions.replace("dnsmasq", [_lease("100.64.0.40", macs[gainer])])
    assert walled(fake) == {"100.64.0.40"} and not e.engine.conflicts, e.engine.conflicts
    assert e.engine.reconciler.owner_of("mode4_32", "100.64.0.40") == loser, "the undo did not give it back"
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.40", macs[gainer])])
    assert walled(fake) == {"100.64.0.40"} and not e.engine.conflicts, e.engine.conflicts
    assert e.engine.reconciler.owner_of("mode4_32", "100.64.0.40") == gainer


@pytest.mark.parametrize("roles", list(itertools.permutations(("C-1", "C-2", "C-3"))))
async def test_a_lease_file_passing_addresses_along_a_chain_keeps_them_walled(daemon: Any,
                                                                             roles: tuple[str, ...]) -> None:
    """Three restricted subscribers (by MAC): ``b`` holds 100.64.0.41, ``c`` 100.64.0.42; one
    lease file read gives .41 to ``a`` and .42 to ``b``. ``a`` and ``b`` both gain an address, so
    whichever order they are claimed in, ``a`` may meet .41 still held by ``b``: it is tried
    again once ``b`` has let go, and no conflict is left with .41 free. Every assignment of
    the roles runs, so every set order meets the case."""
    e, fake, _ = daemon
    a, b, c = roles
    macs = {"C-1": MAC_1, "C-2": MAC_2, "C-3": "02:00:00:00:10:03"}
    await e.lists.on_list(ListUpdate([Subscriber(sid, (), reason="overdue", match=Match(mac=mac))
                                      for sid, mac in macs.items()], "l", "2"))
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.41", macs[b]), _lease("100.64.0.42", macs[c])])
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.41", macs[a]), _lease("100.64.0.42", macs[b])])
    assert walled(fake) == {"100.64.0.41", "100.64.0.42"} and not e.engine.conflicts, e.engine.conflicts
    assert [e.engine.reconciler.owner_of("mode4_32", f"100.64.0.4{n}") for n in (1, 2)] == [a, b]


async def test_a_kea_lease_broader_than_one_subscriber_may_hold_is_reported_and_left_out(
        daemon: Any, tmp_path: Path) -> None:
    """Lists and events refuse a prefix broader than /48 (/16 for IPv4); a delegated /33 in a
    lease file must not wall half the pool either: reported, left out, the other leases applied."""
    from enforcer.sessions.kea import KeaSource
    e, fake, _ = daemon
    path = tmp_path / "kea-leases6.csv"
    head = ("address,duid,valid_lifetime,expire,subnet_id,pref_lifetime,lease_type,iaid,prefix_len,fqdn_fwd,"
            "fqdn_rev,hostname,hwaddr,state,user_context,hwtype,hwaddr_source\n")
    row = "{},00:03:00:01:{},3600,1796095685,1,1800,{},1,{},0,0,,{},0,,1,1\n"
    mac = MAC_1
    path.write_text(head + row.format("2001:db8:8000::", mac, 2, 33, mac)
                    + row.format("2001:db8:1::5", mac, 0, 128, mac))
    source = KeaSource("kea", path, 0.01, clock=lambda: NOW)
    await source.poll(e.sessions)
    assert not any(set_name.startswith("mode6_33") and items for set_name, items in fake.view.items())
    assert {k[2] for k in e.engine.reconciler.owned["C-1"].subscriber.keys} == {"2001:db8:1::5"}
    status = e.queries.status()
    assert "broader than /48" in json.dumps(status), status
