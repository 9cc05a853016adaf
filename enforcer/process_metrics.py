"""What every walled-garden registry exports besides its own series: ``walled_garden_build_info``
and prometheus_client's process and Python collectors.

The daemon and the portal keep registries of their own (``CollectorRegistry()``, so tests can
build many and read exact counts). prometheus_client registers ``process_*`` (CPU, memory, open
files, start time), ``python_info`` and ``python_gc_*`` only on its process-global default
registry, so a registry of one's own silently drops them: ``add_standard_collectors`` puts them
back. The portal imports this module too (not ``enforcer.metrics``, the daemon's catalogue).

``walled_garden_build_info{version,python,nftables} 1`` tells, across many gateways, which runs
what: a fleet half-way through an upgrade, a gateway with an older nftables. Its labels are read
once per process, at the first scrape (``nft --version`` is a short exec; ``unknown`` when it
cannot be run, e.g. in a sandbox without the binary).
"""

from __future__ import annotations

import functools
import platform
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

BUILD_INFO = "walled_garden_build_info"

#: ``nft --version`` prints e.g. ``nftables v1.0.6 (Lester Gooch #5)``.
_NFT_VERSION = re.compile(r"\bv?(\d+(?:\.\d+)+)\b")
#: Seconds ``nft --version`` may take before the label says ``unknown``.
NFT_TIMEOUT = 2.0


def package_version() -> str:
    """The installed distribution's version; from pyproject.toml in a source tree never installed."""
    from importlib import metadata

    try:
        return metadata.version("walled-garden")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def nftables_version(command: str = "nft") -> str:
    """The nftables release on this machine (``1.0.6``), or ``unknown``.

    libnftables has no version call; the ``nft`` binary of the same package says it. The daemon
    links libnftables of that package, so the two agree on a packaged system.
    """
    try:
        done = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=NFT_TIMEOUT,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    found = _NFT_VERSION.search(done.stdout) if done.returncode == 0 else None
    return found.group(1) if found else "unknown"


@functools.cache
def build_labels() -> dict[str, str]:
    """The build-info labels of this process (read once: none of them changes while it runs)."""
    return {"version": package_version(), "python": platform.python_version(), "nftables": nftables_version()}


class BuildInfo(Collector):
    """``walled_garden_build_info{version,python,nftables} 1``.

    The labels are read in a thread started here (``nft --version`` may take up to
    ``NFT_TIMEOUT``): the first scrape, served on the daemon's event loop beside the webhooks,
    finds them ready instead of running ``nft`` itself.
    """

    def __init__(self, labels: dict[str, str] | None = None) -> None:
        self._labels = labels
        if labels is None:
            threading.Thread(target=build_labels, name="build_info", daemon=True).start()

    def labels(self) -> dict[str, str]:
        if self._labels is None:
            self._labels = build_labels()
        return self._labels

    def collect(self) -> Iterator[Metric]:
        labels = self.labels()
        family = GaugeMetricFamily(BUILD_INFO, "Always 1: the walled-garden version, Python and nftables "
                                   "this process runs with", labels=sorted(labels))
        family.add_metric([labels[name] for name in sorted(labels)], 1)
        yield family

    def describe(self) -> Iterator[Metric]:
        """Registration checks names against this, without running ``nft`` at construction."""
        yield GaugeMetricFamily(BUILD_INFO, "")


def add_standard_collectors(registry: CollectorRegistry, build_info: BuildInfo | None = None) -> None:
    """Build info, ``process_*``, ``python_info`` and ``python_gc_*`` on ``registry``."""
    registry.register(build_info if build_info is not None else BuildInfo())
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
