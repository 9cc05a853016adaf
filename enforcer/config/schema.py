"""The configuration as the rest of the program sees it (docs/reference.md, Configuration):
frozen dataclasses, one per section, with the defaults a missing key takes.

Kept apart from the reading so that every consumer (daemon, portal, CLI, tests building a
``Config`` by hand) depends on plain values only, never on YAML or on how errors are worded.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..guard import Guard
from ..model import DEFAULT_THROTTLE_RATE, EscalationStep, Network, default_throttle_burst
from ..promises import PromiseRules
from ..windows import Windows

#: Page languages whose catalogues ship with the portal (docs/portal.md, Texts and languages); a
#: provider adds more with ``portal.locale_dir``, so config accepts any language tag.
LANGUAGES = ("en", "cs", "hu", "es", "uk", "ru", "pt")
#: The logo is inlined into the page, which must stay under 30 KB.
MAX_LOGO_BYTES = 12 * 1024


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


#: Kinds of session source (docs/reference.md, Sessions).
SESSION_KINDS = ("dnsmasq", "kea", "radius")


@dataclass(frozen=True)
class SessionSourceConfig:
    """One entry of ``subscribers.sessions``: a lease file (dnsmasq, kea) or a RADIUS
    accounting listener (radius)."""

    kind: str
    name: str                             # label in status and metrics; default the kind
    path: str = ""                        # dnsmasq, kea: the lease file
    poll_interval: float = 0.25           # dnsmasq, kea: how often the file is checked
    listen: Listen | None = None          # radius
    secret_file: str = ""                 # radius: the shared secret (first line)
    clients: tuple[Network, ...] = ()     # radius: who may send accounting (() = anyone who knows the secret)
    session_timeout: float | None = None  # radius: a session with no word for this long ends


@dataclass(frozen=True)
class SubscribersConfig:
    source: str
    poll_interval: float = 60.0
    timeout: float = 30.0               # whole request, for URL sources
    bearer_token_file: str = ""         # Authorization: Bearer <first line>
    client_cert: str = ""               # PEM certificate (may include the key)
    client_key: str = ""
    ca_file: str = ""                   # trust only this CA bundle for the source
    guard: Guard = field(default_factory=Guard)
    sessions: tuple[SessionSourceConfig, ...] = ()

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))


#: ``gateway.backend``: the nftables table, or ipsets (docs/ipset.md).
BACKENDS = ("nftables", "ipset")
#: The lowest ``policy.throttle_rate`` (bytes/s, 16 kbit/s) the ipset backend's ``hashlimit``
#: rules can enforce: their bucket holds one second at the rate, and a full-size 1500-byte
#: packet must fit in it (``dataplane.iptables_rules``' docstring).
IPSET_MIN_THROTTLE_RATE = 2000


@dataclass(frozen=True)
class IpsetConfig:
    """``gateway.ipset`` (docs/ipset.md): with ``rules: own`` the daemon installs its own iptables
    chains, with ``external`` only the sets; ``iptables`` picks iptables-nft or -legacy (``auto``:
    whichever ``iptables`` is on the system)."""

    rules: str = "own"          # own | external
    iptables: str = "auto"      # auto | nft | legacy


@dataclass(frozen=True)
class GatewayConfig:
    subscriber_interfaces: tuple[str, ...] = ()
    table: str = "walled_garden"
    #: Where subscribers' addresses lie (docs/reference.md, Safety rules 1); () = any unicast
    #: address (``AddressSpace``).
    subscriber_prefixes: tuple[Network, ...] = ()
    backend: str = "nftables"   # BACKENDS
    ipset: IpsetConfig = IpsetConfig()


@dataclass(frozen=True)
class DnsForwarderConfig:
    """``walled_garden.dns_forwarder``: the forwarder ``dns: gateway`` runs (docs/reference.md,
    "DNS-driven walled garden")."""

    port: int = 5300                 # local port the redirected DNS lands on (UDP and TCP)
    query_rate: float = 20.0         # per subscriber address, queries/s
    query_burst: int = 200           # queries a subscriber may send at once
    upstream_timeout: float = 2.0    # seconds per resolver before the next one is asked
    ttl_margin: int = 120            # seconds a learnt address stays beyond its TTL
    max_ttl: int = 86400             # longer TTLs are cut to this
    max_addresses: int = 65536       # per family: the learnt-address sets' size cap


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class GardenConfig:
    allow_networks: tuple[Network, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    #: ``dns: any`` is None; a list of resolvers is that list; ``dns: gateway`` is () (no resolver
    #: is reached directly: every query is redirected to the forwarder, ``forwarder``).
    dns: tuple[Address, ...] | None = None
    allow_domains: tuple[str, ...] = ()       # "*.psp.example" as "psp.example" (dns: gateway only)
    resolvers: tuple[Address, ...] = ()       # the forwarder's upstreams (dns: gateway only)
    ntp: tuple[Address, ...] | None = None    # NTP servers reachable while restricted; None = any
    forwarder: DnsForwarderConfig | None = None   # set exactly when dns: gateway

    def covers_host(self, host: str) -> bool:
        """Whether a restricted subscriber may reach ``host`` (a name or an address literal):
        an allowed name, a name under an allowed ``*.`` domain, or an address in an allowed CIDR."""
        host = host.lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return (host in (h.lower() for h in self.allow_hosts)
                    or any(host.endswith("." + domain) for domain in self.allow_domains))
        return any(address in network for network in self.allow_networks)


@dataclass(frozen=True)
class Provider:
    name: str = ""
    phone: str = ""
    email: str = ""
    website: str = ""
    hours: str = ""


@dataclass(frozen=True)
class PaymentLink:
    """A way to pay, inside the walled garden (its host must be in ``walled_garden.allow``)."""

    label: str
    url: str


@dataclass(frozen=True)
class PortalTls:
    listen: Listen
    cert: str
    key: str


@dataclass(frozen=True)
class Branding:
    logo: str = ""                      # PNG/SVG/JPEG/WebP file, inlined as a data: URI
    primary_color: str = "#0b5394"
    background_color: str = "#f4f6f8"
    text_color: str = "#1a1a1a"


@dataclass(frozen=True)
class ReasonPage:
    """``portal.reasons.<reason>``: the page for subscribers restricted for this reason."""

    template: str = ""                  # a page.html-like file that replaces the page's template
    texts: dict[str, dict[str, str]] = field(default_factory=dict)   # language → message key → text


@dataclass(frozen=True)
class PortalConfig:
    listen: Listen = Listen("0.0.0.0", 8080)
    url: str = "http://portal.isp.example/"
    provider: Provider = Provider()
    payment_links: tuple[PaymentLink, ...] = ()
    tls: PortalTls | None = None
    branding: Branding = Branding()
    templates_dir: str = ""             # a page.html here replaces the built-in template
    texts: dict[str, dict[str, str]] = field(default_factory=dict)   # language → message key → text
    default_language: str = "en"
    locale_dir: str = ""                # <language>.po / .mo catalogues: more languages, or rewording
    reasons: dict[str, ReasonPage] = field(default_factory=dict)     # normalised reason → its page
    show_account: bool = False          # show the account id and the caller's address on the page
    notice_ack_for: float = 86400.0     # how long "continue" lifts the notice interstitial
    posts_per_minute: int = 10          # per caller address, on every POST


@dataclass(frozen=True)
class ApiConfig:
    socket: str = "/run/walled-garden/control.sock"
    listen: Listen | None = Listen("0.0.0.0", 8787)
    webhook_secret_file: str = "/etc/walled-garden/webhook.secret"
    socket_group: str = ""              # group given access to the socket (the portal's), "" = owner's


@dataclass(frozen=True)
class MetricsConfig:
    listen: Listen | None = Listen("127.0.0.1", 9640)
    portal_listen: Listen | None = Listen("127.0.0.1", 9641)


@dataclass(frozen=True)
class PolicyConfig:
    payment_grace: float = 3 * 86400.0
    throttle_rate: int = DEFAULT_THROTTLE_RATE       # bytes per second, per subscriber and direction
    throttle_burst: int = default_throttle_burst(DEFAULT_THROTTLE_RATE)  # bytes above the rate
    windows: Windows = field(default_factory=Windows.always)  # when new restrictions may start
    escalation: tuple[EscalationStep, ...] = ()               # list mode → stricter after a while
    promise_to_pay: PromiseRules = field(default_factory=PromiseRules)
    exemption_default: float = 30 * 86400.0  # a dispute/outage opened by billing without an end
    audit_retention: float = 400 * 86400.0   # audit rows older than this are deleted


@dataclass(frozen=True)
class NatsConfig:
    """How a fleet gateway reaches NATS: one URL or a cluster's, credentials and TLS from files."""

    urls: tuple[str, ...]
    creds_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class FleetConfig:
    """``fleet`` (docs/reference.md, Fleet): this gateway's name and the JetStream stream every
    gateway of the fleet takes its inputs from."""

    gateway: str
    nats: NatsConfig
    stream: str = "WALLED_GARDEN"
    replicas: int = 1                  # of the stream and the KV buckets, when this gateway creates them
    catch_up_timeout: float = 30.0     # start: how long to catch up with the stream before READY=1
    answer_timeout: float = 10.0       # a webhook waits this long for the stream and its own commit (else 503)


@dataclass(frozen=True)
class Config:
    path: str
    state_dir: str
    subscribers: SubscribersConfig
    gateway: GatewayConfig = GatewayConfig()
    walled_garden: GardenConfig = GardenConfig()
    portal: PortalConfig = PortalConfig()
    api: ApiConfig = ApiConfig()
    metrics: MetricsConfig = MetricsConfig()
    policy: PolicyConfig = PolicyConfig()
    fleet: FleetConfig | None = None
