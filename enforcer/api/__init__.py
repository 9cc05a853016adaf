"""The enforcer's HTTP faces, and the one place a component's result becomes an HTTP answer.

Components return ``outcome.Outcome``/``outcome.Refusal`` values; ``STATUS`` maps each kind of
refusal to its status code. The faces live in their own modules so each process imports only
what it serves: ``webhooks`` (billing's events; also run in the webhook worker process),
``control`` (the operator and portal control socket), ``scrape`` (/metrics), and ``listeners``
(how the TCP and Unix sockets are served and guarded).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..outcome import Outcome, Refused, Result

#: The one place outcomes become HTTP statuses.
STATUS = {Refused.INVALID: 400, Refused.FORBIDDEN: 403, Refused.NOT_FOUND: 404, Refused.CONFLICT: 409,
          Refused.UNAVAILABLE: 503}


def http(result: Result) -> tuple[int, dict[str, Any]]:
    """A component's result as (status, body)."""
    if isinstance(result, Outcome):
        return 200, result.body
    return STATUS[result.kind], result.body


def json_response(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, sort_keys=True))


def answer(result: Result) -> web.Response:
    return json_response(*http(result))
