"""The portal may promise or acknowledge only for an address the kernel saw connect to it.

README's claim "a compromised portal cannot lift anyone" rests on this: the table records
every subscriber connecting to the portal's ports (``portalcaller4/6``), and the enforcer
refuses a promise or an acknowledgement for any other address.
"""

from __future__ import annotations

from pathlib import Path

from daemon_helpers import NoConntrack, acknowledge, portal_lookup, promise
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.model import Mode
from enforcer.sources import ListUpdate
from enforcer.subscribers import Subscriber, parse_address

NOW = 1_795_000_000.0


async def test_promise_and_acknowledge_only_for_recent_callers(tmp_path: Path) -> None:
    config = parse_config(f"state_dir: {tmp_path}/s\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                          "policy: {promise_to_pay: {enabled: true}}\n", str(tmp_path / "c.yaml"))
    fake = FakeDataplane(callers_seen_by_default=False)
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: NOW)  # type: ignore[arg-type]
    await e.engine.restore()
    await e.lists.on_list(ListUpdate([Subscriber("C-1", (parse_address("100.64.0.1"),), Mode.WALLED_GARDEN, "overdue"),
                                Subscriber("C-2", (parse_address("100.64.0.2"),), Mode.NOTICE, "overdue")],
                               "l.yaml", "1"))
    status, answer = await promise(e, "100.64.0.1")
    assert (status, answer["why"]) == (403, "not_a_recent_caller")
    assert fake.view["mode4_32"]["100.64.0.1"] == "goto garden"
    assert (await acknowledge(e, "100.64.0.2"))[0] == 403
    fake.saw_caller("100.64.0.1")
    fake.saw_caller("100.64.0.2")
    status, answer = await promise(e, "100.64.0.1")
    assert status == 200 and answer["promised"]
    assert "100.64.0.1" not in fake.view["mode4_32"]
    assert (await acknowledge(e, "100.64.0.2"))[0] == 200
    await e.close()


async def test_an_acknowledgement_is_audited(tmp_path: Path) -> None:
    config = parse_config(f"state_dir: {tmp_path}/s\nsubscribers: {{source: {tmp_path}/l.yaml}}\n",
                          str(tmp_path / "c.yaml"))
    e = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack(), clock=lambda: NOW)  # type: ignore[arg-type]
    await e.engine.restore()
    await e.lists.on_list(ListUpdate([Subscriber("C-2", (parse_address("100.64.0.2"),), Mode.NOTICE, "overdue")],
                               "l.yaml", "1"))
    assert (await acknowledge(e, "100.64.0.2"))[0] == 200
    assert "notice acknowledged on the portal from 100.64.0.2" in e.queries.audit("C-2", None, 5)[-1]["cause"]
    await e.close()


async def test_the_portal_looks_up_only_its_callers(tmp_path: Path) -> None:
    """A compromised portal cannot enumerate who is restricted and why: its lookups (unlike an
    operator's) answer only for addresses the kernel saw connect to the portal."""
    config = parse_config(f"state_dir: {tmp_path}/s\nsubscribers: {{source: {tmp_path}/l.yaml}}\n",
                          str(tmp_path / "c.yaml"))
    fake = FakeDataplane(callers_seen_by_default=False)
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: NOW)  # type: ignore[arg-type]
    await e.engine.restore()
    await e.lists.on_list(ListUpdate([Subscriber("C-1", (parse_address("100.64.0.1"),), Mode.WALLED_GARDEN, "overdue")],
                               "l.yaml", "1"))
    status, answer = await portal_lookup(e, "100.64.0.1")
    assert status == 403 and "subscriber" not in answer
    fake.saw_caller("100.64.0.1")
    status, answer = await portal_lookup(e, "100.64.0.1")
    assert (status, answer["subscriber"], answer["restricted"]) == (200, "C-1", True)
    assert e.queries.lookup("100.64.0.7")["restricted"] is False          # operators (explain) are not bound
    await e.close()


async def test_an_acknowledgement_outlives_a_restart(tmp_path: Path) -> None:
    """The kernel keeps an acknowledgement (a timeout element) across a restart; the daemon
    must too, or the portal and /api/captive call the subscriber captive again while their HTTP
    passes (found in audit), and a table replace would not put it back."""
    config = parse_config(f"state_dir: {tmp_path}/s\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                          "portal: {notice_ack_for: 1h}\n", str(tmp_path / "c.yaml"))
    fake = FakeDataplane()
    now = [NOW]
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: now[0])  # type: ignore[arg-type]
    await e.engine.restore()
    await e.lists.on_list(ListUpdate([Subscriber("C-2", (parse_address("100.64.0.2"),), Mode.NOTICE, "overdue")],
                               "l.yaml", "1"))
    assert (await acknowledge(e, "100.64.0.2"))[0] == 200
    await e.close()
    now[0] += 600
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: now[0])  # type: ignore[arg-type]
    await e.engine.restore()
    status, answer = await portal_lookup(e, "100.64.0.2")
    assert status == 200 and answer["ack_until"] == NOW + 3600, answer
    await e.close()
    now[0] += 3600    # ended while the daemon was down: not brought back
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: now[0])  # type: ignore[arg-type]
    await e.engine.restore()
    status, answer = await portal_lookup(e, "100.64.0.2")
    assert status == 200 and answer["ack_until"] is None, answer
    await e.close()


async def test_after_a_reboot_a_saved_acknowledgement_goes_back_into_the_kernel(tmp_path: Path) -> None:
    """A reboot empties the kernel's acknowledgement sets while the state keeps them: the
    start puts them back (the table is new: ``on_replaced``), or the page would say
    "acknowledged" with no Continue while every request is redirected (review)."""
    config = parse_config(f"state_dir: {tmp_path}/s\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                          "portal: {notice_ack_for: 1h}\n", str(tmp_path / "c.yaml"))
    listed = [Subscriber("C-2", (parse_address("100.64.0.2"),), Mode.NOTICE, "overdue")]
    now = [NOW]
    e = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack(), clock=lambda: now[0])  # type: ignore[arg-type]
    await e.engine.restore()
    await e.lists.on_list(ListUpdate(listed, "l.yaml", "1"))
    assert (await acknowledge(e, "100.64.0.2"))[0] == 200
    await e.close()
    now[0] += 600
    rebooted = FakeDataplane()   # the table is gone
    e = Enforcer(config, dataplane=rebooted, conntrack=NoConntrack(), clock=lambda: now[0])  # type: ignore[arg-type]
    await e.engine.restore()
    status, answer = await portal_lookup(e, "100.64.0.2")
    assert status == 200 and answer["ack_until"] == NOW + 3600, answer
    assert "100.64.0.2" in rebooted.view["noticeack4_32"], rebooted.view
    await e.close()
