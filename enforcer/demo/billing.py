"""A billing system stand-in: sends one signed Standard Webhooks event and times the answer.

Runs as its own process (``python -m enforcer.demo.billing``) so the demo and the tests can
start it inside the upstream namespace, where a real billing system would sit.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook


def signed_request(url: str, secret: str, body: dict[str, Any], event_id: str | None = None,
                   timestamp: float | None = None) -> urllib.request.Request:
    event_id = event_id or "msg_" + secrets.token_hex(12)
    sent = datetime.fromtimestamp(timestamp if timestamp is not None else time.time(), tz=UTC)
    data = json.dumps(body)
    signature = Webhook(secret).sign(event_id, sent, data)
    headers = {"Content-Type": "application/json", "webhook-id": event_id,
               "webhook-timestamp": str(int(sent.timestamp())), "webhook-signature": signature}
    return urllib.request.Request(url, data=data.encode(), headers=headers, method="POST")


def send(url: str, secret: str, body: dict[str, Any], event_id: str | None = None,
         timestamp: float | None = None, timeout: float = 10.0) -> dict[str, Any]:
    request = signed_request(url, secret, body, event_id, timestamp)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, exc.read()
    seconds = time.perf_counter() - started
    try:
        parsed = json.loads(answer)
    except ValueError:
        parsed = {"raw": answer.decode(errors="replace")}
    return {"status": status, "answer": parsed, "seconds": seconds, "id": request.get_header("Webhook-id")}


def event_body(kind: str, subscriber: str, **data: Any) -> dict[str, Any]:
    now = datetime.now(tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": kind, "timestamp": now, "data": {"subscriber": subscriber, **data}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--secret-file", required=True)
    parser.add_argument("--type", default="payment.received")
    parser.add_argument("--subscriber", required=True)
    parser.add_argument("--data", default="{}", help="extra JSON for the data object")
    args = parser.parse_args(argv)
    with open(args.secret_file, encoding="utf-8") as handle:
        secret = handle.read().strip()
    result = send(args.url, secret, event_body(args.type, args.subscriber, **json.loads(args.data)))
    print(json.dumps(result))
    return 0 if result["status"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
