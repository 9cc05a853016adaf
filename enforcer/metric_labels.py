"""Labels on every sample of a registry, added at scrape time: shared by the daemon's and the
portal's ``/metrics`` (the portal may not import the daemon's catalogue, ``enforcer.metrics``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample


class Labelled:
    """``registry``'s metrics with ``labels`` added to every sample: in a fleet, the daemon's and
    the portal's ``/metrics`` carry ``gateway="<fleet.gateway>"``, so a dashboard over the fleet
    tells gateways apart and counts a subscriber once (``max by``, not ``sum``)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry, self.labels = registry, labels

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            metric.samples = [Sample(s.name, {**s.labels, **self.labels}, s.value, s.timestamp, s.exemplar)
                              for s in metric.samples]
            yield metric
