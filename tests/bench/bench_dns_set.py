"""What the DNS forwarder's kernel writer costs at scale (issue 14): its add, and the two ways of
asking whether a set still holds its marker, on a table holding N restricted subscribers.

    sudo .venv/bin/python tests/bench/bench_dns_set.py [--restricted 100000] [--repeat 20]

Measured side by side in one run, in a private network namespace (tests/bench/private_netns.py),
through the same libnftables binding the forwarder uses:

* ``add element`` of one address with a timeout to ``dnsgarden4`` (an admit's transaction), through
  libnftables and through the netlink writer the forwarder now uses (``nfnetlink.ElementWriter``),
  the two alternating call by call, and a refresh (delete + add in one batch) over netlink;
* ``get element`` of the marker on a table nobody wrote to since the last call, and right after a
  write by another context (the daemon or the forwarder's own admits: the usual case);
* ``list set`` of ``dnsgarden4`` right after such a write (what the marker check does).

nft 1.0.6 answers ``get element`` after a write only once it has loaded every set's elements
into its cache, so its cost grows with the whole table; ``list set`` reads the one set.
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent))

from private_netns import reexec_in_private_netns  # noqa: E402

from enforcer.dataplane.layout import SENTINELS, Layout  # noqa: E402
from enforcer.dataplane.libnftables import Nftables  # noqa: E402
from enforcer.dataplane.nfnetlink import ElementWriter  # noqa: E402

TABLE = "wgbenchdns"


def timed(repeat: int, step: Callable[[int], None]) -> tuple[float, float]:
    """Median and max of ``repeat`` calls of ``step``, in ms."""
    times = []
    for i in range(repeat):
        started = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restricted", type=int, default=100_000, help="subscriber addresses in the table")
    parser.add_argument("--repeat", type=int, default=20, help="calls per figure")
    args = parser.parse_args()
    code = reexec_in_private_netns(__file__)
    if code is not None:
        return code
    layout = Layout(TABLE, (), (ipaddress.ip_network("192.0.2.0/24"),), (), 8080, dns_port=5300, ntp=())
    nft, other = Nftables(), Nftables()
    nft.run(layout.render())
    for start in range(0, args.restricted, 50_000):
        chunk = ", ".join(str(ipaddress.IPv4Address(0x64400000 + i))
                          for i in range(start, min(args.restricted, start + 50_000)))
        nft.run(f"add element inet {TABLE} portal4_32 {{ {chunk} }}")
    marker = SENTINELS[4]
    nft.run(f"add element inet {TABLE} dnsgarden4 {{ {marker} }}")
    get = f"get element inet {TABLE} dnsgarden4 {{ {marker} }}"

    def written(i: int) -> None:   # another context writes first, as the daemon or an admit does
        other.run(f"add element inet {TABLE} dnsgarden4 {{ 10.1.{i // 250}.{i % 250} timeout 300s }}")

    netlink = ElementWriter(TABLE)
    by_text: list[float] = []
    by_netlink: list[float] = []
    for i in range(args.repeat):   # alternating, so both see the same machine
        started = time.perf_counter()
        nft.run(f"add element inet {TABLE} dnsgarden4 {{ 198.51.{100 + i // 250}.{i % 250} timeout 300s }}")
        by_text.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        netlink.write([("dnsgarden4", [], [(ipaddress.IPv4Address(0xCB007100 + i), 300)])])   # 203.0.113.x on
        by_netlink.append((time.perf_counter() - started) * 1000)
    figures = {
        "add element (one address, timeout), nft": (statistics.median(by_text), max(by_text)),
        "the same over netlink (ElementWriter)": (statistics.median(by_netlink), max(by_netlink)),
        "refresh over netlink (delete + add)":
            timed(args.repeat, lambda i: netlink.write([("dnsgarden4", [ipaddress.IPv4Address(0xCB007100 + i)],
                                                         [(ipaddress.IPv4Address(0xCB007100 + i), 600)])])),
        "get element, table unchanged": timed(args.repeat, lambda i: (nft.run(get), nft.run(get))[1]),
        "get element after a write": timed(min(args.repeat, 5), lambda i: (written(i), nft.run(get))[1]),
        "list set after a write":
            timed(args.repeat, lambda i: (written(1000 + i), nft.run_json(f"list set inet {TABLE} dnsgarden4"))[1]),
    }
    print(f"dnsgarden4 on a table with {args.restricted} restricted subscribers (nft via libnftables):")
    for what, (median, worst) in figures.items():
        print(f"  {what:<44} median {median:8.3f} ms   max {worst:8.3f} ms")
    print("(the write before each 'after a write' call is not timed; 'get element, table unchanged' is two calls "
          "back to back, its max the first one, which loads the cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
