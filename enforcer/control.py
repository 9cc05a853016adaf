"""Client side of the control socket, for the CLI (blocking; one request per command).

The paths are ``control_protocol``'s, which the daemon serves: a request for any other path is
a mistake in the caller, refused here before it becomes a puzzling 404 from the daemon.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import urlsplit

from . import control_protocol as protocol
from .control_protocol import ProtocolError, Refusal


class ControlError(Exception):
    """The daemon could not be asked, or refused; the message is for the operator."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("enforcer", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def request(path: str, method: str, url: str, body: dict[str, Any] | None = None,
            timeout: float = 10.0) -> Any:
    """``method url`` on the control socket at ``path``; the JSON answer, or ``ControlError``
    carrying the daemon's ``error`` when it refuses.

    ``url`` is one of ``control_protocol.PATHS``, with its query if any.
    """
    if urlsplit(url).path not in protocol.PATHS:
        raise ValueError(f"{url!r} is not a path of the control socket (see enforcer.control_protocol.PATHS)")
    conn = _UnixConnection(path, timeout)
    try:
        conn.request(method, url, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = json.loads(response.read() or b"{}")
    except (OSError, ValueError) as exc:
        raise ControlError(f"cannot reach the daemon on {path}: {exc} (is 'walled-garden run' running?)") from None
    finally:
        conn.close()
    if response.status >= 400:
        raise ControlError(_refusal_text(data, response.status))
    return data


def _refusal_text(data: Any, status: int) -> str:
    """The daemon's ``error``; the status alone when the refusal's body says nothing readable."""
    try:
        return Refusal.from_json(data).error
    except ProtocolError:
        return f"HTTP {status}"
