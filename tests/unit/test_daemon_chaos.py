"""The model-based chaos test over the fake dataplane (docs/reference.md, Safety rules): see
``chaos_model``.

Deterministic in CI (``derandomize``) and bounded (< 60 s); ``WG_CHAOS_EXAMPLES=2000`` runs
longer by hand, e.g. ``WG_CHAOS_EXAMPLES=2000 pytest tests/unit/test_daemon_chaos.py``, with
random examples each time (a fixed seed would replay CI's sequences, only more of them).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings

from chaos_model import ChaosMachine, machine_settings
from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.state import TableState


class FakeBackend:
    """The fake kernel: a reboot is a fresh one, another tool's ``nft delete table`` is ``drop_table``."""

    def make(self) -> FakeDataplane:
        return FakeDataplane()

    def read(self, dataplane: FakeDataplane) -> TableState | None:
        return dataplane.read()

    def drop_table(self, dataplane: FakeDataplane) -> None:
        dataplane.drop_table()

    def fail_next(self, dataplane: FakeDataplane, message: str) -> None:
        dataplane.fail_next = message


class FakeChaos(ChaosMachine):
    backend = FakeBackend()

    @staticmethod
    def tmp_factory() -> Path:
        return Path(tempfile.mkdtemp(prefix="wg-chaos-"))


FakeChaos.TestCase.settings = settings(
    max_examples=machine_settings()["max_examples"] or 60, stateful_step_count=30, deadline=None,
    derandomize=not machine_settings()["max_examples"], database=None, suppress_health_check=list(HealthCheck),
    print_blob=True,
    phases=[p for p in Phase if machine_settings()["shrink"] or p is not Phase.shrink])
test_chaos_on_the_fake_dataplane: Any = FakeChaos.TestCase


# -- hard cases as fixed sequences ---------------------------------------------------------------
# Each drives the same machine by hand, with the machine's tolerance for that case switched off.

import pytest  # noqa: E402

import chaos_model  # noqa: E402
from enforcer.events import PAYMENT, RELEASED, RESTRICTED, Event  # noqa: E402
from enforcer.subscribers import Mode, parse_list  # noqa: E402


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Any:
    m = FakeChaos()
    yield m
    m.teardown()


def restriction(sid: str, ts: float, eid: str, moved_to: str | None = None) -> Event:
    raw = {"id": sid, "addresses": chaos_model.addresses(sid, moved_to), "mode": "walled-garden"}
    return Event(eid, RESTRICTED, ts, sid, parse_list(chaos_model.json.dumps({"subscribers": [raw]}), "event")[0])


def test_a_batch_that_cannot_be_saved_is_undone_in_the_kernel(machine: Any) -> None:
    """An operator's (or billing's) restriction whose ``record_state`` fails after the kernel
    commit is answered 503 and is undone in the kernel and in memory: the kernel keeps matching
    the persisted inputs, so a restart cannot silently lift a restriction nobody saved."""
    machine.boot(listed=[])
    machine.store_failure(op="record_state")
    machine.operator(sid="C-4", restrict=True, mode=Mode.WALLED_GARDEN)
    assert "C-4" in machine.unsaved                   # answered 503 "state could not be saved"
    machine.kernel_matches_persisted_policy()


def test_a_retry_of_an_answered_payment_is_not_applied_again(machine: Any) -> None:
    """When the write recording a batch's answers (``record_events``, a write of its own after
    the state's) fails, or the process dies between the two writes, a later retry of that payment
    is answered from the record (or the first answer is not 200): it is not applied again with a
    new receipt instant, and a restriction billing stamped *after* the payment stays."""
    machine.boot(listed=[])
    t = chaos_model.START
    machine.store_failure(op="record_events")
    payment = Event("p1", PAYMENT, t, "C-1")
    first = machine.run(machine.deliver(payment))
    later = machine.run(machine.deliver(restriction("C-1", t + 60, "r2")))
    assert later[1]["mode"] == "walled-garden"
    again = machine.run(machine.deliver(payment))    # billing retries p1 (e.g. it never saw the 200)
    if first[0] == 200:
        assert again == first, f"the retry was applied again: {again}"
    assert any(k[1] == "100.64.0.1" for k in chaos_model.kernel_modes(machine.dataplane.read())), \
        f"the retry lifted the newer restriction; answers: {first} / {later} / {again}"


