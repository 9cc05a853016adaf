"""The table's structure (SPEC 7, fault-injection audit): a rule deleted or the table made
``dormant`` by hand frees every restricted subscriber while every element, sentinel and mark is
still there. The periodic check and every start (the one that trusts the digest mark included)
compare the structure with what our own install left, and one atomic replace repairs it.

On the fake: ``FakeDataplane(predicts_structure=False)`` behaves as nftables (the structure is
known only by reading it after our install, and marked on the table for a restart), the default
one as the ipset backend (known from the render). ``test_structure_conformance.py`` holds the
kernels to the same behaviour; ``tests/kernel/test_structure_repair.py`` sends the traffic.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_reconciler import BASE, TABLE, free, restricted

from daemon_helpers import NoConntrack
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.layout import TAG_SET, tag_address
from enforcer.dataplane.state import STRUCTURE_COMMENT, Structure, describe, fingerprint, marked_fingerprint
from enforcer.dataplane.transaction import MarkStructure, ReplaceTable, Transaction
from enforcer.metrics import Metrics
from enforcer.reconciler import Reconciler, probe, structure_problem
from enforcer.table_health import TableHealth

DECISIONS = {"A": restricted("A", "100.64.0.1"), "B": restricted("B", "100.64.0.2"), "C": free("C")}


def learning() -> FakeDataplane:
    """A fake that, like nftables, knows a table's structure only by reading it."""
    return FakeDataplane(TABLE, predicts_structure=False)


def started(fake: FakeDataplane) -> Reconciler:
    rec = Reconciler(fake, BASE)
    rec.sync_all(DECISIONS, read_kernel=True)
    return rec


def walled(fake: FakeDataplane) -> set[str]:
    return set(fake.view.get("mode4_32", {}))


# -- what our install leaves ----------------------------------------------------------------------

def test_the_first_install_reads_its_structure_back_and_marks_it_on_the_table() -> None:
    fake = learning()
    rec = started(fake)
    replace, mark = fake.transactions
    assert isinstance(replace.operations[0], ReplaceTable)
    assert [op for op in mark.operations if isinstance(op, MarkStructure)] == [MarkStructure(BASE.tag,
                                                                                             rec.structure.fingerprint)]
    now = fake.structure(BASE)
    assert now is not None and rec.structure.fingerprint == now.fingerprint == now.marked
    assert rec.structure_epoch % 2 == 0 and rec.structure_epoch > 0
    assert probe(fake, BASE, rec.structure) == "" and rec.check_kernel(full=True) == ""


def test_a_layout_installed_before_is_marked_in_its_own_replace() -> None:
    """The fingerprint our earlier install of the same layout had is written with the replace:
    one transaction, as before this check existed."""
    fake = learning()
    rec = started(fake)
    fake.drop_table()
    fake.transactions.clear()
    rec.needs_full = True
    rec.sync_all(DECISIONS, read_kernel=True)
    (tx,) = fake.transactions
    assert isinstance(tx.operations[0], ReplaceTable) and MarkStructure(BASE.tag, rec.structure.fingerprint) in \
        tx.operations
    assert 'comment "walled-garden structure ' in tx.render()


def test_a_backend_that_knows_the_structure_from_the_render_writes_no_mark() -> None:
    fake = FakeDataplane(TABLE)   # as the ipset backend
    rec = started(fake)
    (tx,) = fake.transactions
    assert not any(isinstance(op, MarkStructure) for op in tx.operations)
    assert rec.structure is not None and rec.structure.fingerprint == fake.expected_structure(BASE)
    assert fake.structure(BASE).marked == ""


def test_element_diffs_leave_the_structure_alone() -> None:
    fake = learning()
    rec = started(fake)
    reference = rec.structure
    rec.update({"C": restricted("C", "100.64.0.3")})
    rec.set_host_allow(["203.0.113.7"])
    rec.acknowledge(restricted("B", "100.64.0.2"), 60)
    assert fake.structure(BASE).fingerprint == reference.fingerprint
    assert probe(fake, BASE, reference) == ""


# -- the periodic check -------------------------------------------------------------------------------

@pytest.mark.parametrize("predicts", [False, True])
@pytest.mark.parametrize("damage, said", [("delete_rule", "chain forward: 1 rule(s) instead of 2"),
                                          ("make_dormant", "table made dormant")])
