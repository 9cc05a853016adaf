"""Stateless CSRF tokens for the portal's forms.

A token is ``<minute>.<mac>`` or ``<minute>.<mac>.<mac>``: the minute it was issued (unix time
// 60, in hex) and HMAC-SHA256 over what it is bound to and that minute, keyed by a random key
made when the process starts. It proves the form was served by this process to this caller
within the last hour, without storing anything per caller. A restart (new key) only makes open
pages ask for one more click.

The first MAC binds the caller's IPv4 address or IPv6 /64 (``ratelimit.bucket_key``), not the
exact address: a phone picks a new IPv6 privacy address, or a browser opens the POST's
connection over the other IPv6 address of its /64, between fetching the page and pressing the
button, and that is still the same subscriber's connection. The optional second MAC binds the
subscriber's account id, as the enforcer's lookup named it when the page was made; when the
lookup of the posting address names a subscriber, that part decides: a page fetched over IPv6
and posted over IPv4 (a new connection may use either family) is accepted for the same
subscriber, and one subscriber's token is no good to another on the same /64 (a /128 each on a
shared /64). Neither part reveals what it binds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from .ratelimit import bucket_key

#: How long a form stays good: an hour, so a form copied or left open is not honoured for ever.
MAX_AGE = 3600
_SLOT = 60  # seconds per timestamp step
_MAC_LENGTH = 43  # unpadded base64 of 32 bytes


class CsrfTokens:
    def __init__(self, key: bytes | None = None, *, max_age: float = MAX_AGE,
                 clock: Callable[[], float] = time.time) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        self.max_age = max_age
        self.clock = clock

    def issue(self, address: str, subscriber: str = "", now: float | None = None) -> str:
        """A token for the caller at ``address`` (its IPv4 address or IPv6 /64), and with
        ``subscriber`` (the lookup's account id) for any address of that subscriber too."""
        slot = int((self.clock() if now is None else now) // _SLOT)
        token = f"{slot:x}.{self._mac('address', bucket_key(address), slot)}"
        return f"{token}.{self._mac('subscriber', subscriber, slot)}" if subscriber else token

    def check(self, token: str, address: str, subscriber: str = "") -> bool:
        """True for a token this process issued no more than ``max_age`` ago: given ``subscriber``
        (the enforcer's lookup of ``address`` names one), a token that names a subscriber must
        name that one (subscribers may share a /64, a /128 each); otherwise, or without a lookup
        (free now, the enforcer down: nothing to act for), the token's ``address`` IPv4 address
        or IPv6 /64."""
        parts = token.split(".")
        if len(parts) not in (2, 3) or not 0 < len(parts[0]) <= 12 \
                or any(len(mac) != _MAC_LENGTH for mac in parts[1:]):
            return False
        try:
            slot = int(parts[0], 16)
        except ValueError:
            return False
        now = self.clock()
        # The slot starts at or before the real issue time, so this bounds the real age too;
        # one slot of slack in the future covers nothing but a clock stepping back a little.
        if not -_SLOT <= now - slot * _SLOT <= self.max_age:
            return False
        if len(parts) == 3 and subscriber:   # the lookup names one: only theirs, whichever /64 or family
            return hmac.compare_digest(parts[2], self._mac("subscriber", subscriber, slot))
        return hmac.compare_digest(parts[1], self._mac("address", bucket_key(address), slot))

    @staticmethod
    def names_subscriber(token: str) -> bool:
        """Does the token carry a subscriber part (so a lookup of another address could honour it)?"""
        return token.count(".") == 2

    def _mac(self, kind: str, value: str, slot: int) -> str:
        digest = hmac.new(self._key, f"{kind}|{value}|{slot}".encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
