"""The control socket's messages, shared by the daemon that answers and the clients that ask.

The daemon serves one HTTP API on the Unix socket ``api.socket``; the CLI (``enforcer.control``)
and the captive portal (``captive_portal.enforcer_client``) call it. Keeping the paths and the
portal's messages here, in one leaf module (standard library and ``enforcer.model`` only), means
the two sides cannot drift apart: the daemon builds its answers with ``to_json()`` and the portal
reads them with ``from_json()``.

Reading is strict at this edge: an answer that does not have the shape below raises one
``ProtocolError`` naming the field (``ack_until``, ``promise.term_seconds``, ...), never a half
understood value. Optional fields may be missing or ``null``; that reads as "none".

The portal's exchanges (the portal only ever names the TCP peer's own address)::

    GET  /v1/lookup?address=A        200 Lookup
    POST /v1/acknowledge {"address"} 200 Acknowledged          | 409 Refusal (not in notice/throttle)
    POST /v1/promise     {"address"} 200 Promised              | 403/409 Refusal with "why"
    any of the three                 403 Refusal why=not_a_recent_caller | 400/503 Refusal
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Any

from .model import Mode

# -- the paths the control socket serves ----------------------------------------------------------
LOOKUP = "/v1/lookup"           # GET ?address=: is this address restricted (portal and operators)
STATUS = "/v1/status"           # GET: the daemon's state (operators)
EXPLAIN = "/v1/explain"         # GET ?q=: why a subscriber is or is not restricted (operators)
AUDIT = "/v1/audit"             # GET ?subscriber=&since=&limit=: the audit trail (operators)
ACKNOWLEDGE = "/v1/acknowledge"  # POST {"address"}: a notice was read (portal)
PROMISE = "/v1/promise"         # POST {"address"}: "I promise to pay" (portal)
RESTRICT = "/v1/restrict"       # POST: operator override (operators)
LIFT = "/v1/lift"               # POST: operator override (operators)
APPROVE = "/v1/approve"         # POST: a held list change goes ahead (operators)
REJECT = "/v1/reject"           # POST: a held list change is dropped (operators)
EXEMPT = "/v1/exempt"           # POST: an exemption (operators)
UNEXEMPT = "/v1/unexempt"       # POST: an exemption ends (operators)
SESSION_START = "/v1/session/start"   # POST {match keys, addresses}: a BNG session began (ip-up scripts)
SESSION_STOP = "/v1/session/stop"     # POST {match keys, addresses?}: it ended (ip-down scripts)
FLEET = "/v1/fleet"             # GET: every gateway of the fleet, as its heartbeats say (operators)

#: Query parameters of the GET paths.
LOOKUP_ADDRESS = "address"
EXPLAIN_QUERY = "q"

#: The portal's actions for its caller's address, and the operators' actions.
PORTAL_ACTIONS = (ACKNOWLEDGE, PROMISE)
OPERATOR_ACTIONS = (RESTRICT, LIFT, APPROVE, REJECT, EXEMPT, UNEXEMPT)
SESSION_ACTIONS = (SESSION_START, SESSION_STOP)
#: Every path the control socket serves.
PATHS = (LOOKUP, STATUS, EXPLAIN, AUDIT, FLEET, *PORTAL_ACTIONS, *OPERATOR_ACTIONS, *SESSION_ACTIONS)

#: ``Refusal.why`` when the kernel has not seen the address connect to the portal lately.
NOT_A_RECENT_CALLER = "not_a_recent_caller"
#: ``Refusal.why`` (and ``PromiseOffer.why``) when there is no restriction to act on.
NOT_RESTRICTED = "not_restricted"
#: Modes in which the subscriber may read the notice and carry on (the others are walled in).
NOTICE_MODES = frozenset({Mode.NOTICE.value, Mode.THROTTLE.value})
_MODES = frozenset(m.value for m in Mode)


class ProtocolError(ValueError):
    """A message does not have the agreed shape; ``field`` names the part that is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def action_name(path: str) -> str:
    """``"acknowledge"`` for ``/v1/acknowledge``: the name the daemon's routes match on."""
    return path.rsplit("/", 1)[-1]


