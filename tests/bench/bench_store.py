"""The state store's big write, side by side: ``Store.save_list`` of a whole new list, with the
store of this tree and with the store of another commit (before the per-thread connections).

    .venv/bin/python tests/bench/bench_store.py [--sizes 10000,100000] [--repeat 5] [--against HEAD~1]

``--against`` names a commit whose ``enforcer/store.py`` is loaded next to this tree's (``git
show``, as module ``enforcer._bench_old_store``; it imports the same sibling modules). Each
round saves the list into a fresh database in a temporary directory, first from the calling
thread and then, as the daemon does, from an ``asyncio.to_thread`` worker, alternating which
store goes first; each figure is the median of ``--repeat`` rounds (wall time of the call).
The machine is a shared 2-core VM: expect ±10–20 % between runs, less between the two sides
of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from enforcer import store as new_store  # noqa: E402
from enforcer.subscribers import Mode, Subscriber, parse_address  # noqa: E402


def old_store(commit: str) -> ModuleType:
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:enforcer/store.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench_store_")) / "store.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("enforcer._bench_old_store", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def listing(n: int) -> dict[str, Subscriber]:
    return {f"C-{i}": Subscriber(f"C-{i}", (parse_address(f"100.{64 + i // 65536}.{i // 256 % 256}.{i % 256}"),),
                                 Mode.WALLED_GARDEN if i % 3 else Mode.NOTICE, "overdue")
            for i in range(n)}


def save_once(module: ModuleType, new: dict[str, Subscriber], threaded: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="bench_store_") as state_dir:
        store: Any = module.Store(state_dir)
        since = {sid: 1.0 for sid in new}
        try:
            started = time.perf_counter()
            if threaded:
                asyncio.run(asyncio.to_thread(store.save_list, {}, new, {"version": "bench"}, since))
            else:
                store.save_list({}, new, {"version": "bench"}, since)
            return time.perf_counter() - started
        finally:
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--against", default="HEAD~1", help="the commit whose store.py is the 'before' side")
    args = parser.parse_args()
    sides = {"before": old_store(args.against), "after": new_store}
    print(f"save_list of a whole new list into a fresh database, median of {args.repeat} (ms); "
          f"before = {args.against}")
    print(f"{'entries':>8} {'how':>10} {'before':>8} {'after':>8} {'after/before':>13}")
    for size in (int(s) for s in args.sizes.split(",")):
        new = listing(size)
        for threaded in (False, True):
            times: dict[str, list[float]] = {name: [] for name in sides}
            for round_ in range(args.repeat):
                order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
                for name in order:
                    times[name].append(save_once(sides[name], new, threaded))
            before, after = (statistics.median(times[n]) * 1000 for n in ("before", "after"))
            print(f"{size:>8} {'to_thread' if threaded else 'caller':>10} {before:>8.0f} {after:>8.0f} "
                  f"{after / before:>13.2f}")


if __name__ == "__main__":
    main()
