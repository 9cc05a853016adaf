"""A restart's state load (``Store.load_state``) at N restricted subscribers, side by side.

    .venv/bin/python tests/bench/bench_state_load.py [--n 100000] [--rounds 9] CHECKOUT [CHECKOUT ...]

Builds one saved state of N listed and enforced subscribers (the daemon's own code on the fake
dataplane: no root, no kernel), then for each round runs ``load_state`` once per checkout (a
``git worktree`` of an older commit, and this one), each in a fresh process on its own copy of
that state, alternating, and prints per checkout the CPU seconds (median, best) and the
process's VmRSS after the load and its peak (VmHWM). CPU time, not wall time: the host is shared.
Subscriber i is as in ``bench_scale`` (every fourth also a /56).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))

PROBE = r'''
import gc, shutil, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from enforcer.store import Store
work = tempfile.mkdtemp()
shutil.copytree(sys.argv[2], work + "/state")
store = Store(work + "/state")
gc.collect()
started = time.process_time()
inputs, before = store.load_state()
seconds = time.process_time() - started
status = open("/proc/self/status").read()
mb = lambda key: int(status.split(key + ":")[1].split()[0]) / 1024
print(seconds, mb("VmRSS"), mb("VmHWM"), len(inputs.listed), len(before))
shutil.rmtree(work)
'''


async def saved_state(n: int, work: Path) -> Path:
    """The state directory a daemon leaves after taking a list of ``n`` (fake dataplane)."""
    from scale_helpers import write_list

    from daemon_helpers import NoConntrack
    from enforcer.config import parse_config
    from enforcer.daemon import Enforcer
    from enforcer.dataplane.fake import FakeDataplane
    from enforcer.sources import ListUpdate
    from enforcer.subscribers import parse_list

    list_path = work / "restricted.csv"
    write_list(list_path, n, "csv")
    config = parse_config(json.dumps({
        "state_dir": str(work / "state"),
        "subscribers": {"source": str(list_path), "guard": {"max_restrict": 100_000_000, "max_lift": 100_000_000}},
        "gateway": {"subscriber_prefixes": ["100.64.0.0/10", "2001:db8::/32"]},
        "api": {"socket": str(work / "control.sock")}}))
    enforcer = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack())  # type: ignore[arg-type]
    await enforcer.engine.restore()
    parsed = parse_list(list_path.read_text(), str(list_path), space=enforcer.engine.space)
    await enforcer.lists.on_list(ListUpdate(parsed, str(list_path), "bench"))
    await asyncio.sleep(1)   # the deferred enforcement record
    await enforcer.close()
    return work / "state"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("checkouts", nargs="+")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        state = asyncio.run(saved_state(args.n, Path(scratch)))
        results: dict[str, list[tuple[float, float, float]]] = {c: [] for c in args.checkouts}
        for _ in range(args.rounds):
            for checkout in args.checkouts:
                out = subprocess.run([sys.executable, "-c", PROBE, checkout, str(state)], capture_output=True,
                                     text=True, timeout=600, check=True, cwd=scratch).stdout.split()
                results[checkout].append((float(out[0]), float(out[1]), float(out[2])))
        shutil.rmtree(state, ignore_errors=True)
    print(f"# load_state of {args.n:,} subscribers, {args.rounds} rounds alternated")
    print(f"{'checkout':<40} {'CPU s median':>12} {'best':>7} {'VmRSS MB':>9} {'VmHWM MB':>9}")
    for checkout, rows in results.items():
        cpu = [r[0] for r in rows]
        print(f"{checkout:<40} {statistics.median(cpu):>12.3f} {min(cpu):>7.3f} "
              f"{statistics.median(r[1] for r in rows):>9.1f} {statistics.median(r[2] for r in rows):>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
