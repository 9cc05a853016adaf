"""Promise-to-pay eligibility rules and exemption inputs (list fields, expiry parsing)."""

from __future__ import annotations

import pytest

from enforcer.exemptions import parse_until
from enforcer.model import Mode
from enforcer.promises import LAPSED, PAID_LATE, Promise, PromiseRules, eligibility, settle
from enforcer.subscribers import ListError, parse_list

DAY = 86400.0
NOW = 1_800_000_000.0
RULES = PromiseRules(enabled=True, term=3 * DAY, max_count=2, period=90 * DAY, reasons=("overdue",))


def why(history: list[Promise], mode: Mode = Mode.WALLED_GARDEN, reason: str = "overdue",
        operator: bool = False, rules: PromiseRules = RULES) -> str:
    return eligibility(rules, history, mode, reason, operator, NOW).why


def promise(days_ago: float, outcome: str = "kept") -> Promise:
    return Promise("C-1", NOW - days_ago * DAY, NOW - days_ago * DAY + 3 * DAY, outcome)


def test_eligibility_rules() -> None:
    assert why([]) == "eligible"
    assert eligibility(RULES, [], Mode.WALLED_GARDEN, "overdue", False, NOW).term == 3 * DAY
    assert why([], rules=PromiseRules()) == "disabled"
    assert why([], mode=Mode.FREE) == "not_restricted"
    assert why([], reason="fraud") == "reason_not_eligible"
    assert why([], operator=True) == "operator_restriction"
    assert why([promise(1, "active")]) == "promise_active"
    assert why([promise(30, LAPSED)]) == "last_promise_lapsed"
    assert why([promise(30, PAID_LATE)]) == "eligible"
    assert why([promise(60), promise(30)]) == "limit_reached"
    assert why([promise(100), promise(30)]) == "eligible", "only promises within the period count"
    assert why([], reason="", rules=PromiseRules(enabled=True, reasons=())) == "eligible"


def test_settle() -> None:
    active = Promise("C-1", NOW, NOW + 3 * DAY)
    assert settle([active], NOW + DAY, paid=True)[0].outcome == "kept"
    assert settle([active], NOW + 3 * DAY, paid=False)[0].outcome == LAPSED
    assert settle([active], NOW + DAY, paid=False)[0].outcome == "active"
    lapsed = settle([active], NOW + 3 * DAY, paid=False)
    assert settle(lapsed, NOW + 4 * DAY, paid=True)[0].outcome == PAID_LATE


def test_parse_until() -> None:
    assert parse_until("14d", NOW) == NOW + 14 * DAY
    assert parse_until("2027-06-01T00:00:00Z", NOW) == 1811808000.0
    for bad, words in (("yesterday", "not a date"), ("2020-01-01", "past"), ("900d", "renewed")):
        with pytest.raises(ValueError, match=words):
            parse_until(bad, NOW)


def test_list_exemption_fields_yaml_and_csv() -> None:
    yaml = ("subscribers:\n  - {id: C-1, addresses: [100.64.0.1], exempt_until: '2027-06-01T00:00:00Z',"
            " exempt_category: arrangement}\n")
    (entry,) = parse_list(yaml, "l.yaml")
    assert entry.exempt_until == 1811808000.0 and entry.exempt_category == "arrangement"
    (entry,) = parse_list("C-1,100.64.0.1,,overdue,2027-06-01T00:00:00Z,dispute\n", "l.csv")
    assert entry.exempt_category == "dispute"


@pytest.mark.parametrize("line, words", [
    ("C-1,100.64.0.1,,overdue,2027-06-01T00:00:00Z,holiday\n", "exempt_category"),
    ("C-1,100.64.0.1,,overdue,someday,other\n", "exempt_until"),
    ("C-1,100.64.0.1,,overdue,,other\n", "without exempt_until"),
    ("C-1,100.64.0.1,,overdue,2099-01-01,other\n", "renewed"),
])
def test_list_exemption_errors_name_the_line(line: str, words: str) -> None:
    with pytest.raises(ListError) as info:
        parse_list("C-0,100.64.0.9\n" + line, "l.csv")
    assert [i.location for i in info.value.issues] == ["l.csv:2"] and words in info.value.issues[0].message
