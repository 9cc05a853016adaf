"""Faults the chaos model (``chaos_model``) found once sessions were in it (an operator
restriction without match keys, a session's order across a restart behind the clock, clock
steps around a restart), each kept as a plain sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon_helpers import NoConntrack, operator_change
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.match import Match
from enforcer.sessions.session import Session
from enforcer.sources import ListUpdate
from enforcer.subscribers import Subscriber, parse_address

NOW = 1_795_000_000.0
RESTRICTED_MAC, PAYING_MAC = "02:00:00:00:00:04", "02:00:00:00:01:01"


async def _daemon(tmp_path: Path, fake: FakeDataplane | None = None, clock: Any = lambda: NOW
                  ) -> tuple[Enforcer, FakeDataplane]:
    path = tmp_path / "config.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                    f"gateway: {{subscriber_prefixes: [100.64.0.0/16, '2001:db8::/32']}}\n")
    fake = fake or FakeDataplane()
    e = Enforcer(parse_config(path.read_text(), str(path)), dataplane=fake, conntrack=NoConntrack(),
                 clock=clock)
    await e.engine.restore()
    return e, fake


def walled(fake: FakeDataplane) -> set[str]:
    return {k for k, v in fake.view.get("mode4_32", {}).items() if v == "goto garden"}


async def test_an_operator_restricts_a_subscriber_without_match_keys(tmp_path: Path) -> None:
    """``walled-garden restrict C-4 --address 100.64.0.4`` (C-4 on no list) and ``restrict C-2``
    (listed by address only) are restrictions like before match keys existed: 200 applied.
    ``OperatorActions.change`` builds the entry with ``"match": None`` and ``validate_entry``
    refuses a present but empty ``match`` ("match is empty")."""
    e, fake = await _daemon(tmp_path)
    try:
        await e.lists.on_list(ListUpdate([Subscriber("C-2", (parse_address("100.64.0.2"),), reason="overdue")],
                                         "l", "1"))
        unlisted: Any = await operator_change(e, "noc", "C-4", True, "chaos", mode="walled-garden",
                                              addresses=["100.64.0.4"])
        listed: Any = await operator_change(e, "noc", "C-2", True, "chaos")
        assert (unlisted[0], listed[0]) == (200, 200), f"unlisted: {unlisted}; listed by address: {listed}"
        assert fake.view.get("mode4_32", {}).get("100.64.0.4") == "goto garden"
    finally:
        await e.close()


async def test_an_address_re_leased_after_a_restart_behind_the_clock_goes_to_the_newer_session(tmp_path: Path
                                                                                               ) -> None:
    """C-4 (listed by MAC only, restricted) holds 100.64.1.1 by a dnsmasq lease; the gateway's
    clock is stepped back 60 s and the daemon restarts; then a RADIUS Start gives 100.64.1.1 to a
    MAC on no list (a paying subscriber; C-4's lease file was not re-read yet). The RADIUS session
    is the newer one, so the address is the payer's and free. But the receipt clock's floor after
    a restart is ``PolicyInputs.newest_instant()``, which leaves out the sessions' ``seen``: the
    new session is stamped 60 s *before* the stored one, counts as older, and the payer is walled."""
    now = [NOW]
    e, fake = await _daemon(tmp_path, clock=lambda: now[0])
    await e.lists.on_list(ListUpdate([Subscriber("C-4", (), reason="overdue", match=Match(mac=RESTRICTED_MAC))],
                                     "l", "1"))
    address = parse_address("100.64.1.1")
    await e.sessions.replace("dnsmasq", [Session("dnsmasq", "100.64.1.1", Match(mac=RESTRICTED_MAC), (address,))])
    assert walled(fake) == {"100.64.1.1"}
    await e.close()
    now[0] -= 60                                     # NTP steps the clock back; the daemon restarts
    e, fake = await _daemon(tmp_path, fake, clock=lambda: now[0])
    try:
        await e.sessions.update("radius", [Session("radius", "nas1/7", Match(mac=PAYING_MAC), (address,))])
        holder = e.engine.inputs.sessions.holder(address)
        stamps = [(s.key, s.seen - NOW) for s in e.engine.inputs.sessions.sessions.values()]
        assert walled(fake) == set(), (f"the payer's address is walled; holder {holder and holder.describe()}, "
                                       f"stamps: {stamps}")
    finally:
        await e.close()


def test_a_moved_grace_whose_save_failed_survives_a_sigkill(tmp_path: Path) -> None:
    """Not about sessions; found by the same model. C-3 (listed) pays (200 applied, grace
    600 s). NTP steps the wall clock forward a day; the next timer round moves C-3's grace by
    the step (``Engine.now``/``policy.clock_stepped``), but that one ``save_subscribers`` write
    fails, and the moved grace is left in memory only ("saved on the next input"). No input
    comes; 299 s later the daemon is SIGKILLed. The restarted daemon reads the unmoved grace
    (ended a day ago by the wall clock) and walls C-3 299 s into the 600 s it paid for
    (SPEC §8: a payment answered 200 keeps the subscriber free for the grace whatever the
    clocks say). The timer does not retry the save, so the kernel also differs from the
    policy of the persisted inputs until some other input arrives."""
    from test_daemon_chaos import FakeChaos

    import chaos_model
    from enforcer.events import PAYMENT, Event

    m = FakeChaos()
    try:
        m.boot(listed=["C-3"])
        assert m.run(m.deliver(Event("p1", PAYMENT, chaos_model.START, "C-3")))[0] == 200
        m.clock_step(seconds=86400.0)
        m.store_failure(op="save_subscribers")
        m.time_passes(seconds=299.0)   # a timer round: the moved grace is not saved
        m.restart(how="kill", down=0.0)
        m.payments_keep_subscribers_free()
    finally:
        m.teardown()


@pytest.mark.parametrize("how", ["close", "kill"])
def test_a_forward_clock_step_just_before_a_restart_does_not_end_a_paid_grace(how: str) -> None:
    """Not about sessions; found by the same model. C-2 (listed) pays (200 applied, grace
    600 s). NTP steps the wall clock forward a day while the daemon is idle (no input, no timer
    round: the step is noticed only by ``Engine.now`` at the next one), and the daemon is
    restarted at once (``how``: a clean stop or a SIGKILL; same boot, so the monotonic clock
    runs on). The restarted daemon anchors its ``ReceiptClock`` afresh, never sees the step,
    and walls C-2 with its whole grace still to come (docs/reference.md, Safety rules 3: "A
    clock step on the gateway never re-restricts a paid subscriber")."""
    from test_daemon_chaos import FakeChaos

    import chaos_model
    from enforcer.events import PAYMENT, Event

    m = FakeChaos()
    try:
        m.boot(listed=["C-2"])
        assert m.run(m.deliver(Event("p1", PAYMENT, chaos_model.START, "C-2")))[0] == 200
        m.clock_step(seconds=86400.0)
        m.restart(how=how, down=0.0)
        m.payments_keep_subscribers_free()
    finally:
        m.teardown()
