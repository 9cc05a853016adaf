"""The digest mark (issue 16): a start trusts a table that carries the digest of the decisions'
elements instead of reading 125k elements back; anything else is read back as before.

What the mark proves and what it does not is in ``Reconciler._carries``; ``audit`` is the check
that sees what the mark cannot (an element added or deleted with ``nft`` behind our back)."""

from __future__ import annotations

import random

from test_reconciler import BASE, TABLE, keys, net

from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.layout import TAG_SET, tag_address
from enforcer.dataplane.state import TableState, digest, digest_mark, element_hash, mark_digest
from enforcer.metrics import Metrics
from enforcer.model import Mode
from enforcer.policy import Decision
from enforcer.reconciler import Reconciler, _digested, audit
from enforcer.subscribers import Subscriber


def restricted(sid: str, *addresses: str, mode: Mode = Mode.WALLED_GARDEN) -> Decision:
    return Decision(sid, mode, "on the restricted list", Subscriber(sid, tuple(net(a) for a in addresses), mode))


def free(sid: str) -> Decision:
    return Decision(sid, Mode.FREE, "not on the restricted list")


DECISIONS = {
    "C-1": restricted("C-1", "100.64.0.10", "2001:db8:10:100::/56"),
    "C-2": restricted("C-2", "100.64.0.11", mode=Mode.NOTICE),
    "C-3": restricted("C-3", "100.64.0.12", mode=Mode.THROTTLE),
    "C-4": free("C-4"),
}


class CountingFake(FakeDataplane):
    """Counts full listings: a trusted start lists nothing."""

    def __init__(self) -> None:
        super().__init__(TABLE)
        self.reads = 0

    def read(self) -> TableState | None:
        self.reads += 1
        return super().read()


def first_run(decisions: dict[str, Decision] = DECISIONS) -> tuple[CountingFake, Reconciler]:
    fake = CountingFake()
    rec = Reconciler(fake, BASE)
    rec.host_allow = {"203.0.113.7": None}
    rec.sync_all(decisions, read_kernel=True)
    fake.reads = 0
    return fake, rec


def restart(fake: CountingFake) -> Reconciler:
    """A new process: a reconciler with no mirror, on the same table."""
    fake.transactions.clear()
    fake.reads = 0
    return Reconciler(fake, BASE)


def mark_of(fake: FakeDataplane) -> set[str]:
    assert fake.state is not None
    return set(fake.state.elements[TAG_SET]) - {tag_address(BASE.tag)}


def marked(fake: FakeDataplane) -> str:
    """The mark a table whose last commit was ours should hold: its digest, this generation."""
    assert fake.state is not None
    return digest_mark(digest(fake.state.elements, _digested(BASE)), fake.generation())


def test_every_transaction_carries_the_digest_and_generation_of_the_subscriber_sets() -> None:
    fake, rec = first_run()
    assert mark_of(fake) == {marked(fake)} == {digest_mark(rec.digest, fake.generation())}
    rng = random.Random(16)
    decisions = dict(DECISIONS)
    for step in range(60):   # element diffs: the digest follows each added and deleted element
        sid = f"C-{rng.randint(1, 8)}"
        mode = rng.choice([Mode.FREE, Mode.NOTICE, Mode.THROTTLE, Mode.WALLED_GARDEN])
        decisions[sid] = free(sid) if mode is Mode.FREE else restricted(sid, f"100.64.1.{sid[2:]}", mode=mode)
        rec.update({sid: decisions[sid]})
        if step % 20 == 0:
            rec.acknowledge(restricted(sid, f"100.64.1.{sid[2:]}", mode=Mode.NOTICE), 60)   # not digested
            rec.set_host_allow([f"203.0.113.{step + 1}"])                                   # nor this
        assert mark_of(fake) == {marked(fake)}, step
    assert audit(fake, BASE) == ""
    # the mirror keeps the mode views and garden hosts only; the sets' elements follow from them
    assert rec.mirror is not None
    assert all(name.startswith("mode") or name.startswith("allowhost") for name in rec.mirror.elements)
    assert rec.check_kernel(full=True) == "", "the sets the mirror implies are the kernel's"
    generation = fake.generation()
    rec.sync_all(decisions)   # nothing to change: nothing committed, the mark stands
    assert fake.generation() == generation and mark_of(fake) == {marked(fake)}


