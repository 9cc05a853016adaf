"""The door an input takes when the gateway is one of a fleet (docs/reference.md, Fleet).

Alone, a component applies an operator's or the portal's input itself. In a fleet the same
input must change every gateway, in one order: the component hands it to a ``Relay`` (the
fleet's stream) as a kind and a JSON body, and the fleet applies it on every gateway, this one
included, through the component's ``apply_*`` method. The answer is this gateway's own result.
A Protocol, so components need not import the fleet (which sits above them).
"""

from __future__ import annotations

from typing import Any, Protocol

from .outcome import Result


class Relay(Protocol):
    @property
    def gateway(self) -> str:
        """This gateway's name in the fleet (shown in audit notes)."""
        ...

    async def send(self, kind: str, body: dict[str, Any], message_id: str | None = None) -> Result:
        """Publish one input; the result once this gateway applied it (or a refusal: retry later)."""
        ...