def test_the_check_sees_a_deleted_rule_or_a_dormant_table_and_a_replace_repairs_it(
        damage: str, said: str, predicts: bool) -> None:
    fake = FakeDataplane(TABLE, predicts_structure=predicts)
    rec = started(fake)
    getattr(fake, damage)()
    assert fake.holds_layout(BASE.tag, BASE.containers()), "every element, sentinel and tag still there"
    problem = probe(fake, BASE, rec.structure)
    assert problem.startswith("structure changed: ") and said in problem, problem
    assert rec.check_kernel() == problem and rec.needs_full
    fake.transactions.clear()
    result = rec.sync_all(DECISIONS, read_kernel=True)   # the timer's repair
    assert result.kind == "full" and isinstance(fake.transactions[0].operations[0], ReplaceTable)
    assert not fake.dormant and walled(fake) == {"100.64.0.1", "100.64.0.2"}
    assert probe(fake, BASE, rec.structure) == "" and rec.check_kernel(full=True) == ""
    assert len(fake.transactions) == 1, "the layout's fingerprint was known: marked in the replace itself"


def test_the_full_check_compares_the_structure_too() -> None:
    fake = learning()
    rec = started(fake)
    fake.delete_rule("input")
    assert "chain input: 1 rule(s) instead of 2" in rec.check_kernel(full=True)


def test_no_reference_no_comparison() -> None:
    fake = learning()
    started(fake)
    fake.delete_rule()
    assert structure_problem(fake, BASE, None) == ""
    assert structure_problem(fake, BASE, Structure("")) == ""


# -- the start --------------------------------------------------------------------------------------

def test_a_start_that_trusts_the_digest_mark_still_compares_the_structure(caplog: pytest.LogCaptureFixture) -> None:
    """A rule deleted at the generation the mark names (a hand-edited ruleset dump restored after
    a reboot): the digest mark proves the elements, the structure mark does not match: replaced
    at the start, logged as ``table_lost check=start`` and kept for ``TableHealth`` to count."""
    fake = learning()
    started(fake)
    generation = fake.generation()
    fake.delete_rule()
    fake.generation_id = generation   # as if nothing was committed since
    rec = Reconciler(fake, BASE)
    fake.transactions.clear()
    with caplog.at_level(logging.INFO):
        result = rec.sync_all(DECISIONS, read_kernel=True)
    assert "event=kernel_trusted" in caplog.text, "the digest mark was trusted: elements not read back"
    assert result.kind == "full" and isinstance(fake.transactions[0].operations[0], ReplaceTable)
    assert "event=table_lost" in caplog.text and "check=start" in caplog.text
    # a new process knows only the fingerprint the table was marked with: it says so
    (repaired,) = rec.take_repaired()
    assert repaired.startswith("structure changed: fingerprint ") and "rules, chains, sets or flags changed" in repaired
    assert rec.take_repaired() == [], "counted once"
    assert fake.structure(BASE).fingerprint == rec.structure.fingerprint and walled(fake) == {"100.64.0.1",
                                                                                               "100.64.0.2"}


def test_a_start_after_a_dormant_flag_reads_back_and_replaces(caplog: pytest.LogCaptureFixture) -> None:
    fake = learning()
    started(fake)
    fake.make_dormant()
    rec = Reconciler(fake, BASE)
    with caplog.at_level(logging.INFO):
        assert rec.sync_all(DECISIONS, read_kernel=True).kind == "full"
    assert "event=kernel_trusted" not in caplog.text
    assert rec.take_repaired() == ["structure changed: table made dormant (no hook of it sees a packet)"]
    assert not fake.dormant


def test_a_start_over_an_untouched_table_is_a_diff_and_keeps_the_reference() -> None:
    fake = learning()
    first = started(fake)
    for read_back in (False, True):
        if read_back:
            fake.add_element("allowhost4", "203.0.113.9")   # someone's commit: the mark is not trusted
        rec = Reconciler(fake, BASE)
        fake.transactions.clear()
        result = rec.sync_all(DECISIONS, read_kernel=True)
        assert result.kind == "partial" and rec.take_repaired() == []
        assert rec.structure is not None and rec.structure.fingerprint == first.structure.fingerprint
        assert not any(isinstance(op, (ReplaceTable, MarkStructure)) for tx in fake.transactions
                       for op in tx.operations)