def test_a_list_entry_on_an_address_an_override_holds_is_reported(machine: Any) -> None:
    """Billing restricts C-3 on the address 100.64.0.2 (200 applied); a new list then names
    C-2 on 100.64.0.2. As for the timer's conflicts, C-3 keeps what is enforced (its IPv6 /64
    too), and C-2's claim is held back and reported in ``status()["address_conflicts"]``: the
    clash never silently frees the holder."""
    machine.boot(listed=["C-3"])
    answer = machine.run(machine.deliver(restriction("C-3", chaos_model.START, "r1", moved_to="C-2")))
    assert (answer[0], answer[1]["result"]) == (200, "applied")
    machine.entries = {"C-2": (Mode.WALLED_GARDEN, None), "C-3": (Mode.WALLED_GARDEN, None)}
    machine.source_text = chaos_model.list_text(machine.entries)
    machine.run(machine.deliver_source())
    kernel = chaos_model.kernel_modes(machine.dataplane.read())
    assert ("mode6_64", "2001:db8:0:3::") in kernel, f"C-3 lost its restriction: {kernel}"
    assert machine.e.queries.status()["address_conflicts"], "the clash is not reported"


def test_a_state_write_failure_on_a_clock_step_does_not_leave_the_list_unapplied(machine: Any) -> None:
    """The first input after a forward clock step saves the moved graces
    (``save_subscribers``). When that write fails during a list update, the kernel still matches
    the persisted policy: a listed subscriber is not left free until some later full sync, and
    the payer's moved grace is not lost to a restart."""
    machine.boot(listed=[])
    machine.run(machine.deliver(Event("p1", PAYMENT, chaos_model.START, "C-1")))
    machine.clock_step(seconds=3600.0)
    machine.store_failure(op="save_subscribers")
    machine.edit_list(edits=[("C-2", Mode.WALLED_GARDEN, None)])
    machine.kernel_matches_persisted_policy()


