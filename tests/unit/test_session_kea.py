"""Kea memfile parsing and following. ``data/leases/kea-leases{4,6}.csv`` were written by the
real Kea 2.2 (Debian bookworm) for udhcpc and dhclient -6 (address + prefix delegation, then a
release) clients in network namespaces. The relay-agent rows follow Kea's ``user_context``
(``store-extended-info``) format; the LFC steps follow Kea's ``lfcExecute`` and ``kea-lfc``."""

from __future__ import annotations

import os
from pathlib import Path

from enforcer.match import Match
from enforcer.sessions.kea import KeaSource
from session_helpers import RecordingSink

NOW = 1796092000.0
DATA = Path(__file__).parent / "data" / "leases"
H4 = "address,hwaddr,client_id,valid_lifetime,expire,subnet_id,fqdn_fwd,fqdn_rev,hostname,state,user_context\n"
H6 = ("address,duid,valid_lifetime,expire,subnet_id,pref_lifetime,lease_type,iaid,prefix_len,fqdn_fwd,fqdn_rev,"
      "hostname,hwaddr,state,user_context,hwtype,hwaddr_source\n")


def row4(address: str, mac: str = "02:00:00:00:10:01", valid: int = 3600, expire: int = 1796095685,
         state: int = 0, hostname: str = "", context: str = "") -> str:
    return f"{address},{mac},01:{mac},{valid},{expire},1,0,0,{hostname},{state},{context}\n"


async def read(path: Path, sink: RecordingSink | None = None) -> tuple[KeaSource, RecordingSink]:
    sink = sink or RecordingSink()
    source = KeaSource("kea", path, 0.01, clock=lambda: NOW)
    await source.poll(sink)
    return source, sink


async def test_the_real_v4_file() -> None:
    _, sink = await read(DATA / "kea-leases4.csv")
    assert {k: (s.match, s.expires, s.detail) for (_, k), s in sink.current.items()} == {
        "192.0.2.100": (Match(mac="02:00:00:00:10:01"), 1796095685.0, "lease 192.0.2.100, hostname pc1"),
        "192.0.2.101": (Match(mac="02:00:00:00:10:02"), 1796095685.0, "lease 192.0.2.101"),
    }
    assert sink.calls[0][0] == "replace" and sink.calls[0][1]["complete"] is True


async def test_the_real_v6_file_address_prefix_and_release() -> None:
    source, sink = await read(DATA / "kea-leases6.csv")
    assert {k: [str(a) for a in s.addresses] for (_, k), s in sink.current.items()} == {
        "2001:db8:1::100": ["2001:db8:1::100/128"],
        "2001:db8:100::/56": ["2001:db8:100::/56"],        # the delegated prefix is the subscriber's too
    }                                                       # 2001:db8:1::101 was released (valid_lifetime 0)
    assert all(s.match == Match(mac="02:00:00:00:10:01") for s in sink.current.values())
    assert source.status()["skipped"] == {"released": 1}


async def test_v6_mac_from_the_duid_when_kea_has_no_hwaddr(tmp_path: Path) -> None:
    path = tmp_path / "kea-leases6.csv"
    path.write_text(H6 +
        "2001:db8:1::5,00:01:00:01:32:a0:ed:36:02:00:00:00:10:05,7200,1796099288,1,3600,0,1,128,0,0,,,0,,,\n"
        "2001:db8:1::6,00:02:00:00:ab:11:01:02:03:04,7200,1796099288,1,3600,0,1,128,0,0,,,0,,,\n")
    source, sink = await read(path)
    assert {k: s.match.mac for (_, k), s in sink.current.items()} == {"2001:db8:1::5": "02:00:00:00:10:05"}
    assert source.status()["skipped"] == {"no_mac": 1}


async def test_last_row_wins_and_leases_not_in_use_are_no_sessions(tmp_path: Path) -> None:
    path = tmp_path / "kea-leases4.csv"
    path.write_text(H4 + row4("192.0.2.10", "02:00:00:00:10:01") + row4("192.0.2.10", "02:00:00:00:10:02")
                    + row4("192.0.2.11") + row4("192.0.2.11", valid=0)                  # released
                    + row4("192.0.2.12", state=1) + row4("192.0.2.13", state=2)         # declined, reclaimed
                    + row4("192.0.2.14", expire=1796091000)                             # expired
                    + row4("192.0.2.15", valid=4294967295, expire=6091059295))          # infinite
    source, sink = await read(path)
    assert {k: s.match.mac for (_, k), s in sink.current.items()} == {
        "192.0.2.10": "02:00:00:00:10:02", "192.0.2.15": "02:00:00:00:10:01"}
    assert sink.current[("kea", "192.0.2.15")].expires is None
    assert source.status()["skipped"] == {"released": 1, "not_in_use": 2, "expired": 1}