def test_a_table_without_a_structure_mark_is_replaced_once(caplog: pytest.LogCaptureFixture) -> None:
    """A table an earlier release made carries no mark: nothing says its structure is ours."""
    fake = learning()
    started(fake)
    fake.structure_comment = None
    rec = Reconciler(fake, BASE)
    with caplog.at_level(logging.WARNING):
        assert rec.sync_all(DECISIONS, read_kernel=True).kind == "full"
    assert "event=table_structure_unknown" in caplog.text and "event=table_lost" not in caplog.text
    assert rec.take_repaired() == [], "not a repair: an upgrade"
    rec = Reconciler(fake, BASE)
    assert rec.sync_all(DECISIONS, read_kernel=True).kind == "partial", "marked now"


def test_a_start_compares_with_the_render_when_the_backend_knows_it() -> None:
    fake = FakeDataplane(TABLE)
    started(fake)
    fake.delete_rule("garden")
    rec = Reconciler(fake, BASE)
    assert rec.sync_all(DECISIONS, read_kernel=True).kind == "full"
    (repaired,) = rec.take_repaired()
    assert f"instead of {fake.expected_structure(BASE)}" in repaired


def test_a_failed_replace_keeps_the_reference_and_the_epoch_even() -> None:
    fake = learning()
    rec = started(fake)
    reference, epoch = rec.structure, rec.structure_epoch
    fake.delete_rule()
    fake.fail_next = "refused"
    with pytest.raises(Exception, match="refused"):
        rec.sync_all(DECISIONS, read_kernel=True)
    assert rec.structure is reference and rec.structure_epoch % 2 == 0 and rec.structure_epoch > epoch
    assert rec.needs_full
    rec.sync_all(DECISIONS, read_kernel=True)
    assert probe(fake, BASE, rec.structure) == ""


class FailingMark(FakeDataplane):
    """Refuses the first transaction that marks the structure (and only the mark: the install is in)."""

    def __init__(self) -> None:
        super().__init__(TABLE, predicts_structure=False)
        self.refuse_mark = True

    def apply(self, tx: Transaction) -> None:
        if self.refuse_mark and not any(isinstance(op, ReplaceTable) for op in tx.operations) \
                and any(isinstance(op, MarkStructure) for op in tx.operations):
            self.refuse_mark = False
            self.fail_next = "mark refused"
        super().apply(tx)


