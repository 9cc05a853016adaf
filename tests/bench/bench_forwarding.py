"""Forwarding cost of the table: small-UDP packets/s through a gateway, product table vs conntrack only.

    sudo .venv/bin/python tests/bench/bench_forwarding.py [--sizes 0,1000,100000] [--rounds 5] [--seconds 5]

Issue 16 asks that the table cost an unrestricted subscriber's packets almost nothing next to the
kernel's own forwarding with conntrack. This bench measures it, and only measures (no layout of
its own): three namespaces of its own, ``sender -> gateway -> receiver``::

    <tag>s  100.127.255.10/24 --veth-- 100.127.255.1  <tag>g  198.51.100.1 --veth-- 198.51.100.10/24  <tag>r

The sender (an unrestricted subscriber: no restricted entry is its address) sends iperf3 UDP
with 18-byte payloads, i.e. 64-byte Ethernet frames with the FCS, as fast as it can; the figure
is the receiver interface's ``rx_packets`` over a fixed window (after a warm-up second), so
socket drops at the iperf3 server do not count against the gateway. Two gateway tables:

(a) *conntrack-only*: a forward chain with only ``ct state established,related accept``
    (registers conntrack in the namespace; the UDP stream stays "new", so it falls to the
    accept policy), the reference of issue 16;
(b) (a) plus the product's table exactly as ``walled-garden render`` prints it for a list of
    N restricted subscribers (100.64.0.1.., every fourth also with a 2001:db8::/56, so 100,000
    are 125,000 addresses; none is the sender), the gateway's subscriber interface configured
    as the sender's side. (a)'s chain sits at priority ``filter``, after the product's, so (b)
    costs exactly what the product table adds.

Rounds alternate (a b a b ..., per size) in one run because the 2-vCPU machine is shared and
noisy; the report is the median pps of each and the median and range of the per-pair ratio
b/a. ``--breakdown`` adds variants of (b), the rendered text edited by this script only for the
measurement, to show what costs what: the interface jumps without the address tests behind
them, an empty ``forward`` base chain (the price of one hook), and no chain on the path.
With veth, the gateway's work runs in the sender's softirq on the same CPU as its ``sendto``,
so the figure is "sender + gateway + receiver per packet" and the table's share is diluted
by the sender's syscall cost: a ratio of 0.97 here is a larger relative cost inside the
gateway alone.

Needs iperf3 (not installed by .ci/install; this bench is not part of CI):
``apt-get install -y iperf3``. pktgen would not need a sender process, but the kernel here has
no CONFIG_NET_PKTGEN. Safety: documentation/CGNAT addresses only, no default route anywhere,
namespaces and processes removed on any exit (finally, atexit, SIGTERM/SIGINT/SIGHUP), every
wait bounded.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]

SENDER4, GW_SUB4, GW_UP4, RECEIVER4 = "100.127.255.10", "100.127.255.1", "198.51.100.1", "198.51.100.10"
PAYLOAD = 18  # 14 Ethernet + 20 IPv4 + 8 UDP + 18 = 60 bytes, 64 on the wire with the FCS
PRODUCT_TABLE = "wg_fwdbench"
BASELINE = """table inet ctonly {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
    }
}
"""
CMD_TIMEOUT = 30.0  # one ip/nft/render call (render of 100k takes ~4 s)


class Lab:
    """Namespaces sender / gateway / receiver and the iperf3 server; ``close()`` removes all."""

    def __init__(self) -> None:
        tag = "fb" + secrets.token_hex(3)
        self.sender, self.gateway, self.receiver = f"{tag}s", f"{tag}g", f"{tag}r"
        self.sub_if, self.up_if = f"{tag}gs", f"{tag}gu"   # in the gateway
        self.snd_if, self.rcv_if = f"{tag}s0", f"{tag}r0"  # in sender / receiver
        self.server: subprocess.Popen[bytes] | None = None
        self.port = 20000 + secrets.randbelow(20000)
        self._made: list[str] = []
        self._closed = False

    def ns(self, netns: str, *cmd: str, timeout: float = CMD_TIMEOUT, stdin: str | None = None) -> str:
        return subprocess.run(["ip", "netns", "exec", netns, *cmd], check=True, capture_output=True, text=True,
                              timeout=timeout, input=stdin).stdout

    def build(self) -> None:
        for name in (self.sender, self.gateway, self.receiver):
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=CMD_TIMEOUT)
            self._made.append(name)
            self.ns(name, "ip", "link", "set", "lo", "up")
        for here, there, ns_here in ((self.sub_if, self.snd_if, self.sender), (self.up_if, self.rcv_if, self.receiver)):
            self.ns(self.gateway, "ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", ns_here)
        g, s, r = self.gateway, self.sender, self.receiver
        self.ns(g, "ip", "addr", "add", f"{GW_SUB4}/24", "dev", self.sub_if)
        self.ns(g, "ip", "addr", "add", f"{GW_UP4}/24", "dev", self.up_if)
        self.ns(s, "ip", "addr", "add", f"{SENDER4}/24", "dev", self.snd_if)
        self.ns(r, "ip", "addr", "add", f"{RECEIVER4}/24", "dev", self.rcv_if)
        for netns, dev in ((g, self.sub_if), (g, self.up_if), (s, self.snd_if), (r, self.rcv_if)):
            self.ns(netns, "ip", "link", "set", dev, "up")
        self.ns(g, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # Only the two documentation/CGNAT prefixes, via the gateway: no default route anywhere.
        self.ns(s, "ip", "route", "add", "198.51.100.0/24", "via", GW_SUB4)
        self.ns(r, "ip", "route", "add", "100.127.255.0/24", "via", GW_UP4)
        self.ns(g, "nft", "-f", "-", stdin=BASELINE)
        deadline = time.monotonic() + 5
        for netns, dev in ((g, self.sub_if), (g, self.up_if), (s, self.snd_if), (r, self.rcv_if)):
            while self.ns(netns, "cat", f"/sys/class/net/{dev}/operstate").strip() != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{dev} in {netns} not up within 5 s")
                time.sleep(0.05)
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", r, "iperf3", "-s", "-B", RECEIVER4, "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while f":{self.port} " not in self.ns(r, "ss", "-ltn"):
            if time.monotonic() > deadline or self.server.poll() is not None:
                raise RuntimeError("iperf3 server did not start listening within 5 s")
            time.sleep(0.05)

    def rx_packets(self) -> int:
        return int(self.ns(self.receiver, "cat", f"/sys/class/net/{self.rcv_if}/statistics/rx_packets"))

    def measure(self, seconds: float) -> float:
        """One round: iperf3 UDP flood; received pps at the receiver over ``seconds`` after 1 s warm-up."""
        client = subprocess.Popen(
            ["ip", "netns", "exec", self.sender, "iperf3", "-c", RECEIVER4, "-p", str(self.port), "-u", "-b", "0",
             "-l", str(PAYLOAD), "-t", str(int(seconds + 2)), "--connect-timeout", "3000", "-J"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)
            start_n, start_t = self.rx_packets(), time.monotonic()
            time.sleep(seconds)
            end_n, end_t = self.rx_packets(), time.monotonic()
            out, err = client.communicate(timeout=seconds + 15)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(timeout=5)
        if client.returncode != 0:
            raise RuntimeError(f"iperf3 client failed: {(err or out).decode()[-500:]}")
        sent = json.loads(out)["end"]["sum"]
        if sent.get("packets", 0) == 0:
            raise RuntimeError("iperf3 sent nothing")
        time.sleep(0.3)  # let the server go back to listening
        return (end_n - start_n) / (end_t - start_t)

    def load(self, product_text: str | None) -> None:
        """Gateway tables: (a) the baseline alone; (b) baseline + ``product_text``."""
        try:
            self.ns(self.gateway, "nft", "delete", "table", "inet", PRODUCT_TABLE)
        except subprocess.CalledProcessError:
            pass  # not there
        if product_text is not None:
            self.ns(self.gateway, "nft", "-f", "-", stdin=product_text, timeout=120)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(timeout=3)
        for name in self._made:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10).stdout
            for pid in pids.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", name], timeout=10)


def restricted_csv(n: int) -> str:
    """n restricted subscribers as bench_dataplane makes them: 100.64.0.1.., every fourth + a /56."""
    base4 = int(ipaddress.IPv4Address("100.64.0.0"))
    if base4 + n >= int(ipaddress.IPv4Address(SENDER4)):
        raise ValueError(f"{n} restricted would reach the sender's address {SENDER4}")
    base6 = int(ipaddress.IPv6Address("2001:db8::")) >> 72
    lines = ["id,addresses,mode,reason"]
    for i in range(n):
        addrs = str(ipaddress.IPv4Address(base4 + 1 + i))
        if i % 4 == 0:
            addrs += " " + str(ipaddress.IPv6Network((base6 + i + 1 << 72, 56)))
        lines.append(f"C-{i:06d},{addrs},walled-garden,overdue")
    return "\n".join(lines) + "\n"


def render(n: int, sub_if: str, work: Path) -> tuple[str, float]:
    """The product table for n restricted subscribers, by ``walled-garden render``; and its time."""
    (work / "list.csv").write_text(restricted_csv(n))
    secret = work / "secret"
    secret.write_text("whsec_bench\n")
    config = work / "config.json"
    config.write_text(json.dumps({
        "state_dir": str(work / "state"), "subscribers": {"source": str(work / "list.csv")},
        "gateway": {"subscriber_interfaces": [sub_if], "table": PRODUCT_TABLE},
        "walled_garden": {"allow": ["203.0.113.0/24"]},
        "api": {"socket": str(work / "control.sock"), "webhook_secret_file": str(secret)}}))
    cli = Path(sys.executable).with_name("walled-garden")
    started = time.perf_counter()
    text = subprocess.run([str(cli), "render", "--config", str(config)], check=True, capture_output=True,
                          text=True, timeout=300).stdout
    return text, time.perf_counter() - started


def _edited(text: str, pattern: str, chain: str) -> str:
    """``text`` with ``pattern``'s match replaced by its first group, once, or an error."""
    edited, count = re.subn(pattern, r"\1", text)
    if count != 1:
        raise RuntimeError(f"no chain {chain!r} of that kind in the rendered table")
    return edited


