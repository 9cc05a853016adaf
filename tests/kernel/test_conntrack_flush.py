"""The conntrack flush paths on real conntrack entries: in-process ctnetlink with one full
dump, with kernel-filtered dumps (exact IPv4 addresses), and the conntrack tool (the
fallback). Each runs in a private network namespace (``unshare -n``), with loopback
connections tracked by a table of its own there. The ``keep_mark`` tests send real TCP from a
subscriber namespace through a gateway namespace whose own small table ct-marks one port with
the portal's bit, and check on all three paths that only the unmarked connections go."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import asyncio, ipaddress, json, socket, subprocess, sys
sys.path.insert(0, sys.argv[2])
from enforcer.conntrack import Conntrack
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["nft", "add table inet ctt; add chain inet ctt c { type filter hook output priority 0; }; "
                       "add rule inet ctt c ct state new counter"], check=True)
servers = {}
for host in ("127.0.0.1", "::1"):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, 0)); s.listen(64); servers[host] = s
def connect(src, dst, n):
    out = []
    for _ in range(n):
        c = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET)
        c.bind((src, 0)); c.connect((dst, servers[dst].getsockname()[1])); out.append(c)
    return out
keep = connect("127.0.0.1", "127.0.0.1", 4) + connect("127.0.0.2", "127.0.0.1", 3) + connect("::1", "::1", 2)
def count(family):
    text = subprocess.run(["conntrack", "-L", "-f", family], capture_output=True, text=True).stdout
    return len([l for l in text.splitlines() if l.strip()])
before = {"ipv4": count("ipv4"), "ipv6": count("ipv6")}
targets = [ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("::1/128")]
observed = []
if sys.argv[1] == "filtered":            # exact IPv4 only: two addresses, one of them without entries
    from enforcer.ctnetlink import Ctnetlink
    netlink = Ctnetlink()
    targets = [ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("127.0.0.9/32")]
    deleted = netlink.flush(targets, filtered=True)
    assert netlink.last_pass == "filtered"
    deleted += netlink.flush([ipaddress.ip_network("::1/128")])      # IPv6: always a full dump
    assert netlink.last_pass == "full"
    used_netlink = True
else:
    ct = Conntrack(netlink=sys.argv[1] == "netlink")
    ct.observe = lambda dump, seconds: observed.append(dump)
    deleted = asyncio.run(ct.flush_now(targets))
    used_netlink = ct._netlink is not None
after = {"ipv4": count("ipv4"), "ipv6": count("ipv6")}
print(json.dumps({"before": before, "after": after, "deleted": deleted, "netlink": used_netlink,
                  "observed": observed}))
"""


@pytest.mark.parametrize("path", ["netlink", "filtered", "tool"])
def test_flush_deletes_only_the_given_sources(path: str) -> None:
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[2])
    run = subprocess.run(["unshare", "-n", sys.executable, "-c", SCRIPT, path, root], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["netlink"] is (path != "tool")
    assert result["before"] == {"ipv4": 7, "ipv6": 2}, result
    # 127.0.0.2 (3 connections) and ::1 (2) go; the 4 connections from 127.0.0.1 stay
    assert result["deleted"] == 5 and result["after"] == {"ipv4": 4, "ipv6": 0}, result
    assert result["observed"] == {"netlink": ["full"], "filtered": [], "tool": ["tool"]}[path], result


BULK = r"""
import ipaddress, json, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
from enforcer.ctnetlink import Ctnetlink
subprocess.run(["nft", "add table inet ctt; add chain inet ctt c { type filter hook forward priority 0; }; "
                       "add rule inet ctt c ct state new counter"], check=True)
with tempfile.NamedTemporaryFile("w", suffix=".ct") as lines:
    for i in range(20000):     # 20,000 in 100.64.0.0/16 (to flush), 100 in 100.65.0.0/24 (to keep)
        lines.write(f"-I -p tcp -s 100.64.{i // 250}.{i % 250 + 1} -d 192.0.2.1 --sport {10000 + i % 50000} "
                    "--dport 443 --state ESTABLISHED -t 600 -u SEEN_REPLY\n")
    for i in range(100):
        lines.write(f"-I -p tcp -s 100.65.0.{i + 1} -d 192.0.2.1 --sport 2000 --dport 443 "
                    "--state ESTABLISHED -t 600 -u SEEN_REPLY\n")
    lines.flush()
    subprocess.run(["conntrack", "-R", lines.name], check=True, capture_output=True)
count = lambda: int(subprocess.run(["conntrack", "-C"], capture_output=True, text=True, check=True).stdout)
before = count()
deleted = Ctnetlink().flush([ipaddress.ip_network("100.64.0.0/16")])
print(json.dumps({"before": before, "deleted": deleted, "after": count()}))
"""


def test_a_bulk_flush_counts_every_delete() -> None:
    """Thousands of deletes at once: their acknowledgements once overflowed the socket buffer."""
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[2])
    run = subprocess.run(["unshare", "-n", sys.executable, "-c", BULK, root], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"before": 20100, "deleted": 20000, "after": 100}, result


