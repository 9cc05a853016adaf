"""Where the daemon's memory goes with N restricted subscribers, measured in-process (issue 16).

    sudo .venv/bin/python tests/bench/bench_memory.py [--n 100000] [--top 25] [--no-trace]

The daemon's parts (``daemon.Enforcer`` with the real kernel backend, in a private network
namespace) start on an empty state, take a CSV list of N subscribers as the file source hands
it over (``parse_list`` then ``ListIntake.on_list``), and are then dropped and started again on
the same state and table, as after a restart. After each phase it prints the Python heap
(``tracemalloc``: what is held now, the peak of the phase, and the top lines that allocated what
is held), the deep size of each long-lived structure (shared objects counted once, in the order
listed, so a later structure shows only what it adds), and the process's VmRSS.
``--no-trace`` skips tracemalloc (3x faster; sizes and RSS only). Subscriber i is as in
``bench_scale`` (100.64.0.0 + 1 + i, every fourth also a /56).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
import tracemalloc
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent))

from private_netns import reexec_in_private_netns  # noqa: E402
from scale_helpers import write_list  # noqa: E402

from enforcer.config import parse_config  # noqa: E402
from enforcer.daemon import Enforcer  # noqa: E402
from enforcer.dataplane.libnftables import Nftables, NftError  # noqa: E402
from enforcer.sources import ListUpdate  # noqa: E402
from enforcer.subscribers import parse_list  # noqa: E402

TABLE = "wg_mem"
_SKIP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
         types.CodeType, types.FrameType)


def deep_size(root: Any, seen: set[int]) -> int:
    """Bytes reachable from ``root`` not already in ``seen`` (classes, modules, functions skipped)."""
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _SKIP):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    """VmHWM since the last ``reset_peak`` (the kernel's own high-water mark of VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def watch_steps() -> None:
    """Print VmRSS before and after, and the peak during, the big steps of a list and a restart."""
    import enforcer.dataplane.kernel as kernel
    import enforcer.engine as engine
    import enforcer.reconciler as reconciler
    import enforcer.store as store

    def wrap(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def step(*args: Any, **kwargs: Any) -> Any:
            before = rss_mb()
            reset_peak()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                print(f"  step {owner.__name__}.{name}: VmRSS {before:.0f} -> {rss_mb():.0f} MB, "
                      f"peak {peak_mb():.0f} MB, {time.perf_counter() - started:.2f} s", flush=True)
        setattr(owner, name, step)

    wrap(store.Store, "save_list")
    wrap(store.Store, "record_state")
    wrap(store.Store, "load_inputs")
    wrap(reconciler.Reconciler, "sync_all")
    wrap(reconciler.Reconciler, "_desired")
    wrap(kernel.KernelDataplane, "apply")
    wrap(kernel.KernelDataplane, "read")
    wrap(kernel.KernelDataplane, "holds_layout")
    wrap(kernel.KernelDataplane, "read_sets")
    wrap(reconciler.Reconciler, "_carries")
    wrap(engine.Engine, "_record_full")


def structures(enforcer: Enforcer) -> dict[str, Any]:
    engine = enforcer.engine
    rec = engine.reconciler
    return {
        "inputs.listed": engine.inputs.listed,
        "inputs (rest)": engine.inputs,
        "engine.decisions": engine.decisions,
        "reconciler.owned": rec.owned,
        "reconciler.owners": rec.owners,
        "reconciler.mirror": rec.mirror,
        "claims": engine.claims,
        "record": engine.record,
        "everything else of the Enforcer": enforcer,
    }


def report(phase: str, enforcer: Enforcer, trace: bool, top: int, seconds: float) -> None:
    gc.collect()
    rss = rss_mb()   # before the walk below: its own set of ~1M ids would count (~45 MB at 100k)
    print(f"\n## {phase} ({seconds:.2f} s)")
    print(f"VmRSS {rss:.1f} MB")
    if trace:
        current, peak = tracemalloc.get_traced_memory()
        print(f"python heap: {current / 1e6:.1f} MB held, peak {peak / 1e6:.1f} MB during the phase")
        snapshot = tracemalloc.take_snapshot().filter_traces([
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>")])
        root = str(HERE.parents[2]) + "/"
        for stat in snapshot.statistics("lineno")[:top]:
            frame = stat.traceback[0]
            where = f"{frame.filename.removeprefix(root)}:{frame.lineno}"
            print(f"  {stat.size / 1e6:8.1f} MB {stat.count:>9} blocks  {where}")
        tracemalloc.reset_peak()
    seen: set[int] = set()
    print("deep sizes (shared objects counted once, in this order):")
    for name, obj in structures(enforcer).items():
        print(f"  {deep_size(obj, seen) / 1e6:8.1f} MB  {name}")
    print(f"VmRSS {rss_mb():.1f} MB after that walk (its transient set of ids included)")
    import ctypes
    ctypes.CDLL(None).malloc_trim(0)
    print(f"VmRSS {rss_mb():.1f} MB after malloc_trim(0)")


async def run(n: int, work: Path, trace: bool, top: int) -> None:
    list_path = work / "restricted.csv"
    write_list(list_path, n, "csv")
    config = parse_config(json.dumps({
        "state_dir": str(work / "state"),
        "subscribers": {"source": str(list_path), "guard": {"max_restrict": 100_000_000, "max_lift": 100_000_000}},
        "gateway": {"subscriber_interfaces": ["eth1"], "table": TABLE,
                    "subscriber_prefixes": ["100.64.0.0/10", "2001:db8::/32"]},
        "walled_garden": {"allow": ["203.0.113.0/24"], "dns": "any"},
        "api": {"socket": str(work / "control.sock"), "webhook_secret_file": str(work / "secret")}}))
    (work / "secret").write_text("whsec_" + "A" * 44 + "\n")
    print(f"# {n:,} subscribers; VmRSS before the daemon's parts {rss_mb():.1f} MB")
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    enforcer = Enforcer(config)
    await enforcer.engine.restore()
    print(f"VmRSS {rss_mb():.1f} MB with the empty state restored")
    text = list_path.read_text()
    parsed = parse_list(text, str(list_path), space=enforcer.engine.space)
    del text
    print(f"VmRSS {rss_mb():.1f} MB with the list parsed ({time.perf_counter() - started:.2f} s)")
    await enforcer.lists.on_list(ListUpdate(parsed, str(list_path), "bench"))
    del parsed
    report("cold start: empty state, then the list", enforcer, trace, top, time.perf_counter() - started)
    await enforcer.close()
    del enforcer
    gc.unfreeze()   # the engine froze the heap after its sync: let the old parts go
    gc.collect()
    print(f"VmRSS {rss_mb():.1f} MB after the parts were dropped")
    started = time.perf_counter()
    enforcer = Enforcer(config)
    loaded = time.perf_counter() - started
    print(f"VmRSS {rss_mb():.1f} MB with the state loaded")
    await enforcer.engine.restore()
    print(f"\nrestart: Enforcer(config) {loaded:.2f} s, restore {time.perf_counter() - started - loaded:.2f} s; "
          f"last sync {enforcer.engine.last_sync}")
    report("restart: the saved state, the table as left", enforcer, trace, top, time.perf_counter() - started)
    await enforcer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-trace", action="store_true")
    parser.add_argument("--steps", action="store_true", help="VmRSS around the big steps (use with --no-trace)")
    args = parser.parse_args()
    if not 1 <= args.n <= 2_000_000:
        parser.error("--n 1..2000000")
    code = reexec_in_private_netns(str(HERE))
    if code is not None:
        return code
    if args.steps:
        watch_steps()
    with tempfile.TemporaryDirectory(prefix="wg-mem-") as work:
        try:
            asyncio.run(run(args.n, Path(work), not args.no_trace, args.top))
        finally:
            try:
                Nftables().run(f"delete table inet {TABLE}")
            except NftError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