@pytest.mark.parametrize("failure", ["read", "mark"])
def test_a_structure_not_read_or_not_marked_after_an_install_asks_for_another_sync(
        failure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FailingMark()
    if failure == "read":
        fake.refuse_mark = False
        real = fake.structure
        calls: list[int] = []

        def once_broken(layout: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                from enforcer.dataplane.backend import DataplaneError
                raise DataplaneError("netlink: no answer")
            return real(layout)

        monkeypatch.setattr(fake, "structure", once_broken)
    rec = Reconciler(fake, BASE)
    assert rec.sync_all(DECISIONS, read_kernel=True).kind == "full"
    assert rec.needs_full and rec.structure is None, "the repair loop runs again"
    assert walled(fake) == {"100.64.0.1", "100.64.0.2"}, "enforcing all the same"
    rec.sync_all(DECISIONS, read_kernel=True)   # the timer's repair: replaced (no reference, no mark) and marked
    assert not rec.needs_full and rec.structure is not None
    assert fake.structure(BASE).marked == rec.structure.fingerprint
    assert Reconciler(fake, BASE).sync_all(DECISIONS, read_kernel=True).kind == "partial", "a restart trusts it"


# -- TableHealth: counted, logged, shown ------------------------------------------------------------------

def _health(rec: Reconciler) -> tuple[TableHealth, Any]:
    async def kernel(fn, *args):  # type: ignore[no-untyped-def]
        return fn(*args)

    config = SimpleNamespace(gateway=SimpleNamespace(table=TABLE))
    engine = SimpleNamespace(reconciler=rec, kernel=kernel, config=config, table_repairs=0, changed=asyncio.Event(),
                             clock=lambda: 1000.0, metrics=Metrics())
    return TableHealth(engine), engine   # type: ignore[arg-type]


async def test_the_quick_check_reports_counts_and_shows_a_structure_change(caplog: pytest.LogCaptureFixture) -> None:
    fake = learning()
    rec = started(fake)
    health, engine = _health(rec)
    assert await health.verify() is True and health.report()["last_problem"] is None
    fake.delete_rule()
    with caplog.at_level(logging.ERROR):
        assert await health.verify() is False
    assert "event=table_lost" in caplog.text and "check=quick" in caplog.text and "structure changed" in caplog.text
    assert engine.table_repairs == 1 and rec.needs_full and engine.changed.is_set()
    assert engine.metrics.table_repairs.labels("quick")._value.get() == 1, "the NOC sees it too"
    report = health.report()
    assert report["last_problem"]["check"] == "quick" and "chain forward" in report["last_problem"]["detail"]
    assert report["structure"] == rec.structure.fingerprint


async def test_a_check_that_overlaps_a_replace_says_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference changes with each replace: what a check on the reader saw while one ran is
    set aside (``structure_epoch``), not reported as a change of the new table."""
    import enforcer.table_health as table_health

    fake = learning()
    rec = started(fake)
    health, engine = _health(rec)
    real = table_health.probe

    def racing(*args: Any) -> str:
        fake.delete_rule()       # what the reader sees ...
        rec.structure_epoch += 2   # ... while a replace (of the same layout) ran
        return real(*args)

    monkeypatch.setattr(table_health, "probe", racing)
    assert await health.verify() is True and engine.table_repairs == 0 and not rec.needs_full


async def test_a_start_repair_is_counted_and_shown_by_the_daemons_status(tmp_path: Path) -> None:
    config = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.csv}}\n",
                          str(tmp_path / "c.yaml"))
    (tmp_path / "l.csv").write_text("id,addresses,mode,reason\nC-1,100.64.0.1,walled-garden,overdue\n")
    fake = FakeDataplane(predicts_structure=False)
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: 1_795_000_000.0)  # type: ignore[arg-type]
    await e.engine.restore()
    await e.lists.on_list(_list(tmp_path))
    status = e.queries.status()
    assert status["table_repairs"] == 0 and status["table"]["structure"] == e.engine.reconciler.structure.fingerprint
    await e.close()
    fake.delete_rule("from_subscriber")
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: 1_795_000_000.0)  # type: ignore[arg-type]
    assert (await e.engine.restore()).kind == "full"
    status = e.queries.status()
    assert status["table_repairs"] == 1 and status["kernel_in_sync"]
    assert status["table"]["last_problem"]["check"] == "start"
    assert "structure changed" in status["table"]["last_problem"]["detail"]
    assert "100.64.0.1" in walled(fake)
    assert await e.health.verify() is True and e.queries.status()["table_repairs"] == 1, "counted once"
    await e.close()


def _list(tmp_path: Path) -> Any:
    from enforcer.sources import ListUpdate
    from enforcer.subscribers import parse_list
    text = (tmp_path / "l.csv").read_text()
    return ListUpdate(parse_list(text, "l.csv"), "l.csv", "1")


# -- the pieces ------------------------------------------------------------------------------------------

def test_the_mark_is_the_tag_elements_comment() -> None:
    tx = Transaction(TABLE)
    tx.mark_structure(BASE.tag, "0123456789abcdef")
    tag, comment = tag_address(BASE.tag), f"{STRUCTURE_COMMENT}0123456789abcdef"
    assert tx.render() == (f"delete element inet {TABLE} {TAG_SET} {{ {tag} }}\n"
                           f'add element inet {TABLE} {TAG_SET} {{ {tag} comment "{comment}" }}\n')
    assert tx.element_count() == 0
    assert marked_fingerprint(f"{STRUCTURE_COMMENT}0123456789abcdef") == "0123456789abcdef"
    for other in (None, "", "walled-garden structure xyz", "walled-garden structure 0123456789abcdef0", "other"):
        assert marked_fingerprint(other) == ""
    fake = learning()
    with pytest.raises(Exception, match="No such file"):
        fake.apply(tx)   # no table: no tag element to comment


def test_describe_names_what_differs() -> None:
    ref = Structure(fingerprint({"table": "0", "chain a": "1", "chain b": "2", "set __set0": "3", "set s": "4"}),
                    {"table": "0", "chain a": "1", "chain b": "2", "set __set0": "3", "set s": "4"},
                    {"a": 2, "b": 1})
    now = Structure("x", {"table": "1", "chain a": "9", "set s": "5", "chain c": "7"}, {"a": 1, "c": 0},
                    dormant=True)
    text = describe(ref, now)
    assert text.startswith("table made dormant") and "chain a: 1 rule(s) instead of 2" in text
    assert "chain b deleted" in text and "chain c added" in text and "set s changed" in text
    assert "__set0" not in text, "a rule's anonymous set goes with the rule"
    assert describe(ref, Structure("y", {**ref.parts, "set __set0": "8"}, ref.rules)) == "set __set0 changed"
    assert "instead of abc" in describe(None, Structure("y"), "abc")
