"""The conntrack flush paths on real conntrack entries: in-process ctnetlink with one full
dump, with kernel-filtered dumps (exact IPv4 addresses), and the conntrack tool (the
fallback). Each runs in a private network namespace (``unshare -n``), with loopback
connections tracked by a table of its own there."""

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
        lines.write(f"-I -p tcp -s 100.64.{i // 250}.{i % 250 + 1} -d 192.0.2.1 --sport {10000 + i % 50000} --dport 443 "
                    "--state ESTABLISHED -t 600 -u SEEN_REPLY\n")
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
