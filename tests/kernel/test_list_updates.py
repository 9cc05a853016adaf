"""List updates on the real kernel: a flaky billing URL changes nothing; a held mass change waits for approve."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from kernel_helpers import SUB1

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology

# Serves files from a folder on a literal address (no name lookups at bind, unlike http.server).
FILE_SERVER = textwrap.dedent("""
    import http.server, socketserver, sys, functools
    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    Server(("198.51.100.10", 8081), handler).serve_forever()
""")


def _export(folder: Path, entries: list[dict] | None, raw: str | None = None) -> None:
    tmp = folder / "export.tmp"
    tmp.write_text(raw if raw is not None else yaml.safe_dump({"subscribers": entries}))
    tmp.replace(folder / "export.yaml")


def test_broken_billing_export_changes_nothing_then_a_good_one_applies(topo: Topology, tmp_path: Path) -> None:
    exports = tmp_path / "billing"
    exports.mkdir()
    first = [{"id": SUB1, "addresses": [topo.subscribers[0].addr4]}]
    _export(exports, first)
    server = topo.popen(topo.upstream.netns, sys.executable, "-c", FILE_SERVER, str(exports))
    lab = Lab(topo, tmp_path / "gw", source="http://198.51.100.10:8081/export.yaml")
    lab.start_daemon()
    try:
        restricted, free = topo.subscribers[0], topo.subscribers[1]
        lab.wait_for(lambda: lab.lookup(restricted.addr4)["restricted"], timeout=10, what="first list from URL")
        # Broken exports: truncated YAML, junk, and a list with a bad address. Nobody changes.
        for raw in ("subscribers:\n", "<html>502 Bad Gateway</html>",
                    "subscribers:\n  - {id: C-2002, addresses: [100.64.2.300]}\n"):
            _export(exports, None, raw)
            lab.wait_for(lambda: ((lab.status() or {}).get("source", {}).get("last_error") or {}).get("at", 0) > 0,
                         timeout=10, what="broken export reported")
            assert lab.lookup(restricted.addr4)["restricted"] and not lab.lookup(free.addr4)["restricted"]
            assert topo.curl(free.netns, "http://198.51.100.10/")[:2] == (200, "UPSTREAM OK")
        status = lab.status() or {}
        assert "export.yaml" in status["source"]["last_error"]["message"]
        # The billing server goes away entirely: still nothing changes.
        server.kill()
        server.wait(5)
        lab.wait_for(lambda: ((lab.status() or {}).get("source", {}).get("last_error") or {}).get("reason")
                     == "unreachable", timeout=15, what="unreachable source reported")
        assert lab.lookup(restricted.addr4)["restricted"] and not lab.lookup(free.addr4)["restricted"]
        # It comes back with a good export, which applies.
        _export(exports, [{"id": "C-2002", "addresses": [free.addr4]}])
        topo.popen(topo.upstream.netns, sys.executable, "-c", FILE_SERVER, str(exports))
        lab.wait_for(lambda: lab.lookup(free.addr4)["restricted"], timeout=30, what="good list applied")
        assert not lab.lookup(restricted.addr4)["restricted"]
        assert (lab.status() or {})["source"]["last_error"] is None
    finally:
        lab.stop_daemon()


def test_mass_change_is_held_until_an_operator_approves(topo: Topology, lab: Lab) -> None:
    free = topo.subscribers[1]
    entries = [{"id": SUB1, "addresses": [topo.subscribers[0].addr4]}]
    entries += [{"id": f"C-5{i:03d}", "addresses": [f"100.64.{100 + i // 200}.{i % 200 + 1}"]} for i in range(150)]
    entries.append({"id": "C-2002", "addresses": [free.addr4]})
    lab.write_list(entries)
    lab.wait_for(lambda: (lab.status() or {}).get("held_changes"), timeout=5, what="mass change held")
    assert topo.curl(free.netns, "http://198.51.100.10/")[:2] == (200, "UPSTREAM OK"), "held means not applied"
    status = subprocess.run([sys.executable, "-m", "enforcer.cli", "status", "--config", str(lab.config_path)],
                            capture_output=True, text=True, timeout=30)
    assert "HELD" in status.stdout and "restrict 151" in status.stdout
    approve = subprocess.run([sys.executable, "-m", "enforcer.cli", "approve", "--reason", "new billing run",
                              "--config", str(lab.config_path)], capture_output=True, text=True, timeout=30)
    assert approve.returncode == 0, approve.stderr
    assert lab.lookup(free.addr4)["restricted"]
    assert topo.curl(free.netns, "http://198.51.100.10/")[0] == 302
    assert re.search(r"event=list_approved by=\"?root\b", lab.log()), lab.log()[-2000:]