def unhook(text: str, chain: str) -> str:
    """The rendered text with one base chain's hook line removed (it stays, as a regular chain)."""
    return _edited(text, rf"(\tchain {chain} {{\n)\t\ttype [^\n]*\n", chain)


def emptied(text: str, chain: str) -> str:
    """The rendered text with every rule of one chain removed (its type line, if any, kept)."""
    return _edited(text, rf"(\tchain {chain} {{\n(?:\t\ttype [^\n]*\n)?)(?:\t\t[^\n]*\n)*", chain)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0,1000,100000")
    parser.add_argument("--rounds", type=int, default=5, help="pairs (a, b) per size")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window of one round")
    parser.add_argument("--breakdown", action="store_true",
                        help="also (b) with the forward chains' address tests removed (the interface "
                             "jumps only), with the forward hook's rules removed (an empty base chain), and "
                             "with no chain a forwarded packet meets hooked (sets only)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (it creates network namespaces)", file=sys.stderr)
        return 1
    if shutil.which("iperf3") is None:
        print("iperf3 is missing: apt-get install -y iperf3", file=sys.stderr)
        return 1
    if not 1 <= args.rounds <= 50 or not 1 <= args.seconds <= 60:
        print("--rounds 1..50, --seconds 1..60", file=sys.stderr)
        return 2
    lab = Lab()
    atexit.register(lab.close)

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        lab.build()
        nft_version = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
        print(f"{nft_version}; kernel {os.uname().release}; {os.cpu_count()} CPUs; iperf3 UDP, "
              f"{PAYLOAD}-byte payload (64-byte frames); {args.rounds} pairs of {args.seconds:g} s per size, "
              f"alternating; pps received at the receiver")
        print(f"{'restricted':>10} {'variant':<18} {'a: ct-only pps':>15} {'b: +table pps':>14} "
              f"{'b/a median':>10} {'b/a min..max':>14}  per-pair b/a")
        with tempfile.TemporaryDirectory() as tmp:
            for n in [int(s) for s in args.sizes.split(",")]:
                text, render_s = render(n, lab.sub_if, Path(tmp))
                variants = {"as rendered": text}
                if args.breakdown:
                    variants["jumps only"] = emptied(emptied(text, "from_subscriber"), "to_subscriber")
                    variants["empty base chain"] = emptied(text, "forward")
                    variants["none on the path"] = unhook(unhook(text, "forward"), "prerouting")
                for label, product in variants.items():
                    a: list[float] = []
                    b: list[float] = []
                    for round_ in range(args.rounds):
                        for which in ("ab" if round_ % 2 == 0 else "ba"):
                            lab.load(product if which == "b" else None)
                            (b if which == "b" else a).append(lab.measure(args.seconds))
                    ratios = [y / x for x, y in zip(a, b, strict=True)]
                    print(f"{n:>10} {label:<18} {statistics.median(a):>15,.0f} {statistics.median(b):>14,.0f} "
                          f"{statistics.median(ratios):>10.3f} {min(ratios):>6.3f}..{max(ratios):<6.3f}  "
                          + " ".join(f"{r:.3f}" for r in ratios), flush=True)
                if n:
                    print(f"{'':>10} (render of {n:,} took {render_s:.1f} s)", flush=True)
        lab.load(None)
    finally:
        lab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