def test_a_start_trusts_a_table_whose_last_commit_was_ours_with_these_elements() -> None:
    fake, first = first_run()
    rec = restart(fake)
    rec.host_allow = {"203.0.113.7": None}
    result = rec.sync_all(DECISIONS, read_kernel=True)
    assert fake.reads == 0, "the table was read back"
    assert (result.kind, result.elements, result.changed) == ("partial", 0, [])
    assert not fake.transactions
    assert rec.verified is False and not rec.needs_full
    assert rec.mirror is not None and first.mirror is not None
    assert rec.mirror.elements == first.mirror.elements and rec.owners == first.owners
    assert rec.digest == first.digest
    # what it then does is as after a read-back: a payment is one delete, and the mark moves
    result = rec.update({"C-1": free("C-1")})
    assert result.elements == 2 and not rec.needs_full
    assert mark_of(fake) == {marked(fake)}
    assert rec.check_kernel(full=True) == "" and rec.verified is True
    rec = restart(fake)   # and the next start trusts that
    rec.host_allow = {"203.0.113.7": None}
    rec.sync_all({**DECISIONS, "C-1": free("C-1")}, read_kernel=True)
    assert fake.reads == 0


def test_the_garden_hosts_are_read_back_alone_and_diffed() -> None:
    fake, _ = first_run()
    rec = restart(fake)   # the hostnames are not resolved yet: the table's host is deleted, as a read-back would
    result = rec.sync_all(DECISIONS, read_kernel=True)
    assert fake.reads == 0 and result.elements == 1
    assert fake.state is not None and fake.state.elements["allowhost4"] == {}
    assert mark_of(fake) == {marked(fake)}


def test_other_decisions_than_the_tables_are_read_back_and_diffed() -> None:
    fake, _ = first_run()
    rec = restart(fake)
    rec.host_allow = {"203.0.113.7": None}
    decisions = {**DECISIONS, "C-1": free("C-1")}   # e.g. a payment the kernel had, SQLite did not
    result = rec.sync_all(decisions, read_kernel=True)
    assert fake.reads == 1
    assert (result.kind, result.elements) == ("partial", 2)
    assert set(result.changed) == keys("100.64.0.10/32", "2001:db8:10:100::/56")
    assert rec.verified is True
    assert mark_of(fake) == {marked(fake)}


def test_an_element_deleted_or_added_behind_our_back_is_read_back() -> None:
    """``nft delete element`` (or add) while the daemon was down is a commit: the mark's
    generation is no longer the table's, so the table is read back and repaired."""
    for edit in ("delete", "add"):
        fake, _ = first_run()
        if edit == "delete":
            fake.drop_element("portal4_32", "100.64.0.10")
        else:
            fake.add_element("portal4_32", "100.64.0.99")
        rec = restart(fake)
        rec.host_allow = {"203.0.113.7": None}
        result = rec.sync_all(DECISIONS, read_kernel=True)
        assert fake.reads == 1 and (result.kind, result.elements) == ("partial", 1), edit
        assert fake.state is not None
        assert set(fake.state.elements["portal4_32"]) == {"100.64.0.10"}, edit
        assert mark_of(fake) == {marked(fake)} and audit(fake, BASE) == ""


def test_any_other_commit_since_ours_means_a_read_back() -> None:
    """A commit that did not touch our sets (another table, the DNS forwarder's set) moves the
    generation too: not told apart, so read back (the safe side)."""
    fake, _ = first_run()
    fake.generation_id += 1   # someone's transaction elsewhere in the ruleset
    rec = restart(fake)
    rec.host_allow = {"203.0.113.7": None}
    result = rec.sync_all(DECISIONS, read_kernel=True)
    assert fake.reads == 1 and result.elements == 0
    assert mark_of(fake) == {marked(fake)}, "the read-back table is marked again (the mark alone committed)"


def test_after_someone_elses_commit_our_commits_carry_no_mark_until_a_read_back() -> None:
    """While the daemon runs: after a commit not ours, a payment's transaction deletes the mark
    and writes none (the table may hold what that commit did), so a start then reads back."""
    fake, rec = first_run()
    fake.drop_element("notice4_32", "100.64.0.11")   # behind our back, the daemon running
    rec.update({"C-1": free("C-1")})
    assert mark_of(fake) == set()
    rec.update({"C-1": DECISIONS["C-1"]})
    assert mark_of(fake) == set()
    restarted = restart(fake)
    restarted.host_allow = {"203.0.113.7": None}
    restarted.sync_all(DECISIONS, read_kernel=True)
    assert fake.reads == 1
    assert fake.state is not None and "100.64.0.11" in fake.state.elements["notice4_32"]
    assert mark_of(fake) == {marked(fake)}


def test_a_flushed_set_is_not_trusted_and_the_table_replaced() -> None:
    fake, _ = first_run()
    fake.flush_set("notice4_32")
    rec = restart(fake)
    rec.host_allow = {"203.0.113.7": None}
    result = rec.sync_all(DECISIONS, read_kernel=True)
    assert fake.reads == 1 and result.kind == "full"
    assert audit(fake, BASE) == "" and mark_of(fake) == {marked(fake)}


