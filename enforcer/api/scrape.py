"""``/metrics``: the enforcer's Prometheus registry, with the kernel's packet counters read at
most once a second (``metrics.KernelCounters``) on a reader of their own. In a fleet every
sample carries ``gateway="<name>"`` (``Metrics.constant_labels``), so a dashboard over the fleet
can tell gateways apart and count a subscriber once (``max by``, not ``sum``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..metric_labels import Labelled
from ..metrics import Metrics


def metrics_app(metrics: Metrics, read_counters: Callable[[], Awaitable[dict[str, tuple[int, int]]]]
                ) -> web.Application:
    async def scrape(_: web.Request) -> web.Response:
        await metrics.kernel.refresh(read_counters)
        registry = Labelled(metrics.registry, metrics.constant_labels) if metrics.constant_labels else metrics.registry
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