def test_an_event_is_not_judged_stale_by_a_sibling_that_failed(machine: Any, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """One batch holds C-4's release (billing ts +270) and an older restriction (ts -75); the
    kernel transaction fails, so the release is undone and answered 503. The restriction is not
    judged stale against a release that is not in force: it gets 503 with its batch, or a
    recorded verdict that its retry gets again."""
    machine.boot(listed=[])
    machine.kernel_failure()
    machine.burst(kinds=[RELEASED, RESTRICTED], sid="C-4", skews=[270, -75, 0, 0])
    first = machine.sent[-1].answers[0]
    assert first[0] == 503 or machine.e.engine.store.event_answer(machine.sent[-1].event.id) == first[1], \
        f"answered {first} for an event judged stale by a sibling that failed: {machine.sent[-2].answers}"


def test_a_lease_change_that_cannot_be_saved_leaves_nothing_and_one_that_returned_survives_sigkill(
        machine: Any) -> None:
    """A dnsmasq lease file read while SQLite fails raises ``SessionChangeFailed`` and leaves the
    book and the kernel as they were; read again, it returns, and after a SIGKILL the restarted
    daemon holds that lease and walls its address for the restricted MAC-only subscriber."""
    machine.boot(listed=["C-4"])
    machine.store_failure(op="record_state")
    lease = [("100.64.1.1", chaos_model.mac_of("C-4"), None)]
    machine.lease_file(leases=lease, complete=True)
    assert not machine.sessions, "a change that raised was recorded"
    machine.lease_file(leases=lease, complete=True)
    assert list(machine.sessions) == [("dnsmasq", "100.64.1.1")]
    machine.restart(how="kill", down=5.0)
    machine.sessions_are_durable_exactly_when_answered()
    machine.session_addresses_follow_the_newest_session()
    assert ("mode4_32", "100.64.1.1") in chaos_model.kernel_modes(machine.dataplane.read())


def test_an_address_handed_to_a_paying_mac_is_freed(machine: Any) -> None:
    """C-4's address goes to a MAC on no list by a RADIUS Start while C-4's lease lingers: the
    newer session holds it, so it is free."""
    machine.boot(listed=["C-4"])
    machine.lease_file(leases=[("100.64.1.2", chaos_model.mac_of("C-4"), None)], complete=True)
    machine.radius(start=True, n=1, mac=chaos_model.PAYING_MACS[0], nets=["100.64.1.2"], life=None)
    machine.kernel_matches_persisted_policy()
    machine.session_addresses_follow_the_newest_session()
    assert ("mode4_32", "100.64.1.2") not in chaos_model.kernel_modes(machine.dataplane.read())


@pytest.mark.parametrize("how", ["radius", "event"])
@pytest.mark.parametrize(("gainer", "loser"), [("C-3", "C-4"), ("C-4", "C-3")])
def test_a_session_change_that_cannot_be_saved_gives_the_taken_address_back(machine: Any, how: str, gainer: str,
                                                                             loser: str) -> None:
    """Restricted ``loser`` holds 100.64.1.3 by a webhook session; a RADIUS Start (or a webhook
    ``session.started``) gives it to restricted ``gainer``, and its ``record_state`` fails: the
    change is answered failed, so the undo must give the address back to ``loser``. The undo
    decided both again and applied them in a set's order: with ``loser``'s claim before
    ``gainer``'s release, the claim met the address still held, ``loser`` was left in
    ``conflicts`` and 100.64.1.3 free after a change answered failed (and the forward change
    alike: ``gainer`` in ``conflicts``, the address free until the timer's retry). Both
    directions run, so every set order meets the case."""
    machine.boot(listed=["C-3", "C-4"])
    machine.session_event(start=True, mac=None, sid=loser, nets=["100.64.1.3"])
    assert ("mode4_32", "100.64.1.3") in chaos_model.kernel_modes(machine.dataplane.read())
    machine.store_failure(op="record_state")
    if how == "radius":   # change_sessions asserts the failed change left book and address as they were
        machine.radius(start=True, n=1, mac=chaos_model.mac_of(gainer), nets=["100.64.1.3"], life=None)
    else:
        machine.session_event(start=True, mac=None, sid=gainer, nets=["100.64.1.3"], skew=90)
    assert not machine.sessions.get((chaos_model.RADIUS, "nas1/1")), "a change that raised was recorded"
    assert not machine.e.engine.conflicts, machine.e.engine.conflicts
    machine.kernel_matches_persisted_policy()
    machine.session_addresses_follow_the_newest_session()
    assert machine.e.engine.reconciler.owner_of("mode4_32", "100.64.1.3") == loser


def test_an_exemption_found_ended_at_a_start_is_expired_before_a_step_back(machine: Any) -> None:
    """An operator's exemption ends while the daemon is down (here killed mid-change, after the
    wall clock stepped forward past its end). The restart decides the subscriber restricted; the
    ended exemption must then be dropped and saved at once (the timer's first round), not at
    some later round: a clock step back in between made it look running again, in memory and on
    disk, while the kernel held the restriction (found by the chaos model, 1,500 examples)."""
    machine.boot(listed=["C-1"])
    machine.exemption(end=False, seconds=60.0, sid="C-1")
    machine.clock_step(seconds=120.0)
    machine.kill_mid_session(leases=[("100.64.1.1", "02:00:00:00:00:03")])
    machine.clock_step(seconds=-600.0)
    machine.kernel_matches_persisted_policy()


def test_a_step_after_a_reboot_is_seen_by_a_restart_on_the_same_boot(machine: Any) -> None:
    """C-1 pays; the gateway reboots (a new boot: the monotonic clock starts over); the wall
    clock steps +3600 s; the daemon restarts on that boot. The start after the reboot must save
    this boot's clock anchor at once, or the restart cannot tell the step from time gone by and
    the grace ends early (found by the chaos model after start-up stopped taking up steps inside
    its full sync)."""
    machine.boot(listed=["C-1"])
    machine.burst(kinds=["payment.received", "payment.received"], sid="C-1", skews=[0, 0, 0, 0])
    machine.restart(down=0.0, how="reboot")
    machine.clock_step(seconds=3600.0)
    machine.restart(down=0.0, how="close")
    machine.payments_keep_subscribers_free()