def test_a_lost_or_foreign_mark_is_not_trusted_and_written_again() -> None:
    fake, first = first_run()
    assert fake.state is not None
    (mark,) = mark_of(fake)
    del fake.state.elements[TAG_SET][mark]                                  # the mark deleted with nft
    fake.state.elements[TAG_SET][digest_mark(12345, fake.generation())] = None   # and another added
    assert "do not hash to the digest mark" in audit(fake, BASE)
    rec = restart(fake)
    rec.host_allow = {"203.0.113.7": None}
    result = rec.sync_all(DECISIONS, read_kernel=True)
    assert fake.reads == 1 and (result.kind, result.elements) == ("partial", 0)
    assert mark_of(fake) == {marked(fake)} and audit(fake, BASE) == ""
    assert rec.digest == first.digest


def test_audit_sees_an_element_changed_behind_our_back() -> None:
    """From any thread, the table against its own mark (the full check compares the mirror)."""
    fake, rec = first_run()
    fake.drop_element("portal4_32", "100.64.0.10")
    assert "do not hash to the digest mark" in audit(fake, BASE)
    assert "portal4_32: 1 missing (e.g. 100.64.0.10)" in rec.check_kernel(full=True)
    assert rec.needs_full
    result = rec.sync_all(DECISIONS, read_kernel=True)   # the repair (the timer's) reads back
    assert result.elements == 1 and audit(fake, BASE) == "" and rec.check_kernel(full=True) == ""
    fake.drop_table()
    assert audit(fake, BASE) == "table missing"


def test_a_repair_after_drift_never_trusts_the_mark() -> None:
    """Once this process has a mirror, ``read_kernel`` always reads back."""
    fake, rec = first_run()
    fake.drop_element("notice4_32", "100.64.0.11")
    rec.needs_full = True
    rec.sync_all(DECISIONS, read_kernel=True)
    assert fake.reads == 1
    assert fake.state is not None and "100.64.0.11" in fake.state.elements["notice4_32"]


def test_element_hash_is_the_same_in_every_process() -> None:
    """A stored digest is compared by another process: no salted ``hash()``."""
    assert element_hash("portal4_32", "100.64.0.10") == 0x8D578F3AD5F98F5A
    assert digest_mark(0, 0) == "0:1::" and digest_mark(2**64 - 1, 7) == "0:1:0:7:ffff:ffff:ffff:ffff"
    assert mark_digest(digest_mark(2**64 - 1, 7)) == 2**64 - 1 and mark_digest(tag_address("0123456789abcdef")) is None


def test_a_big_sync_gives_the_freed_c_heap_back(monkeypatch) -> None:
    import enforcer.reconciler as reconciler
    trims: list[int] = []
    monkeypatch.setattr(reconciler, "_trim_heap", lambda: trims.append(1))
    monkeypatch.setattr(reconciler, "BIG_TRANSACTION", 3)
    _, rec = first_run()   # 4 elements
    assert trims == [1]
    rec.sync_all(DECISIONS)   # nothing to do: no trim
    assert trims == [1]
    monkeypatch.undo()
    reconciler._trim_heap()   # the real ones run anywhere (glibc or not)
    from enforcer.dataplane.kernel import keep_big_blocks_apart
    keep_big_blocks_apart()


async def test_a_trusted_start_gets_its_full_comparison_at_the_first_table_check() -> None:
    """The mark cannot see a hand-edited ruleset dump restored at the same generation after a
    reboot: the first table check after a trusted start compares every element, not the tenth
    minute's (found in review)."""
    import asyncio
    from types import SimpleNamespace

    from enforcer.table_health import TableHealth

    fake, _ = first_run()
    rec = restart(fake)
    rec.host_allow = {"203.0.113.7": None}
    rec.sync_all(DECISIONS, read_kernel=True)
    assert fake.reads == 0 and rec.verified is False

    async def kernel(fn, *args):  # type: ignore[no-untyped-def]
        return fn(*args)

    config = SimpleNamespace(gateway=SimpleNamespace(table=TABLE))
    engine = SimpleNamespace(reconciler=rec, kernel=kernel, config=config, table_repairs=0, changed=asyncio.Event(),
                             metrics=Metrics())
    assert await TableHealth(engine).verify() is True  # type: ignore[arg-type]
    assert fake.reads == 1 and rec.verified is True, "the whole table was compared once"
    assert await TableHealth(engine).verify() is True  # type: ignore[arg-type]
    assert fake.reads == 1, "then the quick probe again, full every FULL_CHECK_SECONDS"
