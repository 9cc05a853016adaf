"""The portal's Prometheus metrics, in a registry the app owns.

A registry per app (not the process-global default) so tests can build many apps and read
exact counts, and so ``/metrics`` on ``metrics.portal_listen`` shows only portal series, with
the build info and process collectors every walled-garden registry has (``process_metrics``).
"""

from __future__ import annotations

import enum

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from enforcer.listener_guard import SHED_REASONS
from enforcer.metric_labels import Labelled
from enforcer.process_metrics import add_standard_collectors


class RequestKind(str, enum.Enum):
    """What a request turned out to be; the ``kind`` label of the request counter."""

    REDIRECT = "redirect"        # some other site, sent to portal.url
    PAGE = "page"                # the portal page
    CAPTIVE_API = "captive_api"  # RFC 8908 API
    CONTINUE = "continue"        # "Continue to the internet" posted (acknowledged, or refused: 409)
    PROMISE = "promise"          # "I promise to pay" posted (made, or refused: 403/409)
    RATE_LIMITED = "rate_limited"  # a POST over portal.posts_per_minute: 429
    FORBIDDEN = "forbidden"      # a POST without a valid CSRF token or from another origin: 403
    NOT_FOUND = "not_found"      # the portal host, but no such page or method (404, 405; 303 for GET /continue)
    ERROR = "error"              # we could not answer (5xx: exception, enforcer unavailable)
    BAD_REQUEST = "bad_request"  # aiohttp could not parse it (400: a line over 64 KiB, 129 headers, a BREW method)


class PortalMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if registry is None:  # a registry passed in is the caller's to fill (the default one has them)
            add_standard_collectors(self.registry)
        self.requests = Counter(
            "walled_garden_portal_requests", "HTTP requests answered by the portal, by kind.",
            ["kind"], registry=self.registry)
        self.lookup_failures = Counter(
            "walled_garden_portal_lookup_failures",
            "Lookups the enforcer did not answer (socket missing, timeout, bad answer).",
            registry=self.registry)
        self.shed = Counter(
            "walled_garden_portal_connections_shed",
            "Connections the portal closed or refused so that the others are served, by reason.",
            ["reason"], registry=self.registry)
        # Every series exists from the start (so rate() sees the first one), and each request
        # increments a child looked up once here rather than per request.
        self._by_kind = {kind: self.requests.labels(kind=kind.value) for kind in RequestKind}
        self._shed_by = {reason: self.shed.labels(reason=reason) for reason in SHED_REASONS}

    def count(self, kind: RequestKind) -> None:
        self._by_kind[kind].inc()

    def bad_request(self) -> None:
        self._by_kind[RequestKind.BAD_REQUEST].inc()

    def connection_shed(self, reason: str) -> None:
        self._shed_by[reason].inc()


def create_metrics_app(registry: CollectorRegistry, labels: dict[str, str] | None = None) -> web.Application:
    """A separate tiny app for ``GET /metrics``, served on its own (usually loopback) address;
    ``labels`` go on every sample (in a fleet: ``gateway``)."""
    exported = Labelled(registry, labels) if labels else registry

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(exported), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app
