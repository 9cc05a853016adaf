"""The real backend: our table in the kernel, through libnftables."""

from __future__ import annotations

import re
from typing import Any

from .backend import DataplaneError
from .libnftables import Nftables, NftError
from .state import TableState
from .transaction import Transaction

_TAG = re.compile(r"walled-garden layout ([0-9a-f]+)")


class KernelDataplane:
    """Owns exactly one ``inet`` table; never touches the rest of the ruleset."""

    def __init__(self, table: str, nft: Nftables | None = None) -> None:
        self.table = table
        self._nft = nft or Nftables()

    def apply(self, tx: Transaction) -> None:
        if not tx:
            return
        try:
            self._nft.run(tx.render())
        except NftError as exc:
            raise DataplaneError(str(exc)) from None

    def read(self) -> TableState | None:
        try:
            data = self._nft.run_json(f"list table inet {self.table}")
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise DataplaneError(str(exc)) from None
        return parse_listing(data, self.table)

    def layout_tag(self) -> str | None:
        """The layout tag of our table in the kernel, listing one small chain; None if the table is gone."""
        try:
            data = self._nft.run_json(f"list chain inet {self.table} layout")
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise DataplaneError(str(exc)) from None
        for obj in data.get("nftables", []):
            match = _TAG.search((obj.get("rule") or {}).get("comment", ""))
            if match:
                return match.group(1)
        return None

    def counters(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) of our named counters, cheap: no set contents are listed."""
        try:
            data = self._nft.run_json(f"list counters table inet {self.table}")
        except NftError:
            return {}
        out: dict[str, tuple[int, int]] = {}
        for obj in data.get("nftables", []):
            counter = obj.get("counter")
            if counter and counter.get("table") == self.table:
                out[counter["name"]] = (int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
        return out


def parse_listing(data: dict[str, Any], table: str) -> TableState:
    """``nft -j list table`` output → layout tag and elements of every set and map."""
    state = TableState(layout_tag=None)
    for obj in data.get("nftables", []):
        if "rule" in obj and obj["rule"].get("chain") == "layout":
            match = _TAG.search(obj["rule"].get("comment", ""))
            if match:
                state.layout_tag = match.group(1)
        for kind in ("set", "map"):
            if kind in obj and obj[kind].get("table") == table:
                state.elements[obj[kind]["name"]] = dict(_element(e) for e in obj[kind].get("elem", []))
    return state


def _element(raw: Any) -> tuple[str, str | None]:
    if isinstance(raw, list):  # map element: [key, verdict]
        key, value = raw
        (verb, arg), = value.items()
        target = arg.get("target") if isinstance(arg, dict) else None
        return _key(key), f"{verb} {target}" if target else verb
    return _key(raw), None


def _key(raw: Any) -> str:
    if isinstance(raw, dict) and "prefix" in raw:
        return f"{raw['prefix']['addr']}/{raw['prefix']['len']}"
    if isinstance(raw, dict) and "elem" in raw:
        return _key(raw["elem"]["val"])
    return str(raw)
