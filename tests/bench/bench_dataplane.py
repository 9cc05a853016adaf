"""Dataplane benchmarks: cold load vs raw ``nft -f``, and payment event-to-commit latency.

    sudo .venv/bin/python tests/bench/bench_dataplane.py [--sizes 1000,10000,100000] [--events 300]

Runs itself inside a private network namespace (created and removed here), so it touches no
real ruleset. Ratios are measured side by side in one run, alternating order, because the
machine is shared and noisy; medians of ``--repeat`` rounds are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent))

from private_netns import reexec_in_private_netns  # noqa: E402

from enforcer.config import parse_config  # noqa: E402
from enforcer.daemon import Enforcer  # noqa: E402
from enforcer.dataplane.kernel import KernelDataplane  # noqa: E402
from enforcer.dataplane.libnftables import Nftables, NftError  # noqa: E402
from enforcer.policy import PolicyInputs  # noqa: E402
from enforcer.reconciler import Reconciler  # noqa: E402
from enforcer.sources import ListUpdate  # noqa: E402
from enforcer.subscribers import Subscriber, parse_list  # noqa: E402
from enforcer.table_layout import base_layout  # noqa: E402

TABLE = "wg_bench"


def subscribers(n: int) -> list[Subscriber]:
    """n subscribers in 100.64.0.0/10, every fourth with an IPv6 /56 as well."""
    base4 = int(ipaddress.IPv4Address("100.64.0.0"))
    base6 = int(ipaddress.IPv6Address("2001:db8::"))
    out = []
    for i in range(n):
        nets: list = [ipaddress.IPv4Network(base4 + 1 + i)]
        if i % 4 == 0:
            nets.append(ipaddress.IPv6Network(((base6 >> 72) + i + 1 << 72, 56)))
        out.append(Subscriber(f"C-{i:06d}", tuple(nets), reason="overdue"))
    return out


def nft_delete_table(nft: Nftables) -> None:
    try:
        nft.run(f"delete table inet {TABLE}")
    except NftError:   # there was none
        pass


def cold_load(sizes: list[int], repeat: int, config_text: str) -> None:
    config = parse_config(config_text)
    nft = Nftables()
    print(f"\n# cold load: our path (policy -> reconciler -> libnftables, one transaction) vs raw `nft -f` "
          f"of the same transaction text; median of {repeat}")
    print(f"{'subscribers':>12} {'elements':>9} {'ours s':>8} {'nft -f s':>9} {'ratio':>6} {'parse csv s':>12}")
    for n in sizes:
        subs = subscribers(n)
        csv_text = "id,addresses,mode,reason\n" + "".join(
            f"{s.id},{' '.join(str(a) for a in s.addresses)},walled-garden,overdue\n" for s in subs)
        started = time.perf_counter()
        parsed = parse_list(csv_text, "bench.csv")
        parse_s = time.perf_counter() - started
        assert len(parsed) == n
        # Start from parsed entries, as the daemon does (parsing also renders their kernel keys).
        decisions = PolicyInputs({s.id: s for s in parsed}, {}, {}).decide_all(0.0)
        ours, raw = [], []
        elements = 0
        with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as handle:
            path = handle.name
        try:
            for round_ in range(repeat):
                for which in (("ours", "raw") if round_ % 2 == 0 else ("raw", "ours")):
                    nft_delete_table(nft)
                    if which == "ours":
                        reconciler = Reconciler(KernelDataplane(TABLE, nft), base_layout(config))
                        started = time.perf_counter()
                        result = reconciler.sync_all(decisions, read_kernel=True)
                        ours.append(time.perf_counter() - started)
                        elements = result.elements
                        from enforcer.dataplane.fake import FakeDataplane
                        fake = FakeDataplane(TABLE)
                        Reconciler(fake, base_layout(config)).sync_all(decisions)
                        Path(path).write_text(fake.dump())
                    else:
                        if not Path(path).stat().st_size:
                            continue
                        started = time.perf_counter()
                        subprocess.run(["nft", "-f", path], check=True)
                        raw.append(time.perf_counter() - started)
            if not raw:  # the first round ran "ours" first and wrote the file; make sure we have raw
                started = time.perf_counter()
                subprocess.run(["nft", "-f", path], check=True)
                raw.append(time.perf_counter() - started)
        finally:
            os.unlink(path)
        o, r = statistics.median(ours), statistics.median(raw)
        print(f"{n:>12} {elements:>9} {o:>8.3f} {r:>9.3f} {o / r:>6.2f} {parse_s:>12.3f}")
    nft_delete_table(nft)


async def event_latency(n: int, events: int, config_text: str, workdir: str) -> None:
    from aiohttp import ClientSession

    from enforcer.api.listeners import start_tcp_site
    from enforcer.api.webhooks import load_webhook_secret, webhook_app
    from enforcer.demo.billing import event_body, signed_request

    config = parse_config(config_text)
    nft = Nftables()
    nft_delete_table(nft)
    enforcer = Enforcer(config, dataplane=KernelDataplane(TABLE, nft))
    await enforcer.engine.restore()
    subs = subscribers(n)
    started = time.perf_counter()
    await enforcer.lists.on_list(ListUpdate(subs, "bench", "1"), approved_by="benchmark")
    load_s = time.perf_counter() - started
    runner = await start_tcp_site(webhook_app(enforcer.events, load_webhook_secret(config.api.webhook_secret_file)),
                                  "127.0.0.1", 18787)
    secret = (await asyncio.to_thread(Path(config.api.webhook_secret_file).read_text)).strip()
    answer_s: list[float] = []
    async with ClientSession() as session:
        for i in range(events):
            sub = subs[(i * 7919) % n]
            request = signed_request("http://127.0.0.1:18787/v1/events", secret,
                                     event_body("payment.received", sub.id))
            started = time.perf_counter()
            async with session.post(request.full_url, data=request.data, headers=dict(request.header_items())) as r:
                await r.read()
                assert r.status == 200, await r.text()
            answer_s.append(time.perf_counter() - started)
    await runner.cleanup()
    await enforcer.close()
    nft_delete_table(nft)
    answer_s.sort()
    commit_samples = sorted(_COMMIT_SAMPLES)
    print(f"\n# payment events with {n} restricted ({sum(len(s.addresses) for s in subs)} addresses, list applied "
          f"in {load_s:.2f} s); {events} signed webhooks over loopback, one at a time")
    print(f"event received -> kernel commit (walled_garden_event_to_enforce_seconds): "
          f"p50 {pct(commit_samples, 50) * 1000:.2f} ms, p99 {pct(commit_samples, 99) * 1000:.2f} ms")
    print(f"request sent -> 200 answer (commit + conntrack flush + state write): "
          f"p50 {pct(answer_s, 50) * 1000:.2f} ms, p99 {pct(answer_s, 99) * 1000:.2f} ms")


_COMMIT_SAMPLES: list[float] = []


def pct(samples: list[float], p: float) -> float:
    if not samples:
        return float("nan")
    k = min(len(samples) - 1, max(0, round(p / 100 * len(samples)) - 1))
    return samples[k]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    code = reexec_in_private_netns(str(HERE))
    if code is not None:
        return code
    with tempfile.TemporaryDirectory() as work:
        secret = Path(work, "secret")
        secret.write_text("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
        config_text = json.dumps({
            "state_dir": f"{work}/state", "subscribers": {"source": f"{work}/list.csv"},
            "gateway": {"subscriber_interfaces": ["eth1"], "table": TABLE},
            "walled_garden": {"allow": ["203.0.113.0/24"]},
            "api": {"socket": f"{work}/control.sock", "webhook_secret_file": str(secret)}})
        print(f"nft: {subprocess.run(['nft', '--version'], capture_output=True, text=True).stdout.strip()}; "
              f"kernel {os.uname().release}; netns {os.environ['WG_BENCH_NETNS']}")
        cold_load([int(s) for s in args.sizes.split(",")], args.repeat, config_text)
        _instrument_commits()
        asyncio.run(event_latency(max(int(s) for s in args.sizes.split(",")), args.events, config_text, work))
    return 0


def _instrument_commits() -> None:
    """Collect raw event-to-commit samples (the histogram only keeps buckets)."""
    from enforcer.metrics import Metrics

    original = Metrics.__init__

    def init(self: Metrics) -> None:
        original(self)
        observe = self.event_to_enforce.observe

        def record(value: float) -> None:
            _COMMIT_SAMPLES.append(value)
            observe(value)
        self.event_to_enforce.observe = record  # type: ignore[method-assign]
    Metrics.__init__ = init  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