# -- the portal's messages ------------------------------------------------------------------------
@dataclass(frozen=True)
class PromiseOffer:
    """Whether the caller may press "I promise to pay" now (the lookup's ``promise``).

    ``why`` is the enforcer's category (``eligible``, ``limit_reached``, ``not_restricted``, ...;
    "" when it said nothing); ``term`` (``term_seconds`` on the wire) is how long a promise would
    lift the restriction. Without a term the page could not say what the button does, so an
    offer without one reads as not eligible.
    """

    eligible: bool = False
    why: str = ""
    term: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"eligible": self.eligible, "why": self.why, "term_seconds": self.term}

    @classmethod
    def from_json(cls, data: Any, field: str = "promise") -> PromiseOffer:
        """Missing or ``null`` (an enforcer without promises) reads as ``NOT_OFFERED``."""
        if data is None:
            return NOT_OFFERED
        body = _object(data, field)
        eligible = _bool(body, "eligible", field)
        term = _time(body, "term_seconds", field, optional=True)
        if term is not None and term <= 0:
            raise ProtocolError(f"{field}.term_seconds", f"must be positive, not {term!r}")
        return cls(eligible=eligible and term is not None, why=_text(body, "why", field), term=term)


NOT_OFFERED = PromiseOffer()


@dataclass(frozen=True)
class Lookup:
    """``GET /v1/lookup``: what the enforcer says about one address.

    The account id travels as ``null`` when there is none (``subscriber`` is "" here).
    """

    address: str
    restricted: bool
    mode: str        # a Mode value: "free" | "notice" | "throttle" | "walled-garden"
    reason: str      # category for the page ("overdue", ...), "" when none
    reference: str   # code the subscriber quotes to the provider, "" when none
    subscriber: str = ""            # account id; shown only with portal.show_account
    ack_until: float | None = None  # unix time an acknowledged notice lasts until
    promise: PromiseOffer = NOT_OFFERED  # may the caller promise to pay now, and for how long

    def __post_init__(self) -> None:
        _plain_mode(self)

    @property
    def in_notice(self) -> bool:
        """Restricted in a mode the subscriber can acknowledge (notice or throttle)."""
        return self.restricted and self.mode in NOTICE_MODES

    def acknowledged(self, now: float) -> bool:
        """In notice mode and the notice has been acknowledged, still in force at ``now``."""
        return self.in_notice and self.ack_until is not None and self.ack_until > now

    def captive(self, now: float) -> bool:
        """RFC 8908 ``captive``: must this caller visit the portal before browsing normally?"""
        return self.restricted and not self.acknowledged(now)

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "restricted": self.restricted, "mode": self.mode,
                "reason": self.reason, "subscriber": self.subscriber or None, "reference": self.reference,
                "ack_until": self.ack_until, "promise": self.promise.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> Lookup:
        body = _object(data, "lookup")
        address = _text(body, "address", optional=False)
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ProtocolError("address", f"{address!r} is not an IP address") from None
        restricted = _bool(body, "restricted")
        mode = _mode(body, "mode")
        if restricted == (mode == Mode.FREE.value):
            raise ProtocolError("mode", f"{mode!r} contradicts restricted={str(restricted).lower()}")
        return cls(address=address, restricted=restricted, mode=mode, reason=_text(body, "reason"),
                   reference=_text(body, "reference"), subscriber=_text(body, "subscriber"),
                   ack_until=_time(body, "ack_until", optional=True),
                   promise=PromiseOffer.from_json(body.get("promise")))


