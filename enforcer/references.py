"""Reference codes: what the portal page shows so support can find the subscriber, without
the page revealing who they are (a neighbour on the same connection sees only the code).

A code is an HMAC of the subscriber id under a key kept in the state database, so codes stay
the same across restarts and cannot be reversed or guessed without the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable

from .store import Store

log = logging.getLogger("walled_garden.enforcer")


class References:
    def __init__(self, store: Store) -> None:
        key = store.get_meta("reference_key")
        if not (isinstance(key, str) and len(key) == 32 and all(c in "0123456789abcdef" for c in key)):
            if key is not None:   # a damaged row: a new key changes the codes, never stops the start
                log.error("event=reference_key_unusable replaced=yes")  # earlier reference codes change
            key = None
        if key is None:
            key = secrets.token_hex(16)
            store.set_meta("reference_key", key)
        self.store = store
        self._key = bytes.fromhex(key)
        self._codes: dict[str, str] = {}

    @property
    def key_hex(self) -> str:
        return self._key.hex()

    def adopt(self, key: str) -> bool:
        """Take the fleet's key (every gateway shows the same code); False when it is not a key."""
        if not (len(key) == 32 and all(c in "0123456789abcdef" for c in key)):
            return False
        self.store.set_meta("reference_key", key)
        self._key = bytes.fromhex(key)
        self._codes.clear()
        return True

    def code(self, subscriber_id: str) -> str:
        code = self._codes.get(subscriber_id)
        if code is None:
            digest = hmac.new(self._key, subscriber_id.encode(), hashlib.sha256).digest()
            letters = base64.b32encode(digest).decode()[:8]
            code = self._codes[subscriber_id] = f"WG-{letters[:4]}-{letters[4:]}"
        return code

    def find(self, code: str, subscriber_ids: Iterable[str]) -> str | None:
        """Which of ``subscriber_ids`` has this code (O(ids): for an operator's ``explain``)."""
        wanted = code.strip().upper()
        return next((sid for sid in subscriber_ids if self.code(sid) == wanted), None)
