"""Stateless CSRF tokens for the portal's forms.

A token is ``<minute>.<mac>``: the minute it was issued (unix time // 60, in hex) and
HMAC-SHA256 over the caller's address and that minute, keyed by a random key made when the
process starts. It proves the form was served by this process to this address within the
last hour, without storing anything per caller. A restart (new key) only makes open pages
ask for one more click.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

#: How long a form stays good: an hour, so a form copied or left open is not honoured for ever.
MAX_AGE = 3600
_SLOT = 60  # seconds per timestamp step


class CsrfTokens:
    def __init__(self, key: bytes | None = None, *, max_age: float = MAX_AGE,
                 clock: Callable[[], float] = time.time) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        self.max_age = max_age
        self.clock = clock

    def issue(self, address: str, now: float | None = None) -> str:
        slot = int((self.clock() if now is None else now) // _SLOT)
        return f"{slot:x}.{self._mac(address, slot)}"

    def check(self, token: str, address: str) -> bool:
        """True for a token this process issued to ``address`` no more than ``max_age`` ago."""
        slot_text, dot, mac = token.partition(".")
        if not dot or not 0 < len(slot_text) <= 12 or len(mac) != 43:
            return False
        try:
            slot = int(slot_text, 16)
        except ValueError:
            return False
        now = self.clock()
        # The slot starts at or before the real issue time, so this bounds the real age too;
        # one slot of slack in the future covers nothing but a clock stepping back a little.
        if not -_SLOT <= now - slot * _SLOT <= self.max_age:
            return False
        return hmac.compare_digest(mac, self._mac(address, slot))

    def _mac(self, address: str, slot: int) -> str:
        digest = hmac.new(self._key, f"{address}|{slot}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")