async def test_relay_agent_circuit_and_remote_id(tmp_path: Path) -> None:
    path = tmp_path / "kea-leases4.csv"
    text_ids = '{ "ISC": { "relay-agent-info": "0x01086F6C74312F312F3302066F6E742D3737" } }'    # olt1/1/3, ont-77
    binary = '{ "ISC": { "relay-agent-info": { "sub-options": "0x01020A0B", "remote-id": "0A0B" } } }'
    path.write_text(H4 + row4("192.0.2.20", context=text_ids.replace(",", "&#x2c"), hostname="a&#x2cb")
                    + row4("192.0.2.21", mac="", context=binary.replace(",", "&#x2c")))
    _, sink = await read(path)
    assert sink.current[("kea", "192.0.2.20")].match == Match(circuit_id="olt1/1/3", remote_id="ont-77",
                                                               mac="02:00:00:00:10:01")
    assert sink.current[("kea", "192.0.2.20")].detail == "lease 192.0.2.20, hostname a,b"
    assert sink.current[("kea", "192.0.2.21")].match == Match(circuit_id="0a0b")   # not printable: hex


async def test_a_malformed_row_is_reported_and_the_set_is_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "kea-leases4.csv"
    path.write_text(H4 + row4("192.0.2.10") + "192.0.2.11,02:00:00:00:10:01,3600\n"
                    + row4("192.0.2.12", context="{not json"))
    _, sink = await read(path)
    assert sink.kinds() == ["malformed", "malformed"]
    assert sink.problems[0][2] == f"{path}:3: 3 columns, the header has 11"
    assert sink.problems[1][2].startswith(f"{path}:4: user_context is not JSON")
    assert sink.keys() == {"192.0.2.10"} and sink.calls[0][1]["complete"] is False


async def test_appended_rows_are_read_incrementally_and_a_half_row_waits(tmp_path: Path) -> None:
    path = tmp_path / "kea-leases4.csv"
    path.write_text(H4 + row4("192.0.2.10"))
    source, sink = await read(path)
    with path.open("a") as handle:
        handle.write(row4("192.0.2.11") + row4("192.0.2.10", valid=0) + row4("192.0.2.12")[:15])
    await source.poll(sink)
    assert sink.calls[-1][0] == "update"
    assert [s.key for s in sink.calls[-1][1]["started"]] == ["192.0.2.11"]
    assert sink.calls[-1][1]["stopped"] == ["192.0.2.10"]
    with path.open("a") as handle:
        handle.write(row4("192.0.2.12")[15:] + "bad\n")
    await source.poll(sink)
    assert [s.key for s in sink.calls[-1][1]["started"]] == ["192.0.2.12"]
    assert sink.problems[-1][2].startswith(f"{path}:6: 1 columns")       # line numbers go on counting
    assert sink.keys() == {"192.0.2.11", "192.0.2.12"} and source.status()["sessions"] == 2


async def test_lease_file_cleanup_gives_the_same_set(tmp_path: Path) -> None:
    path = tmp_path / "kea-leases4.csv"
    path.write_text(H4 + row4("192.0.2.10") + row4("192.0.2.11") + row4("192.0.2.11", valid=0))
    source, sink = await read(path)
    before = dict(sink.current)
    os.rename(path, f"{path}.1")                      # Kea: the lease file becomes .1, a new one starts
    path.write_text(H4 + row4("192.0.2.12"))
    await source.poll(sink)
    assert sink.calls[-1][0] == "replace" and sink.keys() == {"192.0.2.10", "192.0.2.12"}
    (tmp_path / "kea-leases4.csv.completed").write_text(H4 + row4("192.0.2.10"))   # kea-lfc: .2 + .1 compacted
    await source.poll(sink)
    os.rename(f"{path}.completed", f"{path}.2")
    os.unlink(f"{path}.1")
    await source.poll(sink)
    assert sink.keys() == {"192.0.2.10", "192.0.2.12"}
    assert sink.current[("kea", "192.0.2.10")] == before[("kea", "192.0.2.10")]
    assert all(call["complete"] for kind, call in sink.calls if kind == "replace") and not sink.problems


async def test_not_a_lease_file(tmp_path: Path) -> None:
    path = tmp_path / "kea-leases4.csv"
    path.write_text("ip,mac\n192.0.2.1,02:00:00:00:10:01\n")
    _, sink = await read(path)
    assert sink.kinds() == ["malformed"] and "not a Kea lease file header" in sink.problems[0][2]
    assert sink.calls[0][1]["complete"] is False
