"""Client side of the control socket, for the CLI (blocking; one request per command)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any


class ControlError(Exception):
    pass


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
        raise ControlError(data.get("error", f"HTTP {response.status}"))
    return data
