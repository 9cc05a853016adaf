"""What a request to the enforcer came to, as a value: done (``Outcome``) or not (``Refusal``).

Components answer billing, operators and the portal with these values and never choose an
HTTP status: that is the ``api`` package's job alone (``api.STATUS``), so the same action can be
served over the control socket, the webhook listener or, later, a fleet bus without the core
knowing which. A refusal's ``kind`` says why in the terms a caller can act on (fix the
request, it is not there, not allowed, clashes with another subscriber, try again later).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Refused(enum.Enum):
    """Why a request was not carried out; each maps to one HTTP status in ``api.STATUS``."""

    INVALID = "invalid"            # the request itself is wrong; the same request fails again
    NOT_FOUND = "not_found"        # nothing to act on (no such exemption, no held change)
    FORBIDDEN = "forbidden"        # not allowed for this caller (not a recent portal caller, not eligible)
    CONFLICT = "conflict"          # clashes with the current state (an address held by another subscriber)
    UNAVAILABLE = "unavailable"    # nothing changed; retrying later may succeed (kernel or state failed)


@dataclass(frozen=True)
class Outcome:
    """Done: ``body`` is the answer the caller gets."""

    body: dict[str, Any]


@dataclass(frozen=True)
class Refusal:
    """Not done, and nothing changed: ``error`` says why; ``extra`` adds fields to the answer."""

    kind: Refused
    error: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def body(self) -> dict[str, Any]:
        return {"error": self.error, **self.extra}


Result = Outcome | Refusal
