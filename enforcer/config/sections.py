"""One reader per config section (``subscribers``, ``gateway``, ``walled_garden``, ``portal``,
``api``, ``metrics``, ``policy``): the keys each section knows, their checks, their defaults,
and the rules that tie keys of one section together.

Each reader takes the ``KeyReader`` and the section's raw mapping and returns the section's
dataclass; problems go to the reader, never raised, so every section is always read.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from collections.abc import Callable
from typing import Any

from ..address_space import special_use_problem
from ..guard import Guard
from ..model import DEFAULT_THROTTLE_RATE, SEVERITY, EscalationStep, Network, default_throttle_burst
from ..promises import PromiseRules
from ..windows import HolidayError, Windows, check_zone, load_holidays, parse_days, parse_hours
from . import values
from .keys import KeyReader, dotted
from .schema import (
    BACKENDS,
    IPSET_MIN_THROTTLE_RATE,
    SESSION_KINDS,
    Address,
    ApiConfig,
    Branding,
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
    SessionSourceConfig,
    SubscribersConfig,
)
from .units import optional_listen, parse_duration, parse_listen, parse_rate, parse_size, positive_duration

#: Top-level keys; each is read by the function of the same name below.
TOP_LEVEL = {"state_dir", "subscribers", "gateway", "walled_garden", "portal", "api", "metrics", "policy", "fleet"}


def subscribers(r: KeyReader, top: dict[str, Any], config_path: str) -> SubscribersConfig:
    """``subscribers``: where the restricted list comes from, how it is fetched, the guard."""
    raw = r.section(top.get("subscribers"), ("subscribers",), set(SubscribersConfig.__dataclass_fields__))
    if "subscribers" not in top or "source" not in raw:
        r.fail(("subscribers", "source"), "required: a file path or an http(s) URL of the restricted list")
    source = r.get(raw, ("subscribers", "source"), values.string, "")
    if source.startswith(("http://", "https://")):
        r.get(raw, ("subscribers", "source"), values.http_url, "")
    elif source:
        source = values.relative_to(config_path, source)
    sub = ("subscribers",)
    guard_raw = r.section(raw.get("guard"), sub + ("guard",), set(Guard.__dataclass_fields__))
    guard = Guard(
        max_restrict=r.get(guard_raw, sub + ("guard", "max_restrict"), values.positive_int, Guard.max_restrict),
        max_restrict_share=r.get(guard_raw, sub + ("guard", "max_restrict_share"), values.share,
                                 Guard.max_restrict_share),
        max_lift=r.get(guard_raw, sub + ("guard", "max_lift"), values.positive_int, Guard.max_lift),
        max_lift_share=r.get(guard_raw, sub + ("guard", "max_lift_share"), values.share, Guard.max_lift_share),
    )
    files = {key: r.get(raw, sub + (key,), values.at_config(config_path, values.readable_file), "")
             for key in ("bearer_token_file", "client_cert", "client_key", "ca_file")}
    if any(files.values()) and not source.startswith(("http://", "https://")):
        r.fail(sub, "bearer_token_file, client_cert, client_key and ca_file apply only to an http(s) source")
    if files["client_key"] and not files["client_cert"]:
        r.fail(sub + ("client_key",), "client_key needs client_cert")
    return SubscribersConfig(source, r.get(raw, sub + ("poll_interval",), positive_duration, 60.0),
                             r.get(raw, sub + ("timeout",), positive_duration, 30.0), guard=guard,
                             sessions=_sessions(r, raw.get("sessions"), config_path), **files)


def _sessions(r: KeyReader, value: Any, config_path: str) -> tuple[SessionSourceConfig, ...]:
    """``subscribers.sessions``: ``[{kind: dnsmasq, path: ...}, {kind: radius, listen: ...,
    secret_file: ...}]``. A lease file need not exist yet (the DHCP server writes it first);
    the RADIUS secret must be readable now."""
    base = ("subscribers", "sessions")
    if value is None:
        return ()
    if not isinstance(value, list):
        r.fail(base, "expected a list of {kind: dnsmasq|kea|radius, ...}")
        return ()
    out: list[SessionSourceConfig] = []
    for i, item in enumerate(value):
        path = base + (i,)
        raw = r.section(item, path, {"kind", "name", "path", "poll_interval", "listen", "secret_file", "clients",
                                     "session_timeout"})
        kind = raw.get("kind")
        if kind not in SESSION_KINDS:
            r.fail(path + ("kind",), f"{kind!r} is not one of {', '.join(SESSION_KINDS)}")
            continue
        name = r.get(raw, path + ("name",), values.session_source_name, kind)
        wrong = sorted(k for k in raw if k not in (("kind", "name", "path", "poll_interval") if kind != "radius"
                                                   else ("kind", "name", "listen", "secret_file", "clients",
                                                         "session_timeout")))
        for key in wrong:
            r.fail(path + (key,), f"does not apply to a {kind} source")
        if kind == "radius":
            for key in ("listen", "secret_file"):
                if key not in raw:
                    r.fail(path + (key,), "required for a radius source")
            out.append(SessionSourceConfig(
                kind, name, listen=r.get(raw, path + ("listen",), parse_listen, None),
                secret_file=r.get(raw, path + ("secret_file",), values.at_config(config_path, values.secret_file), ""),
                clients=tuple(r.get(raw, path + ("clients",), values.networks, [])),
                session_timeout=r.get(raw, path + ("session_timeout",), positive_duration, None)))
        else:
            if "path" not in raw:
                r.fail(path + ("path",), f"required: the {kind} lease file")
            file = r.get(raw, path + ("path",), values.at_config(config_path), "")
            out.append(SessionSourceConfig(kind, name, path=file,
                                           poll_interval=r.get(raw, path + ("poll_interval",), positive_duration,
                                                               0.25)))
    names = [s.name for s in out]
    for name in sorted({n for n in names if names.count(n) > 1}):
        r.fail(base, f"two sources are named {name!r}; give each a distinct name")
    return tuple(out)


def gateway(r: KeyReader, top: dict[str, Any]) -> GatewayConfig:
    """``gateway``: the interfaces subscribers come in on, the table name, their prefixes."""
    raw = r.section(top.get("gateway"), ("gateway",),
                    {"subscriber_interfaces", "table", "subscriber_prefixes", "backend", "ipset"})
    interfaces: list[str] = []
    names = raw.get("subscriber_interfaces", [])
    if not isinstance(names, list):
        r.fail(("gateway", "subscriber_interfaces"), "expected a list of interface names ([] = any)")
        names = []
    for i, name in enumerate(names):
        if isinstance(name, str) and (values.IFNAME.match(name) or values.IFNAME_WILDCARD.match(name)):
            interfaces.append(name)
        else:
            r.fail(("gateway", "subscriber_interfaces", i), f"{name!r} is not an interface name (1-15 characters) "
                   "or a prefix wildcard such as ppp* ([] = any interface)")
    table = r.get(raw, ("gateway", "table"), values.table_name, "walled_garden")
    backend = r.get(raw, ("gateway", "backend"), _choice(BACKENDS), "nftables")
    ipset_raw = r.section(raw.get("ipset"), ("gateway", "ipset"), {"rules", "iptables"})
    ipset = IpsetConfig(r.get(ipset_raw, ("gateway", "ipset", "rules"), _choice(("own", "external")), "own"),
                        r.get(ipset_raw, ("gateway", "ipset", "iptables"), _choice(("auto", "nft", "legacy")),
                              "auto"))
    if ipset_raw and backend != "ipset":
        r.fail(("gateway", "ipset"), "applies only with gateway.backend: ipset")
    return GatewayConfig(tuple(interfaces), table, _subscriber_prefixes(r, raw), backend, ipset)


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    """A converter accepting exactly one of ``options``."""
    def convert(value: Any) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return str(value)
    return convert


def backend_support(r: KeyReader, gateway_config: GatewayConfig, garden: GardenConfig,
                    policy_config: PolicyConfig) -> None:
    """What the ipset backend does not do: the DNS-driven garden (``dns: gateway``), whose
    forwarder writes nftables timeout sets, and throttle rates below one full-size packet a
    second (``IPSET_MIN_THROTTLE_RATE``; docs/ipset.md)."""
    if gateway_config.backend != "ipset":
        return
    if garden.forwarder is not None:
        r.fail(("walled_garden", "dns"), "dns: gateway needs gateway.backend: nftables (the ipset backend "
               "supports dns: any or a list of resolvers)")
    if policy_config.throttle_rate < IPSET_MIN_THROTTLE_RATE:
        r.fail(("policy", "throttle_rate"), f"{policy_config.throttle_rate} bytes/s is below the ipset backend's "
               f"minimum of 16 kbit/s ({IPSET_MIN_THROTTLE_RATE} bytes/s: hashlimit holds one second at the rate, and "
               "a full-size packet must fit); use a higher rate or gateway.backend: nftables")


def _subscriber_prefixes(r: KeyReader, raw: dict[str, Any]) -> tuple[Network, ...]:
    """``gateway.subscriber_prefixes``: CIDRs (host bits are an error, as they are a typo)."""
    path = ("gateway", "subscriber_prefixes")
    if "subscriber_prefixes" not in raw:
        return ()
    items = raw["subscriber_prefixes"]
    if not isinstance(items, list) or not items:
        r.fail(path, "expected a non-empty list of CIDRs, e.g. ['100.64.0.0/10', '2001:db8::/32'] "
                     "(leave the key out to accept any unicast address)")
        return ()
    prefixes: list[Network] = []
    for i, item in enumerate(items):
        try:
            if not isinstance(item, str):
                raise ValueError("expected a CIDR such as 100.64.0.0/10")
            prefix = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as exc:
            r.fail(path + (i,), f"{item!r}: {exc}")
            continue
        problem = special_use_problem(prefix)
        if problem:
            r.fail(path + (i,), problem)
        elif prefix in prefixes:
            r.fail(path + (i,), f"{prefix} is listed twice")
        else:
            prefixes.append(prefix)
    return tuple(prefixes)


def walled_garden(r: KeyReader, top: dict[str, Any]) -> GardenConfig:
    """``walled_garden``: what a walled-in subscriber may still reach, how its DNS is handled
    (``dns: any``, a list of resolvers, or ``gateway``: the forwarder), and its NTP servers."""
    path = ("walled_garden",)
    raw = r.section(top.get("walled_garden"), path,
                    {"allow", "dns", "resolvers", "ntp", "dns_forwarder"})
    networks: list[Network] = []
    hosts: list[str] = []
    domains: list[str] = []
    allow = raw.get("allow", [])
    if not isinstance(allow, list):
        r.fail(path + ("allow",), "expected a list of CIDRs, hostnames or *.domains")
        allow = []
    dns_raw = raw.get("dns", "any")
    gateway = dns_raw == "gateway"
    for i, item in enumerate(allow):
        text = str(item)
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        domain = text[2:] if isinstance(item, str) and text.startswith("*.") else None
        name = domain if domain is not None else text
        if not (isinstance(item, str) and values.HOSTNAME.match(name) and not name.replace(".", "").isdigit()):
            r.fail(path + ("allow", i), f"{text!r} is neither a CIDR, a hostname nor a *.domain")
        elif domain is None:
            hosts.append(text.rstrip(".").lower())
        elif domain.rstrip(".").count(".") < 1:
            r.fail(path + ("allow", i), f"{text!r} would allow a whole top-level domain; name the provider's "
                                        "own domain (*.psp.example)")
        elif not gateway:
            r.fail(path + ("allow", i), f"{text!r}: a *.domain needs dns: gateway (names under it are only "
                                        "known from the answers the gateway's forwarder sees)")
        else:
            domains.append(domain.rstrip(".").lower())
    dns: list[Address] | None = None
    if gateway:
        dns = []
    elif dns_raw != "any":
        dns = []
        if not isinstance(dns_raw, list):
            r.fail(path + ("dns",), "expected 'any', 'gateway' or a list of resolver addresses")
        else:
            for i, item in enumerate(dns_raw):
                try:
                    dns.append(ipaddress.ip_address(str(item)))
                except ValueError:
                    r.fail(path + ("dns", i), f"{item!r} is not an IP address")
    resolvers = _addresses(r, raw, path + ("resolvers",))
    if gateway and not resolvers:
        r.fail(path + ("resolvers",), "required with dns: gateway: the resolvers the forwarder asks "
                                      "(e.g. [198.51.100.53])")
    elif not gateway and "resolvers" in raw:
        r.fail(path + ("resolvers",), "only used with dns: gateway (with a list, dns itself names the resolvers)")
    ntp = _addresses(r, raw, path + ("ntp",)) if "ntp" in raw else ([] if gateway else None)
    forwarder = None
    if gateway:
        forwarder = _dns_forwarder(r, raw.get("dns_forwarder"), path + ("dns_forwarder",))
    elif "dns_forwarder" in raw:
        r.fail(path + ("dns_forwarder",), "only used with dns: gateway")
    return GardenConfig(tuple(networks), tuple(dict.fromkeys(hosts)), None if dns is None else tuple(dns),
                        allow_domains=tuple(dict.fromkeys(domains)), resolvers=tuple(resolvers),
                        ntp=None if ntp is None else tuple(ntp), forwarder=forwarder)


def _addresses(r: KeyReader, raw: dict[str, Any], path: tuple[str, ...]) -> list[Address]:
    """A list of IP addresses (``resolvers``, ``ntp``); each bad item named by its index."""
    items = raw.get(path[-1], [])
    if not isinstance(items, list):
        r.fail(path, "expected a list of IP addresses")
        return []
    out: list[Address] = []
    for i, item in enumerate(items):
        try:
            address = ipaddress.ip_address(str(item))
        except ValueError:
            r.fail(path + (i,), f"{item!r} is not an IP address")
            continue
        if address.is_unspecified or address.is_multicast:
            r.fail(path + (i,), f"{address} is not an address a server can have")
        elif address.is_link_local:
            r.fail(path + (i,), f"{address} is link-local: without an interface it cannot be reached; use a "
                                "global or loopback address")
        elif address not in out:
            out.append(address)
    return out


def _dns_forwarder(r: KeyReader, value: Any, path: tuple[str, ...]) -> DnsForwarderConfig:
    raw = r.section(value, path, set(DnsForwarderConfig.__dataclass_fields__))
    d = DnsForwarderConfig()
    port = r.get(raw, path + ("port",), values.port, d.port)
    if port == 53:
        r.fail(path + ("port",), "53 is where the subscribers' queries are redirected from; "
                                 "pick a free local port (default 5300)")
    return DnsForwarderConfig(
        port=port,
        query_rate=r.get(raw, path + ("query_rate",), values.positive_number, d.query_rate),
        query_burst=r.get(raw, path + ("query_burst",), values.positive_int, d.query_burst),
        upstream_timeout=r.get(raw, path + ("upstream_timeout",), positive_duration, d.upstream_timeout),
        ttl_margin=int(r.get(raw, path + ("ttl_margin",), _at_most(parse_duration, DAY, "1d"), d.ttl_margin)),
        max_ttl=int(r.get(raw, path + ("max_ttl",), _at_most(positive_duration, 7 * DAY, "7d"), d.max_ttl)),
        max_addresses=r.get(raw, path + ("max_addresses",), _at_most(values.positive_int, 1 << 24, "16777216"),
                            d.max_addresses))


DAY = 86400


def _at_most(convert: Callable[[Any], Any], limit: float, spelled: str) -> Callable[[Any], Any]:
    """``convert``, then refuse a value above ``limit`` (a set size nft cannot take, a timeout
    that keeps an address open for weeks)."""
    def checked(value: Any) -> Any:
        converted = convert(value)
        if converted > limit:
            raise ValueError(f"{value!r} is more than the most allowed, {spelled}")
        return converted
    return checked


def portal(r: KeyReader, top: dict[str, Any], config_path: str) -> PortalConfig:
    """``portal``: where it listens, who the provider is, ways to pay, branding and texts."""
    raw = r.section(top.get("portal"), ("portal",), set(PortalConfig.__dataclass_fields__))
    base = ("portal",)
    provider_raw = r.section(raw.get("provider"), base + ("provider",), set(Provider.__dataclass_fields__))
    provider = Provider(**{k: r.get(provider_raw, base + ("provider", k), values.string, "")
                           for k in Provider.__dataclass_fields__})
    if provider.email:
        r.get(provider_raw, base + ("provider", "email"), values.email, "")
    if provider.website:
        r.get(provider_raw, base + ("provider", "website"), values.http_url, "")

    links: list[PaymentLink] = []
    links_raw = raw.get("payment_links", [])
    if not isinstance(links_raw, list):
        r.fail(base + ("payment_links",), "expected a list of {label, url}")
        links_raw = []
    for i, item in enumerate(links_raw):
        where = base + ("payment_links", i)
        item = r.section(item, where, {"label", "url"})
        label = r.get(item, where + ("label",), values.string, "")
        url = r.get(item, where + ("url",), values.http_url, "")
        if not label or not url:
            r.fail(where, "each payment link needs a label and an http(s) url")
        else:
            links.append(PaymentLink(label, url))

    tls = None
    if raw.get("tls") is not None:
        tls_raw = r.section(raw.get("tls"), base + ("tls",), {"listen", "cert", "key"})
        missing = [k for k in ("listen", "cert", "key") if k not in tls_raw]
        if missing:
            r.fail(base + ("tls",), f"missing {', '.join(missing)} (listen, cert and key are all needed)")
        else:
            tls = PortalTls(r.get(tls_raw, base + ("tls", "listen"), parse_listen, Listen("0.0.0.0", 8443)),
                            r.get(tls_raw, base + ("tls", "cert"), values.at_config(config_path, values.readable_file),
                                  ""),
                            r.get(tls_raw, base + ("tls", "key"), values.at_config(config_path, values.readable_file),
                                  ""))

    branding_raw = r.section(raw.get("branding"), base + ("branding",), set(Branding.__dataclass_fields__))
    branding = Branding(
        logo=r.get(branding_raw, base + ("branding", "logo"), values.at_config(config_path, values.logo), ""),
        primary_color=r.get(branding_raw, base + ("branding", "primary_color"), values.color,
                            Branding.primary_color),
        background_color=r.get(branding_raw, base + ("branding", "background_color"), values.color,
                               Branding.background_color),
        text_color=r.get(branding_raw, base + ("branding", "text_color"), values.color, Branding.text_color),
    )

    templates_dir = _portal_dir(r, raw, base + ("templates_dir",), config_path)

    texts = _portal_texts(r, raw.get("texts"), base + ("texts",))
    default_language = r.get(raw, base + ("default_language",), _language_tag, "en")
    locale_dir = _portal_dir(r, raw, base + ("locale_dir",), config_path)
    reasons = _portal_reasons(r, raw.get("reasons"), base + ("reasons",), config_path)

    return PortalConfig(
        listen=r.get(raw, base + ("listen",), parse_listen, PortalConfig.listen),
        url=r.get(raw, base + ("url",), values.http_url, PortalConfig.url),
        provider=provider,
        payment_links=tuple(links),
        tls=tls,
        branding=branding,
        templates_dir=templates_dir,
        texts=texts,
        default_language=default_language,
        locale_dir=locale_dir,
        reasons=reasons,
        show_account=r.get(raw, base + ("show_account",), values.boolean, False),
        notice_ack_for=r.get(raw, base + ("notice_ack_for",), positive_duration, PortalConfig.notice_ack_for),
        posts_per_minute=r.get(raw, base + ("posts_per_minute",), values.positive_int,
                               PortalConfig.posts_per_minute),
    )


#: A language as ``portal.texts`` and ``default_language`` name it: ``de``, ``pt-BR``, ``pt_BR``.
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*")


def _language_tag(value: Any) -> str:
    """``pt_BR`` → ``pt-br``. Any language may be named: whether the portal has a catalogue for it
    (shipped, or in ``portal.locale_dir``) is the portal's check (check-config), not the reader's."""
    tag = values.string(value).strip()
    if not _LANGUAGE_TAG.fullmatch(tag):
        raise ValueError(f"{tag!r} is not a language tag like 'de' or 'pt-BR'")
    return tag.replace("_", "-").lower()


def _portal_dir(r: KeyReader, raw: dict[str, Any], path: tuple[str, ...], config_path: str) -> str:
    """A directory key (relative to the config file's directory) that must exist when given."""
    directory = r.get(raw, path, values.at_config(config_path), "")
    if directory and not os.path.isdir(directory):
        r.fail(path, f"{directory}: not a directory")
    return str(directory)


def _portal_texts(r: KeyReader, raw: Any, path: tuple[str | int, ...]) -> dict[str, dict[str, str]]:
    """``texts``: language → message key → text; the keys and placeholders are the portal's check."""
    texts: dict[str, dict[str, str]] = {}
    if raw is None:
        return texts
    if not isinstance(raw, dict):
        r.fail(path, f"expected a mapping of language → message key → text, got {type(raw).__name__}")
        return texts
    for language, strings in raw.items():
        try:
            tag = _language_tag(language)
        except ValueError as exc:
            r.fail(path + (str(language),), str(exc))
            continue
        if not isinstance(strings, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in strings.items()):
            r.fail(path + (str(language),), "expected a mapping of message key → text")
            continue
        texts.setdefault(tag, {}).update(strings)
    return texts


def _portal_reasons(r: KeyReader, raw: Any, path: tuple[str | int, ...],
                    config_path: str) -> dict[str, ReasonPage]:
    """``reasons``: reason → its page (``template``, ``texts``), keyed by the reason as the portal
    compares reasons (lower case, ``-`` and spaces as ``_``)."""
    reasons: dict[str, ReasonPage] = {}
    if raw is None:
        return reasons
    if not isinstance(raw, dict):
        r.fail(path, f"expected a mapping of reason → {{template, texts}}, got {type(raw).__name__}")
        return reasons
    for reason, page in raw.items():
        where = path + (str(reason),)
        normal = str(reason).strip().lower().replace("-", "_").replace(" ", "_")
        if not normal:
            r.fail(where, "empty reason")
            continue
        if normal in reasons:
            r.fail(where, f"the same reason as another key here ({normal!r}: case, '-' and spaces do not matter)")
            continue
        page_raw = r.section(page, where, set(ReasonPage.__dataclass_fields__))
        template = r.get(page_raw, where + ("template",), values.at_config(config_path), "")
        if template and not os.path.isfile(template):
            r.fail(where + ("template",), f"{template}: no such file")
            template = ""
        reasons[normal] = ReasonPage(template=template,
                                     texts=_portal_texts(r, page_raw.get("texts"), where + ("texts",)))
    return reasons


def api(r: KeyReader, top: dict[str, Any]) -> ApiConfig:
    """``api``: the control socket, the webhook listener and its secret."""
    raw = r.section(top.get("api"), ("api",), {"socket", "listen", "webhook_secret_file", "socket_group"})
    return ApiConfig(
        socket=r.get(raw, ("api", "socket"), values.at_config(r.filename), ApiConfig.socket),
        listen=r.get(raw, ("api", "listen"), optional_listen, ApiConfig.listen),
        webhook_secret_file=r.get(raw, ("api", "webhook_secret_file"), values.at_config(r.filename),
                                  ApiConfig.webhook_secret_file),
        socket_group=r.get(raw, ("api", "socket_group"), values.group, ""),
    )


def metrics(r: KeyReader, top: dict[str, Any]) -> MetricsConfig:
    """``metrics``: where the daemon's and the portal's Prometheus endpoints listen."""
    raw = r.section(top.get("metrics"), ("metrics",), {"listen", "portal_listen"})
    return MetricsConfig(
        listen=r.get(raw, ("metrics", "listen"), optional_listen, MetricsConfig.listen),
        portal_listen=r.get(raw, ("metrics", "portal_listen"), optional_listen, MetricsConfig.portal_listen),
    )


def fleet(r: KeyReader, top: dict[str, Any]) -> FleetConfig | None:
    """``fleet``: this gateway's name, NATS and the stream (absent: the gateway runs alone)."""
    if top.get("fleet") is None:
        return None
    raw = r.section(top["fleet"], ("fleet",), set(FleetConfig.__dataclass_fields__))
    if "gateway" not in raw:
        r.fail(("fleet", "gateway"), "required: this gateway's unique name in the fleet")
    if "nats" not in raw:
        r.fail(("fleet", "nats"), "required: how to reach NATS (at least url)")
    nats_path = ("fleet", "nats")
    nats_raw = r.section(raw.get("nats"), nats_path, {"url", "creds_file", "ca_file", "cert_file", "key_file"})
    if raw.get("nats") is not None and "url" not in nats_raw:
        r.fail(nats_path + ("url",), "required: nats://host:port (or a list, one per cluster node)")
    file = values.at_config(r.filename, values.readable_file)
    nats = NatsConfig(
        urls=tuple(r.get(nats_raw, nats_path + ("url",), values.nats_urls, ["nats://127.0.0.1:4222"])),
        creds_file=r.get(nats_raw, nats_path + ("creds_file",), file, ""),
        ca_file=r.get(nats_raw, nats_path + ("ca_file",), file, ""),
        cert_file=r.get(nats_raw, nats_path + ("cert_file",), file, ""),
        key_file=r.get(nats_raw, nats_path + ("key_file",), file, ""))
    if bool(nats.cert_file) != bool(nats.key_file):
        r.fail(nats_path + ("cert_file" if not nats.cert_file else "key_file",),
               "cert_file and key_file go together (a TLS client certificate and its key)")
    d = FleetConfig("", nats)
    return FleetConfig(
        gateway=r.get(raw, ("fleet", "gateway"), values.nats_name, "unnamed"),
        nats=nats,
        stream=r.get(raw, ("fleet", "stream"), values.nats_name, d.stream),
        replicas=r.get(raw, ("fleet", "replicas"), _at_most(values.positive_int, 5, "5"), d.replicas),
        # at most 90 s: systemd gives the unit 120 s to report READY (systemd/walled-garden.service)
        catch_up_timeout=r.get(raw, ("fleet", "catch_up_timeout"), _at_most(positive_duration, 90, "90s"),
                               d.catch_up_timeout),
        answer_timeout=r.get(raw, ("fleet", "answer_timeout"), positive_duration, d.answer_timeout))


def policy(r: KeyReader, top: dict[str, Any]) -> PolicyConfig:
    """``policy``: grace, throttle, windows, escalation, promises, exemptions, audit retention."""
    raw = r.section(top.get("policy"), ("policy",), {"payment_grace", "throttle_rate", "throttle_burst", "windows",
                                                     "escalation", "promise_to_pay", "exemption_default",
                                                     "audit_retention"})
    throttle_rate = r.get(raw, ("policy", "throttle_rate"), parse_rate, DEFAULT_THROTTLE_RATE)
    throttle_burst = r.get(raw, ("policy", "throttle_burst"), parse_size, default_throttle_burst(throttle_rate))
    return PolicyConfig(payment_grace=r.get(raw, ("policy", "payment_grace"), parse_duration,
                                            PolicyConfig.payment_grace),
                        throttle_rate=throttle_rate, throttle_burst=throttle_burst,
                        windows=_windows(r, raw.get("windows")), escalation=_escalation(r, raw.get("escalation")),
                        promise_to_pay=_promise_rules(r, raw.get("promise_to_pay")),
                        exemption_default=r.get(raw, ("policy", "exemption_default"), positive_duration,
                                                PolicyConfig.exemption_default),
                        audit_retention=r.get(raw, ("policy", "audit_retention"), positive_duration,
                                              PolicyConfig.audit_retention))


def _windows(r: KeyReader, value: Any) -> Windows:
    """``policy.windows``: weekdays, hour ranges, time zone, holiday calendar."""
    path = ("policy", "windows")
    raw = r.section(value, path, {"timezone", "days", "hours", "holidays_file"})
    if not raw:
        return Windows.always()
    zone = r.get(raw, path + ("timezone",), lambda v: check_zone(values.string(v)), "UTC")
    days = r.get(raw, path + ("days",), lambda v: parse_days(values.string_list(v)), frozenset(range(5)))
    hours = r.get(raw, path + ("hours",),
                  lambda v: tuple(sorted(parse_hours(h) for h in values.string_list(v))), ((8 * 60, 18 * 60),))
    holidays: frozenset[Any] = frozenset()
    if raw.get("holidays_file"):
        try:
            holidays = load_holidays(values.at_config(r.filename)(raw["holidays_file"]))
        except HolidayError as exc:
            for issue in exc.issues:
                r.fail(path + ("holidays_file",), str(issue))
        except ValueError as exc:
            r.fail(path + ("holidays_file",), str(exc))
    return Windows(zone=zone, days=days, hours=hours, holidays=holidays, configured=True)


def _escalation(r: KeyReader, value: Any) -> tuple[EscalationStep, ...]:
    """``policy.escalation``: ``[{after: 7d, mode: throttle}, {after: 14d, mode: walled-garden}]``."""
    if value is None:
        return ()
    if not isinstance(value, list):
        r.fail(("policy", "escalation"), "expected a list of {after: DURATION, mode: MODE}")
        return ()
    steps = []
    for i, item in enumerate(value):
        path = ("policy", "escalation", i)
        raw = r.section(item, path, {"after", "mode"})
        if not raw or "after" not in raw or "mode" not in raw:
            r.fail(path, "each step needs after (a duration) and mode")
            continue
        after = r.get(raw, path + ("after",), positive_duration, None)
        mode = r.get(raw, path + ("mode",), values.restricting_mode, None)
        if after is not None and mode is not None:
            steps.append(EscalationStep(after, mode))
    steps.sort(key=lambda s: s.after)
    for earlier, later in itertools.pairwise(steps):
        if later.mode is earlier.mode or SEVERITY[later.mode] < SEVERITY[earlier.mode]:
            r.fail(("policy", "escalation"), f"step {later.mode.value} after {later.after / 86400:g} days is not "
                                             f"stricter than {earlier.mode.value} before it")
    return tuple(steps)


def _promise_rules(r: KeyReader, value: Any) -> PromiseRules:
    """``policy.promise_to_pay``: the portal's "I promise to pay" button and its limits."""
    path = ("policy", "promise_to_pay")
    raw = r.section(value, path, {"enabled", "term", "max", "period", "reasons", "webhook_url",
                                  "webhook_secret_file"})
    if not raw:
        return PromiseRules()
    defaults = PromiseRules()

    def count(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError("expected a whole number of at least 1")
        return v

    def reasons(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list) or not all(isinstance(i, str) for i in v):
            raise ValueError("expected a list of reason categories, e.g. [overdue] ([] = any reason)")
        return tuple(v)

    rules = PromiseRules(
        enabled=r.get(raw, path + ("enabled",), values.boolean, True),
        term=r.get(raw, path + ("term",), positive_duration, defaults.term),
        max_count=r.get(raw, path + ("max",), count, defaults.max_count),
        period=r.get(raw, path + ("period",), positive_duration, defaults.period),
        reasons=r.get(raw, path + ("reasons",), reasons, defaults.reasons),
        webhook_url=r.get(raw, path + ("webhook_url",), values.http_url, None),
        webhook_secret_file=r.get(raw, path + ("webhook_secret_file",), values.at_config(r.filename), None))
    if rules.webhook_url and not rules.webhook_secret_file and "webhook_secret_file" not in raw:
        # Signing outgoing promises with the inbound secret would let whoever reads billing's
        # copy of it forge events to us; the outbox has its own secret.
        r.fail(path + ("webhook_secret_file",), "required with webhook_url: a secret of its own for signing "
                                                "promises to billing (not api.webhook_secret_file)")
    if rules.term > rules.period:
        r.fail(path + ("term",), "the term is longer than the period the limit counts over")
    return rules


def forwarder_port(r: KeyReader, garden: GardenConfig, portal_config: PortalConfig, api_config: ApiConfig,
                   metrics_config: MetricsConfig) -> None:
    """The DNS forwarder listens on every address at its port (UDP and TCP): no other listener of
    ours may have that port, or one of the two cannot start."""
    if garden.forwarder is None:
        return
    taken = {"portal.listen": portal_config.listen, "api.listen": api_config.listen,
             "metrics.listen": metrics_config.listen, "metrics.portal_listen": metrics_config.portal_listen}
    if portal_config.tls is not None:
        taken["portal.tls.listen"] = portal_config.tls.listen
    for key, listen in taken.items():
        if listen is not None and listen.port == garden.forwarder.port:
            r.fail(("walled_garden", "dns_forwarder", "port"),
                   f"{garden.forwarder.port} is {key}'s port too; the forwarder listens on every address: "
                   "pick another (default 5300)")


#: Wildcard hosts: a listener on one takes its port on every address (``0.0.0.0`` binds IPv6 too).
_WILDCARDS = (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))


def _same_socket(a: Listen, b: Listen) -> bool:
    """Whether two listeners would want one socket: the same port, and the same address or a
    wildcard on either side."""
    if a.port != b.port:
        return False
    first, second = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    return first == second or first in _WILDCARDS or second in _WILDCARDS


def distinct_listeners(r: KeyReader, subscribers_config: SubscribersConfig, portal_config: PortalConfig,
                       api_config: ApiConfig, metrics_config: MetricsConfig) -> None:
    """Each of our TCP listeners (the portal's, its HTTPS, the webhooks', both metrics) on an
    address:port of its own, and each RADIUS source (UDP) likewise: the second to bind one fails
    at start, after check-config said OK. Named at the key the file gives (a default that clashes
    with a key given is the given key's fault), with the other key in the message."""
    tcp: list[tuple[tuple[str | int, ...], Listen | None]] = [
        (("portal", "listen"), portal_config.listen),
        (("portal", "tls", "listen"), portal_config.tls.listen if portal_config.tls else None),
        (("api", "listen"), api_config.listen),
        (("metrics", "listen"), metrics_config.listen),
        (("metrics", "portal_listen"), metrics_config.portal_listen)]
    udp: list[tuple[tuple[str | int, ...], Listen | None]] = [
        (("subscribers", "sessions", i, "listen"), source.listen)
        for i, source in enumerate(subscribers_config.sessions)]
    for listeners in (tcp, udp):
        for (first, a), (second, b) in itertools.combinations(listeners, 2):
            if a is None or b is None or not _same_socket(a, b):
                continue
            blamed, other, mine, theirs = (second, first, b, a) if r.given(second) or not r.given(first) else \
                (first, second, a, b)
            other_key = dotted(other)
            wildcard = "" if mine == theirs else f" ({theirs}: 0.0.0.0 and [::] take the port on every address)"
            r.flag(blamed, f"{mine} is also {other_key}'s address{wildcard}; two listeners cannot share one address "
                           "and port")


def separate_secrets(r: KeyReader, api_config: ApiConfig, policy_config: PolicyConfig) -> None:
    """Promises to billing are signed with a secret other than the one billing signs with."""
    promise_secret = policy_config.promise_to_pay.webhook_secret_file
    if policy_config.promise_to_pay.webhook_url and promise_secret and \
            os.path.realpath(promise_secret) == os.path.realpath(api_config.webhook_secret_file):
        r.fail(("policy", "promise_to_pay", "webhook_secret_file"),
               "is api.webhook_secret_file; promises to billing need a secret of their own")
