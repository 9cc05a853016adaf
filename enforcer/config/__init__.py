"""Typed configuration (docs/reference.md, Configuration) and its validation.

Every problem is collected rather than raised on the first one, so ``check-config`` can name
them all at once by key path and line. Unknown keys are errors: a typo such as
``payment_grase`` must not silently leave the default in force on a production router.

The package: ``schema`` (the frozen dataclasses), ``units`` (durations, sizes, rates, listen
addresses), ``values`` (checks of single values), ``keys`` (walking keys, issues by key path and
line), ``sections`` (one reader per section), ``reader`` (``load_config``, ``read_config``).
This module re-exports what callers use, so they import from ``enforcer.config`` only.
"""

from __future__ import annotations

from ..guard import Guard
from ..model import DEFAULT_THROTTLE_RATE, MIN_DEFAULT_THROTTLE_BURST, Network, default_throttle_burst
from .keys import ConfigIssue
from .reader import DEFAULT_PATH, ConfigError, Reading, default_config_path, load_config, parse_config, read_config
from .schema import (
                     LANGUAGES,
                     MAX_LOGO_BYTES,
                     ApiConfig,
                     Branding,
                     Config,
                     DnsForwarderConfig,
                     FleetConfig,
                     GardenConfig,
                     GatewayConfig,
                     IpsetConfig,
                     Listen,
                     MetricsConfig,
                     NatsConfig,
                     PaymentLink,
                     PolicyConfig,
                     PortalConfig,
                     PortalTls,
                     Provider,
                     ReasonPage,
                     SubscribersConfig,
)
from .units import MIN_THROTTLE_RATE, parse_duration, parse_listen, parse_rate, parse_size

__all__ = [
                     "DEFAULT_PATH",
                     "DEFAULT_THROTTLE_RATE",
                     "LANGUAGES",
                     "MAX_LOGO_BYTES",
                     "MIN_DEFAULT_THROTTLE_BURST",
                     "MIN_THROTTLE_RATE",
                     "ApiConfig",
                     "Branding",
                     "Config",
                     "ConfigError",
                     "ConfigIssue",
                     "DnsForwarderConfig",
                     "FleetConfig",
                     "GardenConfig",
                     "GatewayConfig",
                     "Guard",
                     "IpsetConfig",
                     "Listen",
                     "MetricsConfig",
                     "NatsConfig",
                     "Network",
                     "PaymentLink",
                     "PolicyConfig",
                     "PortalConfig",
                     "PortalTls",
                     "Provider",
                     "Reading",
                     "ReasonPage",
                     "SubscribersConfig",
                     "default_config_path",
                     "default_throttle_burst",
                     "load_config",
                     "parse_config",
                     "parse_duration",
                     "parse_listen",
                     "parse_rate",
                     "parse_size",
                     "read_config",
]
