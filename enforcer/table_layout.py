"""The nftables table layout a configuration asks for (the prefix lengths come from the list).

Kept apart from the dataplane, which knows nothing of the configuration file, and from the
engine, so ``walled-garden render`` builds exactly the layout the daemon would install.
"""

from __future__ import annotations

from .config import Config
from .dataplane.layout import Layout


def base_layout(config: Config) -> Layout:
    forwarder = config.walled_garden.forwarder
    return Layout(table=config.gateway.table, interfaces=config.gateway.subscriber_interfaces,
                  allow=config.walled_garden.allow_networks, dns=config.walled_garden.dns,
                  portal_port=config.portal.listen.port, throttle_rate=config.policy.throttle_rate,
                  throttle_burst=config.policy.throttle_burst,
                  portal_tls_port=config.portal.tls.listen.port if config.portal.tls else None,
                  dns_port=forwarder.port if forwarder else None, ntp=config.walled_garden.ntp,
                  dns_garden_size=forwarder.max_addresses + 1 if forwarder else 65536)   # + the marker