# -- keep_mark: a marked connection of the subscriber survives, the unmarked one goes ---------------
#: Held open by the subscriber: connects, says READY, waits until stdin closes (bounded).
HOLD = r"""
import socket, sys, select
conns = {}
for name, host, port in [("marked4", sys.argv[1], 8000), ("plain4", sys.argv[1], 80),
                         ("marked6", sys.argv[2], 8000), ("plain6", sys.argv[2], 80)]:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(5); s.connect((host, port)); conns[name] = s
print("READY", *(s.getsockname()[1] for s in conns.values()), flush=True)
select.select([sys.stdin], [], [], 60)
# still alive? a request on the marked connection must get its answer
s = conns["marked4"]
s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print("ANSWER", data.split(b"\r\n")[0].decode(), data.rsplit(b"\r\n", 1)[-1].decode(), flush=True)
"""

FLUSH = r"""
import asyncio, ipaddress, json, sys
sys.path.insert(0, sys.argv[2])
from enforcer.conntrack import Conntrack
from enforcer.ctnetlink import Ctnetlink
targets = [ipaddress.ip_network(sys.argv[3]), ipaddress.ip_network(sys.argv[4])]
keep = int(sys.argv[5])
if sys.argv[1] == "filtered":
    netlink = Ctnetlink()
    deleted = netlink.flush(targets[:1], filtered=True, keep_mark=keep)
    deleted += netlink.flush(targets[1:], keep_mark=keep)
else:
    ct = Conntrack(netlink=sys.argv[1] == "netlink")
    deleted = asyncio.run(ct.flush_now(targets, keep_mark=keep))
    assert (ct._netlink is not None) is (sys.argv[1] == "netlink")
print(json.dumps(deleted))
"""


def _entries(topo, source4: str, source6: str, ports: set[int] | None = None) -> list[tuple[str, int, int]]:
    """(source, dport, mark) of the gateway's conntrack entries of the subscriber (of its
    ``ports`` only when given: earlier tests' closed connections may linger)."""
    import re
    listing = topo.run(topo.gateway.netns, "conntrack", "-L", "-p", "tcp", check=True).stdout
    out = []
    for line in listing.splitlines():
        src, dport = re.search(r"src=(\S+)", line), re.search(r"dport=(\d+)", line)
        mark = re.search(r"mark=(\d+)", line)
        sport = re.search(r"sport=(\d+)", line)
        if src and src.group(1) in (source4, source6) and (ports is None or int(sport.group(1)) in ports):
            out.append((src.group(1), int(dport.group(1)), int(mark.group(1)) if mark else 0))
    return sorted(out)


@pytest.fixture(scope="module")
def marked_topo():
    from enforcer.dataplane.layout import PORTAL_CT_MARK
    from enforcer.demo.topology import Topology
    with Topology(subscribers=1) as topo:
        topo.serve_http(topo.upstream, "UPSTREAM OK", ports=(80, 8000))
        table = f"ctmark_{topo.tag}"
        topo.run(topo.gateway.netns, "nft", f"add table inet {table}; "
                 f"add chain inet {table} marking {{ type filter hook forward priority 0; }}; "
                 f"add rule inet {table} marking tcp dport 8000 ct mark set ct mark or {PORTAL_CT_MARK:#010x}; "
                 f"add rule inet {table} marking ct state new counter", check=True)
        yield topo


@pytest.mark.parametrize("path", ["netlink", "filtered", "tool"])
def test_flush_spares_the_marked_connection_of_the_same_subscriber(marked_topo, path: str) -> None:
    """Real TCP from a subscriber through a namespace gateway to upstream: port 8000 is
    ct-marked with the portal's bit by the test's own rule, port 80 is not. The flush with
    ``keep_mark`` removes only the unmarked entries, and the marked connection still answers."""
    from pathlib import Path

    from enforcer.dataplane.layout import PORTAL_CT_MARK
    topo = marked_topo
    root = str(Path(__file__).resolve().parents[2])
    sub = topo.subscribers[0]
    holder = topo.popen(sub.netns, sys.executable, "-c", HOLD, topo.upstream.addr4, topo.upstream.addr6,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = holder.stdout.readline().split()
        assert ready[:1] == ["READY"], holder.stderr.read()
        ports = {int(port) for port in ready[1:]}
        before = _entries(topo, sub.addr4, sub.addr6, ports)
        assert before == sorted([(sub.addr4, 80, 0), (sub.addr4, 8000, PORTAL_CT_MARK),
                                 (sub.addr6, 80, 0), (sub.addr6, 8000, PORTAL_CT_MARK)]), before
        unmarked = [e for e in _entries(topo, sub.addr4, sub.addr6) if not e[2] & PORTAL_CT_MARK]
        run = topo.run(topo.gateway.netns, sys.executable, "-c", FLUSH, path, root, f"{sub.addr4}/32",
                       f"{sub.addr6.rsplit(':', 2)[0]}::/64", str(PORTAL_CT_MARK), timeout=30)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout.strip().splitlines()[-1]) == len(unmarked), (run.stdout, unmarked)
        after = _entries(topo, sub.addr4, sub.addr6, ports)
        assert after == sorted([(sub.addr4, 8000, PORTAL_CT_MARK), (sub.addr6, 8000, PORTAL_CT_MARK)]), after
        assert all(e[2] & PORTAL_CT_MARK for e in _entries(topo, sub.addr4, sub.addr6)), "every unmarked one went"
        out, err = holder.communicate("", timeout=15)
        assert "ANSWER HTTP/1.0 200 OK UPSTREAM OK" in out, (out, err)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(5)
