"""``/metrics``: the enforcer's Prometheus registry, with the kernel's packet counters read at
most once a second (``metrics.KernelCounters``) on a reader of their own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..metrics import Metrics


def metrics_app(metrics: Metrics, read_counters: Callable[[], Awaitable[dict[str, tuple[int, int]]]]
                ) -> web.Application:
    async def scrape(_: web.Request) -> web.Response:
        await metrics.kernel.refresh(read_counters)
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


