"""Who is restricted and why: ``decide`` and the input bookkeeping around it, with a fake clock."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer import policy
from enforcer.model import Mode
from enforcer.policy import Decision, Grace, Override, PolicyInputs, decide
from enforcer.subscribers import Subscriber

GRACE = 3 * 86400.0
T0 = 1_790_000_000.0  # a fixed "now"


def sub(sid: str = "C-1", mode: Mode = Mode.WALLED_GARDEN, *addresses: str) -> Subscriber:
    default = f"100.64.0.{sum(map(ord, sid)) % 250 + 1}"
    nets = tuple(ipaddress.ip_network(a) for a in (addresses or (default,)))
    return Subscriber(sid, nets, mode, "overdue")


def restrict(at: float, subscriber: Subscriber | None = None, cause: str = "event r") -> Override:
    return Override(True, at, cause, subscriber or sub())


def release(at: float, cause: str = "event l") -> Override:
    return Override(False, at, cause)


# -- decide: the table ----------------------------------------------------------------------

LISTED = sub("C-1", Mode.NOTICE, "100.64.0.10")
OVERRIDE_SUB = sub("C-1", Mode.THROTTLE, "100.64.0.99")


@pytest.mark.parametrize("listed, override, grace, now, mode, has_until", [
    # the list decides
    (LISTED, None, None, T0, Mode.NOTICE, False),
    (None, None, None, T0, Mode.FREE, False),
    # payment grace keeps a listed subscriber free until it ends
    (LISTED, None, Grace(T0 - 10, T0 + GRACE, "pay"), T0, Mode.FREE, True),
    (LISTED, None, Grace(T0 - 10, T0 + GRACE, "pay"), T0 + GRACE - 0.001, Mode.FREE, True),
    (LISTED, None, Grace(T0 - 10, T0 + GRACE, "pay"), T0 + GRACE, Mode.NOTICE, False),
    (LISTED, None, Grace(T0 - 10, T0 + GRACE, "pay"), T0 + GRACE + 1, Mode.NOTICE, False),
    (None, None, Grace(T0 - 10, T0 + GRACE, "pay"), T0, Mode.FREE, False),
    # an override newer than the payment wins
    (LISTED, restrict(T0 - 5, OVERRIDE_SUB), Grace(T0 - 10, T0 + GRACE, "pay"), T0, Mode.THROTTLE, False),
    (None, restrict(T0 - 5, OVERRIDE_SUB), Grace(T0 - 10, T0 + GRACE, "pay"), T0, Mode.THROTTLE, False),
    # an override older than the payment does not
    (LISTED, restrict(T0 - 20, OVERRIDE_SUB), Grace(T0 - 10, T0 + GRACE, "pay"), T0, Mode.FREE, True),
    # ... and once the grace is over, the list decides again, not the stale override
    (None, restrict(T0 - 20, OVERRIDE_SUB), Grace(T0 - 10, T0 + 5, "pay"), T0 + 10, Mode.FREE, False),
    # overrides beat the list
    (LISTED, release(T0 - 1), None, T0, Mode.FREE, False),
    (None, restrict(T0 - 1, OVERRIDE_SUB), None, T0, Mode.THROTTLE, False),
    (LISTED, restrict(T0 - 1, OVERRIDE_SUB), None, T0, Mode.THROTTLE, False),
    (LISTED, release(T0 - 5), Grace(T0 - 10, T0 + GRACE, "pay"), T0, Mode.FREE, False),
])
def test_decide_table(listed, override, grace, now, mode, has_until):
    d = decide("C-1", listed, override, grace, now)
    assert d.subscriber_id == "C-1"
    assert d.mode is mode
    assert d.restricted == (mode is not Mode.FREE)
    assert (d.until is not None) == has_until
    if has_until:
        assert d.until == grace.until
    if d.restricted:
        expected = override.subscriber if override is not None and override.at > (grace.paid_at if grace else -1) \
            else listed
        assert d.subscriber == expected
    else:
        assert d.subscriber is None


def test_decide_causes_explain_the_decision():
    assert decide("C-1", LISTED, None, None, T0).cause == "on the restricted list"
    assert decide("C-1", None, None, None, T0).cause == "not on the restricted list"
    assert decide("C-1", LISTED, release(T0, "operator alice"), None, T0).cause == "operator alice"
    assert decide("C-1", LISTED, None, Grace(T0, T0 + 1, "event e1"), T0).cause == "payment grace (event e1)"


def test_payment_grace_then_restricted_again_with_a_fake_clock():
    inputs = PolicyInputs(listed={"C-1": LISTED}, overrides={}, graces={})
    assert inputs.decide("C-1", T0).mode is Mode.NOTICE
    policy.record_payment(inputs, "C-1", T0, GRACE, "event pay-1")
    assert inputs.decide("C-1", T0).mode is Mode.FREE
    assert inputs.decide("C-1", T0 + GRACE / 2).mode is Mode.FREE
    assert inputs.next_change(T0) == T0 + GRACE
    assert inputs.decide("C-1", T0 + GRACE).mode is Mode.NOTICE
    assert policy.expire(inputs, T0 + GRACE) == {"C-1"}
    assert inputs.graces == {}
    assert inputs.decide("C-1", T0 + GRACE).mode is Mode.NOTICE


def test_restricted_override_after_payment_wins():
    inputs = PolicyInputs(listed={"C-1": LISTED}, overrides={}, graces={})
    policy.record_payment(inputs, "C-1", T0, GRACE, "event pay")
    policy.record_override(inputs, "C-1", restrict(T0 + 60, OVERRIDE_SUB))
    d = inputs.decide("C-1", T0 + 61)
    assert d.mode is Mode.THROTTLE and d.subscriber == OVERRIDE_SUB


def test_released_override_wins_over_list():
    inputs = PolicyInputs(listed={"C-1": LISTED}, overrides={"C-1": release(T0)}, graces={})
    assert inputs.decide("C-1", T0 + 1).mode is Mode.FREE
    assert inputs.decide_all(T0 + 1)["C-1"].mode is Mode.FREE


def test_decide_all_covers_every_known_id():
    inputs = PolicyInputs(listed={"A": sub("A")}, overrides={"B": restrict(T0, sub("B"))},
                          graces={"C": Grace(T0, T0 + 1, "p")})
    decisions = inputs.decide_all(T0)
    assert set(decisions) == {"A", "B", "C"} == inputs.known_ids()
    assert policy.restricted_ids(decisions.values()) == {"A", "B"}


# -- apply_list -----------------------------------------------------------------------------

def test_list_changes():
    a, b, c = sub("A"), sub("B"), sub("C")
    b2 = sub("B", Mode.NOTICE)
    assert policy.list_changes({"A": a, "B": b}, {"A": a, "B": b}) == set()
    assert policy.list_changes({"A": a, "B": b}, {"B": b2, "C": c}) == {"A", "B", "C"}


def test_apply_list_clears_overrides_only_for_changed_entries():
    a, b, c = sub("A"), sub("B"), sub("C")
    inputs = PolicyInputs(listed={"A": a, "B": b, "C": c},
                          overrides={"A": release(T0), "B": release(T0), "D": restrict(T0, sub("D"))},
                          graces={"B": Grace(T0, T0 + GRACE, "p")})
    changed = policy.apply_list(inputs, {"A": a, "B": sub("B", Mode.THROTTLE)})
    assert changed == {"B", "C"}
    assert set(inputs.overrides) == {"A", "D"}  # A unchanged, D not in either list
    assert inputs.listed == {"A": a, "B": sub("B", Mode.THROTTLE)}
    assert set(inputs.graces) == {"B"}  # graces are not the list's business
    # A still released by its override, B now follows the new list but is in grace
    assert inputs.decide("A", T0 + 1).mode is Mode.FREE
    assert inputs.decide("B", T0 + 1).mode is Mode.FREE
    assert inputs.decide("B", T0 + GRACE).mode is Mode.THROTTLE


def test_apply_list_copies_the_mapping():
    new = {"A": sub("A")}
    inputs = PolicyInputs({}, {}, {})
    policy.apply_list(inputs, new)
    new.clear()
    assert set(inputs.listed) == {"A"}


def test_apply_list_removing_a_subscriber_drops_its_override():
    inputs = PolicyInputs(listed={"A": sub("A")}, overrides={"A": restrict(T0, sub("A"))}, graces={})
    assert policy.apply_list(inputs, {}) == {"A"}
    assert inputs.overrides == {}
    assert inputs.decide("A", T0).mode is Mode.FREE


# -- record_payment / expire / next_change --------------------------------------------------

def test_record_payment_drops_older_overrides_keeps_newer():
    inputs = PolicyInputs(listed={}, overrides={"A": restrict(T0 - 1), "B": restrict(T0), "C": restrict(T0 + 1)},
                          graces={})
    for sid in "ABC":
        policy.record_payment(inputs, sid, T0, GRACE, "pay")
    assert set(inputs.overrides) == {"C"}
    assert inputs.graces["A"] == Grace(T0, T0 + GRACE, "pay")


def test_record_payment_never_shortens_an_existing_grace():
    inputs = PolicyInputs(listed={}, overrides={}, graces={})
    policy.record_payment(inputs, "A", T0, 10 * GRACE, "long")
    policy.record_payment(inputs, "A", T0 + 5, GRACE, "short")
    assert inputs.graces["A"].until == T0 + 10 * GRACE
    policy.record_payment(inputs, "A", T0 + 9 * GRACE, 2 * GRACE, "later")
    assert inputs.graces["A"].until == T0 + 11 * GRACE


def test_record_payment_grace_runs_from_when_we_learnt_of_it():
    """A webhook retried for hours still lifts: the grace counts from receipt, not from payment."""
    inputs = PolicyInputs(listed={"C-1": LISTED}, overrides={}, graces={})
    policy.record_payment(inputs, "C-1", T0, GRACE, "event pay", received_at=T0 + 7200)
    assert inputs.graces["C-1"] == Grace(T0, T0 + 7200 + GRACE, "event pay")
    assert inputs.decide("C-1", T0 + 7200 + GRACE - 1).mode is Mode.FREE
    # a receipt time before the payment (clock skew) never shortens the grace
    policy.record_payment(inputs, "C-2", T0, GRACE, "event pay", received_at=T0 - 60)
    assert inputs.graces["C-2"].until == T0 + GRACE


def test_expire_only_ended_graces():
    inputs = PolicyInputs(listed={}, overrides={},
                          graces={"A": Grace(T0, T0 + 10, "p"), "B": Grace(T0, T0 + 20, "p")})
    assert policy.expire(inputs, T0 + 9) == set()
    assert policy.expire(inputs, T0 + 10) == {"A"}
    assert set(inputs.graces) == {"B"}
    assert policy.expire(inputs, T0 + 100) == {"B"}
    assert inputs.graces == {}


def test_next_change():
    inputs = PolicyInputs(listed={}, overrides={}, graces={})
    assert inputs.next_change(T0) is None
    inputs.graces = {"A": Grace(T0, T0 + 30, "p"), "B": Grace(T0, T0 + 10, "p"), "C": Grace(T0 - 9, T0 - 1, "p")}
    assert inputs.next_change(T0) == T0 + 10
    assert inputs.next_change(T0 + 10) == T0 + 30
    assert inputs.next_change(T0 + 30) is None


def test_decision_restricted_property():
    assert not Decision("x", Mode.FREE, "c").restricted
    assert all(Decision("x", m, "c").restricted for m in Mode.restricting())


# -- properties -----------------------------------------------------------------------------

IDS = st.sampled_from(["A", "B", "C", "D", "E"])
TIMES = st.floats(min_value=0, max_value=1e6, allow_nan=False)
DURATIONS = st.floats(min_value=0, max_value=1e6, allow_nan=False)
MODES = st.sampled_from(list(Mode.restricting()))
# Strategies are built once at import: building them inside @composite draws is slow.
SUBSCRIBERS = st.builds(lambda sid, host, mode: Subscriber(sid, (ipaddress.ip_network(f"100.64.0.{host}"),), mode),
                        IDS, st.integers(1, 254), MODES)
OVERRIDES = st.one_of(
    st.builds(lambda at, s: Override(True, at, "event r", s), TIMES, SUBSCRIBERS),
    st.builds(lambda at: Override(False, at, "event l"), TIMES),
)
GRACES = st.builds(lambda paid, length: Grace(paid, paid + length, "pay"), TIMES, DURATIONS)


def _inputs(listed: dict, overrides: dict, graces: dict) -> PolicyInputs:
    return PolicyInputs(listed={sid: replace(s, id=sid) for sid, s in listed.items()},
                        overrides=overrides, graces=graces)


INPUTS = st.builds(_inputs, st.dictionaries(IDS, SUBSCRIBERS), st.dictionaries(IDS, OVERRIDES),
                   st.dictionaries(IDS, GRACES))
PROPERTY = settings(max_examples=40, deadline=None)


@PROPERTY
@given(INPUTS, IDS, TIMES)
def test_property_absent_without_override_or_grace_is_free(inputs, sid, now):
    inputs.listed.pop(sid, None)
    inputs.overrides.pop(sid, None)
    inputs.graces.pop(sid, None)
    d = inputs.decide(sid, now)
    assert d.mode is Mode.FREE and not d.restricted and d.subscriber is None


@PROPERTY
@given(st.one_of(st.none(), SUBSCRIBERS.map(lambda s: replace(s, id="A"))), st.one_of(st.none(), OVERRIDES), GRACES,
       st.data())
def test_property_active_grace_without_newer_override_is_free(listed, override, grace, data):
    if grace.until <= grace.paid_at:
        return
    now = data.draw(st.floats(min_value=grace.paid_at, max_value=grace.until, exclude_max=True))
    if override is not None and override.at >= grace.paid_at:
        override = None  # only overrides strictly older than the payment
    d = decide("A", listed, override, grace, now)
    assert d.mode is Mode.FREE


@PROPERTY
@given(INPUTS, TIMES)
def test_property_restricted_only_if_listed_or_restricted_by_override(inputs, now):
    restricted = policy.restricted_ids(inputs.decide_all(now).values())
    allowed = set(inputs.listed) | {sid for sid, o in inputs.overrides.items() if o.restrict}
    assert restricted <= allowed


@PROPERTY
@given(INPUTS, TIMES)
def test_property_restricted_decisions_say_what_to_enforce(inputs, now):
    for sid, d in inputs.decide_all(now).items():
        assert d.subscriber_id == sid
        if d.restricted:
            assert d.subscriber is not None and d.subscriber.mode is d.mode
        else:
            assert d.subscriber is None


@PROPERTY
@given(INPUTS, IDS, TIMES, st.floats(min_value=1, max_value=1e6))
def test_property_record_payment_frees_at_once_and_never_shortens(inputs, sid, paid_at, grace_seconds):
    previous = inputs.graces.get(sid)
    policy.record_payment(inputs, sid, paid_at, grace_seconds, "pay")
    grace = inputs.graces[sid]
    assert grace.until >= paid_at + grace_seconds
    if previous is not None:
        assert grace.until >= previous.until
    override = inputs.overrides.get(sid)
    assert override is None or override.at > paid_at
    if grace_seconds > 0 and override is None:
        assert inputs.decide(sid, paid_at).mode is Mode.FREE


@PROPERTY
@given(INPUTS, TIMES)
def test_property_expire_then_decide_unchanged(inputs, now):
    """Dropping ended graces changes no decision about the present (it is bookkeeping only).

    Inputs are shaped as ``record_payment`` leaves them: no override at or before its payment.
    """
    for sid, grace in inputs.graces.items():
        if sid in inputs.overrides and inputs.overrides[sid].at <= grace.paid_at:
            del inputs.overrides[sid]
    before = inputs.decide_all(now)
    policy.expire(inputs, now)
    after = {sid: inputs.decide(sid, now) for sid in before}
    for sid in before:
        assert after[sid].mode is before[sid].mode


@pytest.mark.parametrize("override", [release(T0), restrict(T0, OVERRIDE_SUB)])
def test_expire_does_not_change_a_decision_for_a_same_second_override(override):
    inputs = PolicyInputs(listed={"C-1": LISTED}, overrides={}, graces={})
    policy.record_payment(inputs, "C-1", T0, 60, "event pay")
    policy.record_override(inputs, "C-1", override)  # same timestamp, processed after the payment
    later = T0 + 120
    before = inputs.decide("C-1", later)
    policy.expire(inputs, later)
    assert inputs.decide("C-1", later).mode is before.mode


# -- the bulk paths decide exactly as one subscriber at a time --------------------------------------

def _entry(i: int, mode: Mode, exempt_until: float | None) -> Subscriber:
    return Subscriber(f"S-{i}", (ipaddress.ip_network(f"100.64.1.{i}/32"),), mode, "overdue", exempt_until,
                      "dispute" if exempt_until else "")


_PEOPLE = st.lists(st.tuples(
    st.sampled_from(["none", "walled-garden", "notice", "throttle"]),    # the list's entry
    st.sampled_from([None, 50.0, 500.0]),                                # its exempt_until
    st.sampled_from(["none", "restrict", "lift"]),                       # an override
    st.booleans(), st.booleans(), st.booleans(), st.booleans(),          # grace, readdress, exemption, promise
    st.sampled_from(["none", "listed", "other"]),                        # what the kernel enforces
), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(_PEOPLE, st.booleans(), st.booleans(), st.sampled_from([100.0, 1000.0]))
def test_decide_all_and_preview_list_are_decide_one_by_one(people: list, ladder: bool, closed: bool,
                                                            now: float) -> None:
    from enforcer.exemptions import Exemption
    from enforcer.model import EscalationStep
    from enforcer.promises import Promise
    from enforcer.windows import Windows

    inputs = PolicyInputs({}, {}, {})
    enforced: dict[str, Decision] = {}
    new: dict[str, Subscriber] = {}
    for i, (mode, exempt, override, grace, moved, exempted, promised, kernel) in enumerate(people):
        sid = f"S-{i}"
        entry = None if mode == "none" else _entry(i, Mode(mode), exempt)
        if entry is not None:
            inputs.listed[sid] = entry
            inputs.listed_since[sid] = 10.0
        if override != "none":
            inputs.overrides[sid] = Override(override == "restrict", 20.0, "event e", _entry(i, Mode.NOTICE, None)
                                             if override == "restrict" else None)
        if grace:
            inputs.graces[sid] = Grace(30.0, 400.0, "event p")
        if moved:
            inputs.readdressed[sid] = policy.Readdress((ipaddress.ip_network(f"100.64.2.{i}/32"),), 5.0, "event m")
        if exempted:
            inputs.exemptions[sid] = {"dispute": Exemption("dispute", 300.0, "", "operator a", 1.0)}
        if promised:
            inputs.promises[sid] = [Promise(sid, 1.0, 600.0)]
        if kernel == "listed" and entry is not None:
            enforced[sid] = Decision(sid, entry.mode, policy.LISTED, entry)
        elif kernel == "other":
            enforced[sid] = Decision(sid, Mode.THROTTLE, "enforced before the restart", _entry(i, Mode.THROTTLE, None))
        if i % 3:
            new[sid] = _entry(i, Mode.WALLED_GARDEN if i % 2 else Mode.NOTICE, exempt)
    new["S-new"] = _entry(99, Mode.WALLED_GARDEN, None)
    windows = Windows(hours=((0, 1),), configured=True) if closed else Windows.always()
    inputs.rules = policy.Rules(windows, (EscalationStep(50.0, Mode.WALLED_GARDEN),) if ladder else ())
    one_by_one = {sid: inputs.decide(sid, now, enforced.get(sid)) for sid in inputs.known_ids() | set(enforced)}
    assert inputs.decide_all(now, enforced) == one_by_one

    def preview_one_by_one() -> tuple[int, int]:
        restricting = lifting = 0
        for sid in policy.list_changes(inputs.listed, new):
            before = inputs.decide(sid, now).restricted
            exemptions = inputs.exemptions.get(sid)
            after = decide(sid, new.get(sid), None, inputs.graces.get(sid), now,
                           exemptions=exemptions.values() if exemptions else (),
                           promise=inputs.promise(sid)).restricted
            if after and not before:
                restricting += policy.weight(new.get(sid))
            if before and not after:
                lifting += policy.weight(inputs.listed.get(sid) or new.get(sid))
        return restricting, lifting

    assert policy.preview_list(inputs, new, now) == preview_one_by_one()


def test_what_ended_is_seen_until_expire_drops_it():
    """``ended_unexpired`` makes the timer run at once; ``expire`` must clear exactly what it
    sees, or the timer would spin."""
    from enforcer.exemptions import Exemption
    from enforcer.promises import Promise
    inputs = PolicyInputs(listed={}, overrides={}, graces={"A": Grace(T0 - 20, T0 - 1, "p")})
    inputs.exemptions = {"B": {"outage": Exemption("outage", T0 - 1, "", "noc", T0 - 60)}}
    inputs.promises = {"C": [Promise("C", T0 - 60, T0 - 1)]}
    for sid in ("A", "B", "C"):
        alone = PolicyInputs(listed={}, overrides={}, graces={k: v for k, v in inputs.graces.items() if k == sid})
        alone.exemptions = {k: v for k, v in inputs.exemptions.items() if k == sid}
        alone.promises = {k: v for k, v in inputs.promises.items() if k == sid}
        assert alone.ended_unexpired(T0), sid
        assert policy.expire(alone, T0) == {sid}
        assert not alone.ended_unexpired(T0), sid
    assert not PolicyInputs(listed={}, overrides={}, graces={"D": Grace(T0, T0 + 5, "p")}).ended_unexpired(T0)
