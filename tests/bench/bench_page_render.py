"""Portal page render time per language, in-process, for the checkout it is run from.

    cd <checkout> && /work/main/.venv/bin/python <this file>

Run it in two checkouts (``git worktree add /tmp/old <rev>``) one after the other, alternating,
to compare a change side by side: the figure is the median of 7 rounds of 2,000 renders of a
walled-garden caller's page (the CPU the portal spends per restricted request, after the lookup).
"""

from __future__ import annotations

import statistics
import sys
import time

sys.path.insert(0, ".")   # the checkout run from, ahead of the installed package

from captive_portal.enforcer_client import Lookup
from captive_portal.page import Caller, Pages
from enforcer.config import PortalConfig


def main() -> None:
    pages = Pages(PortalConfig())
    lookup = Lookup(address="100.64.0.1", restricted=True, mode="walled-garden", reason="overdue",
                    reference="WG-ABCD-EFGH")
    out = []
    for language in ("en", "cs", "ru"):
        caller = Caller(lookup, language)
        pages.caller_page(caller)
        runs = []
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(2000):
                pages.caller_page(caller)
            runs.append((time.perf_counter() - started) / 2000 * 1e3)
        out.append(f"{language} {statistics.median(runs):.3f} ms")
    print("; ".join(out))


if __name__ == "__main__":
    main()
