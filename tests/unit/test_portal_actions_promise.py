"""``Enforcer.promise`` at its edges: two presses at once, a kernel change that fails, reasons
written differently. Fake kernel, as in ``test_daemon_policy_rules`` (whose helpers these are)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_daemon_policy_rules import MONDAY_10, Clock, kernel_mode, make_config, running, sub

from daemon_helpers import promise
from enforcer.sources import ListUpdate
from enforcer.subscribers import Mode, Subscriber, parse_address

RULES = ("policy:\n  promise_to_pay: {term: 3d, max: 1, period: 90d, reasons: [overdue], "
         "webhook_url: 'http://127.0.0.1:9/hook', webhook_secret_file: '@OUTBOX_SECRET@'}\n")


async def test_two_presses_at_once_make_one_promise(tmp_path: Path) -> None:
    """Both pass the first check while something else holds the lock; only one may promise."""
    async with running(make_config(tmp_path, RULES), Clock(MONDAY_10)) as (enforcer, fake):
        await enforcer.lists.on_list(ListUpdate([sub()], "l.yaml", "1"))
        async with enforcer.engine.lock:   # e.g. a sync in progress
            presses = [asyncio.create_task(promise(enforcer, "100.64.0.10")) for _ in range(2)]
            await asyncio.sleep(0.05)
        answers = await asyncio.gather(*presses)
        assert sorted(status for status, _ in answers) == [200, 409], answers
        assert len(enforcer.engine.inputs.promises["C-1"]) == 1
        assert enforcer.engine.store.outbox_size() == 1, "billing hears of one promise"
        assert kernel_mode(fake) is None


async def test_a_failed_kernel_change_makes_no_promise_and_tells_billing_nothing(tmp_path: Path) -> None:
    async with running(make_config(tmp_path, RULES), Clock(MONDAY_10)) as (enforcer, fake):
        await enforcer.lists.on_list(ListUpdate([sub()], "l.yaml", "1"))
        fake.fail_next = "Could not process rule: Device or resource busy"
        status, _ = await promise(enforcer, "100.64.0.10")
        assert status == 503
        assert enforcer.engine.store.outbox_size() == 0
        assert not enforcer.engine.inputs.promises.get("C-1")
        assert kernel_mode(fake) == "goto garden"
        assert enforcer.queries.lookup("100.64.0.10")["promise"]["eligible"] is True   # they can try again
        assert (await promise(enforcer, "100.64.0.10"))[0] == 200
        assert enforcer.engine.store.outbox_size() == 1


async def test_reasons_match_whatever_their_case(tmp_path: Path) -> None:
    async with running(make_config(tmp_path, RULES), Clock(MONDAY_10)) as (enforcer, _):
        shouted = Subscriber("C-2", (parse_address("100.64.0.20"),), Mode.WALLED_GARDEN, "Overdue")
        await enforcer.lists.on_list(ListUpdate([shouted], "l.yaml", "1"))
        assert enforcer.queries.lookup("100.64.0.20")["promise"] == {"eligible": True, "why": "eligible",
                                                              "term_seconds": 3 * 86400.0}
