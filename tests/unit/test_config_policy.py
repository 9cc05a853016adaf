"""The ``policy`` section of the config: every mistake named by key path (and file:line for the holiday file)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from enforcer.config import ConfigError, parse_config
from enforcer.model import Mode

BASE = "subscribers: {source: /tmp/l.yaml}\n"


def errors(policy: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + policy, "c.yaml")
    return [str(i) for i in info.value.issues]


def test_full_policy_parses(tmp_path: Path) -> None:
    holidays = tmp_path / "holidays.txt"
    holidays.write_text("# Czech public holidays\n2026-12-24  Christmas Eve\n\n2026-12-25\n")
    config = parse_config(BASE + f"""policy:
  windows: {{timezone: Europe/Prague, days: [mon, tue, wed, thu, fri], hours: ["08:00-12:00", "13:00-17:00"],
            holidays_file: {holidays}}}
  escalation: [{{after: 14d, mode: walled-garden}}, {{after: 7d, mode: throttle}}]
  promise_to_pay: {{term: 3d, max: 2, period: 90d, reasons: [overdue, suspended],
                   webhook_url: "https://billing.example/hooks/wg", webhook_secret_file: /etc/wg/promise.secret}}
  exemption_default: 14d
  audit_retention: 365d
""", "c.yaml")
    p = config.policy
    assert p.windows.configured and p.windows.zone == "Europe/Prague" and len(p.windows.holidays) == 2
    assert p.windows.hours == ((480, 720), (780, 1020))
    assert [s.mode for s in p.escalation] == [Mode.THROTTLE, Mode.WALLED_GARDEN]      # sorted by time
    assert p.promise_to_pay.enabled and p.promise_to_pay.max_count == 2
    assert p.promise_to_pay.webhook_secret_file == "/etc/wg/promise.secret"
    assert p.exemption_default == 14 * 86400 and p.audit_retention == 365 * 86400


def test_defaults_change_nothing() -> None:
    p = parse_config(BASE, "c.yaml").policy
    assert not p.windows.configured and p.escalation == () and not p.promise_to_pay.enabled


@pytest.mark.parametrize("policy, where, words", [
    ("policy: {windows: {timezone: Mars/Olympus}}", "policy.windows.timezone", "time zone"),
    ("policy: {windows: {hours: '18:00-08:00'}}", "policy.windows.hours", "two ranges"),
    ("policy: {windows: {days: [funday]}}", "policy.windows.days", "weekday"),
    ("policy: {windows: {when: always}}", "policy.windows.when", "unknown key"),
    ("policy: {escalation: [{after: 7d, mode: free}]}", "policy.escalation[0].mode", "not one of"),
    ("policy: {escalation: [{after: 7d, mode: walled-garden}, {after: 9d, mode: notice}]}", "policy.escalation",
     "not stricter"),
    ("policy: {escalation: [{mode: throttle}]}", "policy.escalation[0]", "needs after"),
    ("policy: {promise_to_pay: {term: 100d, period: 30d}}", "policy.promise_to_pay.term", "longer than"),
    ("policy: {promise_to_pay: {max: 0}}", "policy.promise_to_pay.max", "at least 1"),
    ("policy: {promise_to_pay: {webhook_url: ftp://x}}", "policy.promise_to_pay.webhook_url", "http"),
    ("policy: {audit_retention: -1}", "policy.audit_retention", "not negative"),
    # The outbox signs with a secret of its own, never the inbound webhook secret.
    ("policy: {promise_to_pay: {webhook_url: 'https://b.example/h'}}", "policy.promise_to_pay.webhook_secret_file",
     "required with webhook_url"),
    ("policy: {promise_to_pay: {webhook_url: 'https://b.example/h', webhook_secret_file: "
     "/etc/walled-garden/webhook.secret}}", "policy.promise_to_pay.webhook_secret_file", "of their own"),
])
def test_policy_errors_name_the_key(policy: str, where: str, words: str) -> None:
    found = errors(policy)
    assert any(e.startswith(where + " (c.yaml:") and words in e for e in found), found


def test_holiday_file_errors_name_file_and_line(tmp_path: Path) -> None:
    holidays = tmp_path / "h.txt"
    holidays.write_text("2026-12-24\n24.12.2026\n")
    found = errors(f"policy: {{windows: {{holidays_file: {holidays}}}}}")
    assert any(f"{holidays}:2" in e and "not a date" in e for e in found), found
    found = errors(f"policy: {{windows: {{holidays_file: {tmp_path}/missing.txt}}}}")
    assert any("cannot read holiday calendar" in e for e in found), found


async def test_outbox_never_signs_with_the_inbound_webhook_secret(tmp_path: Path) -> None:
    """Without a promise secret of its own, nothing is sent (and it says why), even though
    ``api.webhook_secret_file`` is a valid secret."""
    import base64
    from types import SimpleNamespace

    from enforcer.config import ApiConfig, PolicyConfig
    from enforcer.outbox import Outbox
    from enforcer.promises import PromiseRules

    inbound = tmp_path / "webhook.secret"
    inbound.write_text("whsec_" + base64.b64encode(b"k" * 32).decode() + "\n")
    failed: list[tuple[str, str]] = []
    store = SimpleNamespace(outbox_due=lambda now: [("msg_1", 0.0, {"type": "promise.made"}, 0)],
                            outbox_failed=lambda mid, retry, error: failed.append((mid, error)))
    config = SimpleNamespace(api=ApiConfig(webhook_secret_file=str(inbound)),
                             policy=PolicyConfig(promise_to_pay=PromiseRules(enabled=True,
                                                                             webhook_url="http://192.0.2.1/h")))
    from enforcer.api.webhooks import load_webhook_secret

    outbox = Outbox(store, config.policy.promise_to_pay, None, lambda: 1000.0, asyncio.Event(),  # type: ignore[arg-type]
                    load_webhook_secret)

    class NoSession:
        def post(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("signed and sent with the inbound webhook secret")

    assert await outbox.deliver_due(NoSession()) == 0  # type: ignore[arg-type]
    assert failed and failed[0][0] == "msg_1" and "webhook_secret_file" in failed[0][1]
