"""``gateway.table`` naming someone else's table (SPEC 7: own exactly one table, never touch another).

``gateway.table: filter`` names Debian's own ``inet filter``: the first full sync replaced it,
wiping the operator's rules. Now ``run`` asks the kernel whose table it is before anything
touches the kernel, the state or a socket, and refuses with one line when it is not ours. Ours
is a table with the ``layouttag`` set, or (a table made before that set existed) the comments
every table of ours has carried since the first release. Here the kernel's answers are scripted;
tests/kernel/test_gateway_table_not_ours.py asks a real one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import enforcer.service as service
from enforcer.config import load_config
from enforcer.dataplane import kernel
from enforcer.dataplane.backend import DataplaneError
from enforcer.dataplane.kernel import Ownership, table_owner
from enforcer.dataplane.layout import Layout
from enforcer.dataplane.libnftables import NftError

MISSING = "Error: No such file or directory\nlist set inet filter layouttag\n              ^^^^^^"
META = {"metainfo": {"version": "1.0.6", "json_schema_version": 1}}


class ScriptedNft:
    """Answers ``run``/``run_json`` from what a kernel holding ``tables`` would say: name → (JSON
    objects after the table's own, text listing)."""

    def __init__(self, tables: dict[str, tuple[list[dict[str, Any]], str]], fail: str | None = None) -> None:
        self.tables, self.fail = tables, fail
        self.asked: list[str] = []

    def _table(self, command: str) -> str:
        name = command.split()[3]
        if name not in self.tables:
            raise NftError(MISSING)
        return name

    def run_json(self, command: str) -> dict[str, Any]:
        self.asked.append(command)
        if self.fail is not None:
            raise NftError(self.fail)
        if command == "list tables inet":
            return {"nftables": [META, *({"table": {"family": "inet", "name": n, "handle": 1}} for n in self.tables)]}
        name = self._table(command)
        objects = self.tables[name][0]
        if command.startswith("list set "):
            wanted = command.split()[4]
            if not any(obj.get("set", {}).get("name") == wanted for obj in objects):
                raise NftError(MISSING)
            return {"nftables": [META, *(o for o in objects if o.get("set", {}).get("name") == wanted)]}
        return {"nftables": [META, {"table": {"family": "inet", "name": name, "handle": 1}}, *objects]}

    def run(self, command: str) -> str:
        self.asked.append(command)
        return self.tables[self._table(command)][1]


FILTER_RULES = [
    {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1, "type": "filter",
               "hook": "input", "prio": 0, "policy": "drop"}},
    {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 2,
              "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                  "right": 22}}, {"accept": None}]}},
]
FILTER_TEXT = ("table inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n"
               "\t\ttcp dport 22 accept\n\t}\n}\n")
#: Ours today: the layout's own rendering has the set.
OURS_NOW = [{"set": {"family": "inet", "name": "layouttag", "table": "walled_garden", "type": "ipv6_addr"}}]
#: Ours from before ``layouttag``: only the table comment and the ``layout`` chain's rule.
OURS_EARLY_TEXT = ('table inet walled_garden {\n\tcomment "managed by walled-garden; do not edit: changes are '
                   'overwritten"\n\tchain layout {\n\t\tcounter packets 0 bytes 0 comment "walled-garden layout '
                   '0123456789abcdef"\n\t}\n}\n')
OURS_EARLY = [{"chain": {"family": "inet", "table": "walled_garden", "name": "layout", "handle": 1}},
              {"rule": {"family": "inet", "table": "walled_garden", "chain": "layout", "handle": 2,
                        "comment": "walled-garden layout 0123456789abcdef", "expr": [{"counter": {}}]}}]


def test_the_layout_still_carries_every_mark_the_check_looks_for() -> None:
    """The marks ``table_owner`` reads are the ones our rendering writes; drop one and older tables
    of ours, or ours of today, would be taken for someone else's."""
    rendered = Layout(table="walled_garden", interfaces=("eth1",), allow=(), dns=None, portal_port=8080).render()
    assert "set layouttag {" in rendered
    assert 'comment "managed by walled-garden; do not edit: changes are overwritten"' in rendered
    assert 'comment "walled-garden layout ' in rendered


@pytest.mark.parametrize(("tables", "table", "owner"), [
    ({}, "walled_garden", Ownership.ABSENT),
    ({"filter": (FILTER_RULES, FILTER_TEXT)}, "walled_garden", Ownership.ABSENT),
    ({"walled_garden": (OURS_NOW, "")}, "walled_garden", Ownership.OURS),
    ({"walled_garden": (OURS_EARLY, OURS_EARLY_TEXT)}, "walled_garden", Ownership.OURS),
    ({"filter": (FILTER_RULES, FILTER_TEXT)}, "filter", Ownership.FOREIGN),
    ({"filter": ([], "table inet filter {\n}\n")}, "filter", Ownership.EMPTY),
])
def test_whose_table_it_is(tables: dict[str, tuple[list[dict[str, Any]], str]], table: str,
                           owner: Ownership) -> None:
    assert table_owner(table, ScriptedNft(tables)) is owner  # type: ignore[arg-type]


def test_a_table_of_ours_with_layouttag_costs_two_small_listings() -> None:
    nft = ScriptedNft({"walled_garden": (OURS_NOW, "")})
    table_owner("walled_garden", nft)  # type: ignore[arg-type]
    assert nft.asked == ["list tables inet", "list set inet walled_garden layouttag"]


def test_a_kernel_that_cannot_be_asked_is_an_error_not_a_guess() -> None:
    with pytest.raises(DataplaneError, match="Operation not permitted"):
        table_owner("filter", ScriptedNft({}, fail="Error: Operation not permitted"))  # type: ignore[arg-type]


# -- run refuses, touching nothing ------------------------------------------------------------------

def _config(tmp_path: Path, table: str, backend: str = "nftables") -> Any:
    (tmp_path / "l.yaml").write_text("subscribers: []\n")
    raw = {"state_dir": str(tmp_path / "state"), "subscribers": {"source": str(tmp_path / "l.yaml")},
           "gateway": {"table": table, "backend": backend},
           "api": {"socket": str(tmp_path / "control.sock"), "listen": None},
           "metrics": {"listen": None, "portal_listen": None}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    return load_config(str(tmp_path / "config.yaml"))


class Started(Exception):
    """The daemon went on past the start checks."""


@pytest.fixture
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """``run`` must stop before building anything: past the checks, this raises ``Started``."""
    def started(*args: Any, **kwargs: Any) -> Any:
        raise Started()
    monkeypatch.setattr(service, "setup_logging", lambda: None)
    monkeypatch.setattr(service, "Enforcer", started)
    monkeypatch.setattr(service.WorkerBridge, "spawn_early", started)


@pytest.mark.parametrize("backend", ["nftables", "ipset"])
def test_run_refuses_someone_elses_table_with_one_line_and_touches_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_daemon: None,
        backend: str) -> None:
    """Also with the ipset backend: it deletes ``inet <gateway.table>`` once its sets are in place
    (``backend_switch``)."""
    config = _config(tmp_path, "filter", backend)
    monkeypatch.setattr(kernel, "table_owner", lambda table, nft=None: Ownership.FOREIGN, raising=False)
    assert service.run(config) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("gateway.table: table inet filter exists and is not walled-garden's"), err
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["lock"]   # no state opened
    assert not (tmp_path / "control.sock").exists()


@pytest.mark.parametrize("owner", [Ownership.ABSENT, Ownership.OURS, Ownership.EMPTY])
def test_run_goes_on_with_our_table_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_daemon: None,
                                            owner: Ownership) -> None:
    monkeypatch.setattr(kernel, "table_owner", lambda table, nft=None: owner, raising=False)
    with pytest.raises(Started):
        service.run(_config(tmp_path, "walled_garden"))


def test_run_refuses_when_the_kernel_cannot_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], no_daemon: None) -> None:
    def unknown(table: str, nft: Any = None) -> Ownership:
        raise DataplaneError("list tables inet: Error: Operation not permitted\nlist tables inet\n^^^^")
    monkeypatch.setattr(kernel, "table_owner", unknown, raising=False)
    assert service.run(_config(tmp_path, "walled_garden")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gateway.table: cannot tell whether table inet walled_garden"), err


def test_without_libnftables_there_is_no_table_to_lose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       no_daemon: None) -> None:
    def no_library(table: str, nft: Any = None) -> Ownership:
        raise NftError("libnftables not found")
    monkeypatch.setattr(kernel, "table_owner", no_library, raising=False)
    with pytest.raises(Started):
        service.run(_config(tmp_path, "walled_garden", "ipset"))


def test_the_scripted_answers_are_shaped_like_nfts() -> None:
    """Keeps ``ScriptedNft`` honest: its JSON is what ``nft -j`` prints (an object with a list)."""
    answer = ScriptedNft({"filter": (FILTER_RULES, FILTER_TEXT)}).run_json("list table inet filter")
    assert json.loads(json.dumps(answer))["nftables"][1]["table"]["name"] == "filter"
