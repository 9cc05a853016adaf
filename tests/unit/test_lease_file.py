"""The lease file watcher: no half-written read is trusted, a missing file keeps sessions,
a change the sink could not commit is delivered again (driven through the dnsmasq source)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from enforcer.sessions.dnsmasq import DnsmasqSource
from enforcer.sessions.lease_file import Reading, Stamps, mac_from_duid
from session_helpers import RecordingSink

NOW = 1796092000.0
A = "1796095675 02:00:00:00:10:01 192.0.2.149 pc1 *\n"
B = "1796095675 02:00:00:00:10:02 192.0.2.150 * *\n"


def source(path: Path) -> DnsmasqSource:
    return DnsmasqSource("dnsmasq", path, 0.01, clock=lambda: NOW)


class Rewriting(DnsmasqSource):
    """Runs ``during`` inside its first read: a writer acting while the file is read."""

    def __init__(self, path: Path, during: list[str]) -> None:
        super().__init__("dnsmasq", path, 0.01, clock=lambda: NOW)
        self.during = during
        self.reads = 0

    def parse(self, before: Stamps, previous: Stamps | None, now: float) -> Reading:
        reading = super().parse(before, previous, now)
        self.reads += 1
        if self.during:
            with open(self.path, "r+") as handle:     # in place, like dnsmasq: same inode
                handle.truncate(0)
                handle.write(self.during.pop(0))
        return reading


async def test_a_missing_file_is_reported_once_and_keeps_the_sessions(tmp_path: Path) -> None:
    path = tmp_path / "dnsmasq.leases"
    path.write_text(A)
    sink, watcher = RecordingSink(), source(path)
    await watcher.poll(sink)
    assert sink.keys() == {"192.0.2.149"}
    path.unlink()
    for _ in range(3):
        await watcher.poll(sink)
    assert sink.kinds() == ["unreadable"]
    assert "no such file" in sink.problems[0][2] and str(path) in sink.problems[0][2]
    assert sink.keys() == {"192.0.2.149"}
    assert [c for c, _ in sink.calls] == ["replace"]            # never replaced with nothing
    path.write_text(A + B)
    await watcher.poll(sink)
    assert sink.keys() == {"192.0.2.149", "192.0.2.150"}
    path.unlink()
    await watcher.poll(sink)
    assert sink.kinds() == ["unreadable", "unreadable"]          # a new state, reported again


async def test_a_file_ending_mid_line_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "dnsmasq.leases"
    path.write_text(A + B)
    sink, watcher = RecordingSink(), source(path)
    await watcher.poll(sink)
    path.write_text(A + B[:20])                       # dnsmasq caught between truncate and last write
    await watcher.poll(sink)
    assert len(sink.calls) == 1 and watcher.status()["retries"] >= watcher.RETRIES
    assert sink.keys() == {"192.0.2.149", "192.0.2.150"} and not sink.problems
    path.write_text(A)
    await watcher.poll(sink)
    assert sink.keys() == {"192.0.2.149"}


async def test_a_file_changing_while_read_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "dnsmasq.leases"
    path.write_text(A)
    sink = RecordingSink()
    watcher = Rewriting(path, during=[A + B])         # the read saw A; the file is A + B by then
    await watcher.poll(sink)
    assert watcher.reads == 2
    assert len(sink.calls) == 1 and sink.keys() == {"192.0.2.149", "192.0.2.150"}


async def test_an_emptied_file_is_confirmed_before_the_sessions_end(tmp_path: Path) -> None:
    path = tmp_path / "dnsmasq.leases"
    path.write_text(A + B)
    sink, watcher = RecordingSink(), source(path)
    await watcher.poll(sink)
    path.write_text("")
    watcher_ = Rewriting(path, during=[A + B])        # truncated; the rewrite lands while we look
    watcher_._seen, watcher_._status["sessions"] = watcher._seen, 2
    await watcher_.poll(sink)
    assert all(call["sessions"] for _, call in sink.calls)       # never reported empty
    assert sink.keys() == {"192.0.2.149", "192.0.2.150"}
    path.write_text("")                               # really empty: confirmed, then ended
    await watcher_.poll(sink)
    assert sink.keys() == set() and sink.calls[-1][1]["complete"] is True


async def test_a_change_the_sink_could_not_commit_is_delivered_again(tmp_path: Path) -> None:
    path = tmp_path / "dnsmasq.leases"
    path.write_text(A)
    sink, watcher = RecordingSink(fail=1), source(path)
    await watcher.poll(sink)
    assert sink.calls == [("failed", "replace")] and sink.keys() == set()
    assert "not committed" in watcher.status()["last_problem"]
    await watcher.poll(sink)                          # the file did not change: delivered again
    assert sink.keys() == {"192.0.2.149"}
    await watcher.poll(sink)
    assert len(sink.calls) == 2


async def test_bad_lines_are_reported_once_while_they_stay(tmp_path: Path) -> None:
    path = tmp_path / "dnsmasq.leases"
    path.write_text(A + "garbage\n")
    sink, watcher = RecordingSink(), source(path)
    await watcher.poll(sink)
    path.write_text(B + A + "garbage\n")              # rewritten, the bad line still there
    await watcher.poll(sink)
    assert sink.kinds() == ["malformed"]
    assert sink.problems[0][2].startswith(f"{path}:2: 1 fields")
    assert [call["complete"] for _, call in sink.calls] == [False, False]


async def test_outside_prefixes_is_reported_and_the_rest_stays_complete(tmp_path: Path) -> None:
    path = tmp_path / "dnsmasq.leases"
    path.write_text(A + "1796095675 02:00:00:00:10:09 203.0.113.9 * *\n")
    sink, watcher = RecordingSink(prefixes=("192.0.2.0/24",)), source(path)
    await watcher.poll(sink)
    path.write_text(A + "1796095675 02:00:00:00:10:09 203.0.113.9 x *\n")
    await watcher.poll(sink)
    assert sink.kinds() == ["outside_prefixes"]
    assert "203.0.113.9" in sink.problems[0][2] and "mac=02:00:00:00:10:09" in sink.problems[0][2]
    assert sink.keys() == {"192.0.2.149"} and sink.calls[-1][1]["complete"] is True


async def test_run_follows_the_file_and_status_says_where_it_is(tmp_path: Path) -> None:
    path = tmp_path / "dnsmasq.leases"
    path.write_text(A)
    written = path.stat().st_mtime_ns / 1e9
    sink, watcher = RecordingSink(), source(path)
    task = asyncio.create_task(watcher.run(sink))
    try:
        await sink.wait_for(lambda: sink.keys() == {"192.0.2.149"})
        replacement = tmp_path / "new"
        replacement.write_text(B)
        os.replace(replacement, path)                 # a rename-replace is followed as well
        await sink.wait_for(lambda: sink.keys() == {"192.0.2.150"})
        assert sink.calls[0][1]["observed"] == written        # when the server wrote it
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    status = watcher.status()
    assert status["path"] == str(path) and status["kind"] == "dnsmasq" and status["sessions"] == 1
    assert status["last_read"] == NOW and status["lines_skipped"] == 0 and status["last_problem"] is None


def test_mac_from_duid() -> None:
    assert mac_from_duid("00:03:00:01:02:00:00:00:10:01") == "02:00:00:00:10:01"               # DUID-LL
    assert mac_from_duid("00:01:00:01:32:a0:ed:2c:02:00:00:00:10:02") == "02:00:00:00:10:02"   # DUID-LLT
    assert mac_from_duid("00020000ab11aabbccdd") is None                                       # DUID-EN
    assert mac_from_duid("00:03:00:20:02:00:00:00:10:01") is None                              # not Ethernet
    assert mac_from_duid("00:03:00:01:02:00") is None and mac_from_duid("zz") is None
