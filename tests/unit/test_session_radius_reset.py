"""Accounting-On/Off starts a NAS afresh, and a Start ignored as stale is visible.

Found by a SPEC §9 audit: a NAS numbers its sessions afresh after a reboot. Start 00000001
(c1001@isp, 100.64.3.20), Stop, Accounting-On, then Start 00000001 again (100.64.3.21): the
second Start was answered but taken for a late copy of the first (the Stop's 600 s tombstone
outlived the reboot), so the new session was not enforced for up to ten minutes, its
Interim-Updates neither, and nothing counted it. The receiver on loopback with a recording sink.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from test_session_radius import WAIT, Sink, exchange, receiver, request, start, stop

NAS = "192.0.2.2"
USER = "c1001@isp"


def on(nas: str = NAS, status: str = "Accounting-On") -> Any:
    return request(Acct_Status_Type=status, NAS_IP_Address=nas)


@pytest.mark.parametrize("reset", ["Accounting-On", "Accounting-Off"])
async def test_a_rebooted_nas_reusing_a_stopped_session_id_is_enforced(reset: str) -> None:
    sink = Sink()
    async with receiver(sink) as (source, client):
        await exchange(client, start("00000001", nas=NAS, User_Name=USER, Framed_IP_Address="100.64.3.20"))
        await exchange(client, stop("00000001", nas=NAS))
        await exchange(client, on(status=reset))
        await exchange(client, start("00000001", nas=NAS, User_Name=USER, Framed_IP_Address="100.64.3.21"))
        assert sink.keys("radius") == {f"{NAS}/00000001"}, "the new session after the reboot is not enforced"
        assert sink.current[("radius", f"{NAS}/00000001")].addresses[0].network_address.exploded == "100.64.3.21"
        await exchange(client, start("00000001", status="Interim-Update", nas=NAS, User_Name=USER,
                                     Framed_IP_Address="100.64.3.22"))
        assert sink.current[("radius", f"{NAS}/00000001")].addresses[0].network_address.exploded == "100.64.3.22"
        assert source.status()["stale"] == 0


async def test_a_reset_of_another_nas_keeps_this_nas_stopped_keys() -> None:
    sink = Sink()
    async with receiver(sink) as (source, client):
        await exchange(client, start("00000001", nas=NAS, Framed_IP_Address="100.64.3.20"))
        await exchange(client, stop("00000001", nas=NAS))
        await exchange(client, on(nas="192.0.2.3"))
        await exchange(client, start("00000001", status="Interim-Update", nas=NAS, Framed_IP_Address="100.64.3.20"))
        assert sink.keys("radius") == set(), "a late Interim-Update of this NAS still does not revive its session"
        assert source.status()["stale"] == 1


async def test_a_start_ignored_for_a_recent_stop_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink()
    with caplog.at_level(logging.INFO, logger="enforcer.sessions.radius"):
        async with receiver(sink) as (source, client):
            await exchange(client, start("s1", nas=NAS))
            await exchange(client, stop("s1", nas=NAS))
            await exchange(client, start("s1", status="Interim-Update", nas=NAS))
            assert source.status()["stale"] == 1
    [line] = [r.getMessage() for r in caplog.records if "radius_stale_ignored" in r.getMessage()]
    assert f"session={NAS}/s1" in line and "status=Interim-Update" in line


async def test_a_packet_after_the_reset_equal_to_one_still_in_flight_is_not_a_duplicate() -> None:
    """RFC 5080 duplicate detection keys on source, Identifier and Request Authenticator; a NAS
    that rebooted reuses Identifiers, so the same octets after its Accounting-On are a new
    packet. Taken as a duplicate, its answer came from the pre-reboot Start, which the reset
    then stopped: answered, and not enforced."""
    sink = Sink()
    sink.gate = asyncio.Event()
    async with receiver(sink) as (source, client):
        raw = start("00000001", nas=NAS, Framed_IP_Address="100.64.3.20").RequestPacket()
        client.send(raw)
        await asyncio.wait_for(sink.called.wait(), WAIT)     # held in its commit
        client.send(on().RequestPacket())
        client.send(raw)                                     # the rebooted NAS, same Identifier and octets
        await asyncio.sleep(0.2)
        sink.gate.set()
        for _ in range(3):
            await client.reply()
        assert source.status()["duplicates"] == 0
    assert [(len(started), stopped) for started, stopped in sink.updates] == [
        (1, []), (0, [f"{NAS}/00000001"]), (1, [])]
    assert sink.keys("radius") == {f"{NAS}/00000001"}


async def test_a_reset_behind_a_proxy_keeps_the_other_nases_duplicates_detected() -> None:
    """Behind a RADIUS proxy many NASes share one source address: one NAS's Accounting-On
    forgets only its own packets in flight; another NAS's retransmission is still a duplicate."""
    sink = Sink()
    sink.gate = asyncio.Event()
    async with receiver(sink) as (source, client):
        other = start("00000009", nas="192.0.2.3", Framed_IP_Address="100.64.3.30").RequestPacket()
        client.send(other)
        await asyncio.wait_for(sink.called.wait(), WAIT)     # held in its commit
        client.send(on().RequestPacket())                    # NAS 192.0.2.2 rebooted, same proxy address
        client.send(other)                                   # 192.0.2.3 resends: still the same packet
        await asyncio.sleep(0.2)
        sink.gate.set()
        for _ in range(2):
            await client.reply()
        assert source.status()["duplicates"] == 1