@dataclass(frozen=True)
class Acknowledged:
    """``POST /v1/acknowledge`` answered 200.

    ``acknowledged`` True: the notice is out of the way until ``until`` (unix time). False: the
    address is not restricted (any more), and ``mode`` says what it is (``free``).
    """

    acknowledged: bool
    until: float | None = None
    mode: str = ""

    def __post_init__(self) -> None:
        _plain_mode(self)

    def to_json(self) -> dict[str, Any]:
        if self.acknowledged:
            return {"acknowledged": True, "until": self.until}
        return {"acknowledged": False, "mode": self.mode}

    @classmethod
    def from_json(cls, data: Any) -> Acknowledged:
        body = _object(data, "acknowledgement")
        if _bool(body, "acknowledged"):
            return cls(True, until=_time(body, "until", optional=False))
        return cls(False, mode=_mode(body, "mode"))


@dataclass(frozen=True)
class Promised:
    """``POST /v1/promise``: the answer to "I promise to pay".

    ``promised`` True (200): the restriction is lifted until ``until`` (unix time) and the
    subscriber is in ``mode`` now. False is the client's reading of a ``Refusal`` (403/409),
    ``why`` its category: it is never sent as a ``Promised``.
    """

    promised: bool
    until: float | None = None
    why: str = ""
    mode: str = ""

    def __post_init__(self) -> None:
        _plain_mode(self)

    def to_json(self) -> dict[str, Any]:
        if not self.promised:
            raise ValueError("a refused promise is sent as a Refusal, not as a Promised")
        return {"promised": True, "until": self.until, "mode": self.mode}

    @classmethod
    def from_json(cls, data: Any) -> Promised:
        body = _object(data, "promise answer")
        if body.get("promised") is not True:
            raise ProtocolError("promised", f"must be true, not {body.get('promised')!r}")
        return cls(True, until=_time(body, "until", optional=False), mode=_mode(body, "mode"))


@dataclass(frozen=True)
class Refusal:
    """The body of every refusal (4xx/5xx): ``error`` for people; for the portal's actions also
    ``eligible`` (always False) and ``why``, a category the portal acts on."""

    error: str
    eligible: bool | None = None
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error}
        if self.eligible is not None:
            body["eligible"] = self.eligible
        if self.why:
            body["why"] = self.why
        return body

    @classmethod
    def from_json(cls, data: Any) -> Refusal:
        body = _object(data, "refusal")
        eligible = body.get("eligible")
        if eligible is not None and not isinstance(eligible, bool):
            raise ProtocolError("eligible", f"must be true or false, not {eligible!r}")
        return cls(error=_text(body, "error", optional=False), eligible=eligible, why=_text(body, "why"))


def not_a_recent_caller() -> Refusal:
    """The 403 for a portal request about an address the kernel has not seen call the portal."""
    return Refusal("this address has not connected to the portal recently; reload the page", eligible=False,
                   why=NOT_A_RECENT_CALLER)


# -- reading fields -------------------------------------------------------------------------------
def _name(key: str, parent: str) -> str:
    return f"{parent}.{key}" if parent else key


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProtocolError(what, f"is not a JSON object but {type(data).__name__}")
    return data


def _bool(body: dict[str, Any], key: str, parent: str = "") -> bool:
    value = body.get(key)
    if not isinstance(value, bool):
        raise ProtocolError(_name(key, parent), f"must be true or false, not {value!r}")
    return value


def _text(body: dict[str, Any], key: str, parent: str = "", *, optional: bool = True) -> str:
    value = body.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ProtocolError(_name(key, parent), f"must be a string, not {value!r}")
    return value


def _time(body: dict[str, Any], key: str, parent: str = "", *, optional: bool) -> float | None:
    value = body.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(_name(key, parent), f"must be a number of seconds, not {value!r}")
    return float(value)


def _mode(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or value not in _MODES:
        raise ProtocolError(key, f"must be one of {', '.join(sorted(_MODES))}, not {value!r}")
    return str(value)


def _plain_mode(message: Any) -> None:
    """Keep ``mode`` the plain value even when built with a ``Mode``: a ``Mode`` member hashes
    unlike its value, so ``Mode.NOTICE in NOTICE_MODES`` would be False."""
    if isinstance(message.mode, Mode):
        object.__setattr__(message, "mode", message.mode.value)
