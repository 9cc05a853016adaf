"""Typed configuration (SPEC §2) and its validation.

Every problem is collected rather than raised on the first one, so ``check-config`` can name
them all at once by key path and line. Unknown keys are errors: a typo such as
``payment_grase`` must not silently leave the default in force on a production router.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from . import yamlsource
from .address_space import special_use_problem
from .issues import Issue, IssuesError
from .policy import SEVERITY, EscalationStep
from .promises import PromiseRules
from .subscribers import Mode
from .windows import HolidayError, Windows, check_zone, load_holidays, parse_days, parse_hours

DEFAULT_PATH = "/etc/walled-garden/config.yaml"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def default_config_path() -> str:
    """``WALLED_GARDEN_CONFIG`` overrides the packaged default."""
    return os.environ.get("WALLED_GARDEN_CONFIG") or DEFAULT_PATH


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Guard:
    """Hold a new list that would restrict or lift too many subscribers at once.

    A change is held when it exceeds *both* the count and the share of those restricted now,
    so small deployments are not held for ten changes and large ones not for 101. The first
    list on an empty gateway that restricts more than ``max_restrict`` is held too: approve it
    once with ``walled-garden approve``.
    """

    max_restrict: int = 100
    max_restrict_share: float = 0.25
    max_lift: int = 100
    max_lift_share: float = 0.25


@dataclass(frozen=True)
class SubscribersConfig:
    source: str
    poll_interval: float = 60.0
    timeout: float = 30.0               # whole request, for URL sources
    bearer_token_file: str = ""         # Authorization: Bearer <first line>
    client_cert: str = ""               # PEM certificate (may include the key)
    client_key: str = ""
    ca_file: str = ""                   # trust only this CA bundle for the source
    guard: Guard = Guard()

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))


@dataclass(frozen=True)
class GatewayConfig:
    subscriber_interfaces: tuple[str, ...] = ()
    table: str = "walled_garden"
    #: Where subscribers' addresses lie (SPEC §8); () = any unicast address (``AddressSpace``).
    subscriber_prefixes: tuple[Network, ...] = ()


@dataclass(frozen=True)
class GardenConfig:
    allow_networks: tuple[Network, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    dns: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] | None = None  # None = any


@dataclass(frozen=True)
class Provider:
    name: str = ""
    phone: str = ""
    email: str = ""
    website: str = ""
    hours: str = ""


#: Page languages (SPEC §5); the portal has a full catalogue for each.
LANGUAGES = ("en", "cs", "hu", "es", "uk", "ru", "pt")
#: The logo is inlined into the page, which must stay under 30 KB.
MAX_LOGO_BYTES = 12 * 1024


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


#: ``policy.throttle_rate`` default: 1 mbit/s, in bytes per second.
DEFAULT_THROTTLE_RATE = 125_000
#: The smallest ``throttle_burst`` chosen by default (64 KiB: one GSO/GRO super-packet).
MIN_DEFAULT_THROTTLE_BURST = 64 * 1024


def default_throttle_burst(rate: int) -> int:
    """A tenth of a second at ``rate``, but at least 64 KiB (see ``throttle_burst``)."""
    return max(rate // 10, MIN_DEFAULT_THROTTLE_BURST)


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


ConfigIssue = Issue  # location is "key.path (file:line)"


class ConfigError(IssuesError):
    """The configuration was rejected; ``issues`` names every problem."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
_IFNAME = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.@+-]{1,15}$")  # what Linux accepts
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$")


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"15m"``, ``"72h"``, ``"3d"`` → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90, '15m', '72h' or '3d'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (examples: 90, '15m', '72h', '3d')")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a usable duration (finite, not negative)")
    return seconds


_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_PREFIXES = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}
#: Spelled-out units (any case) → multiplier: ``byte``, ``kbyte``, ``kibyte``... / ``bit``, ``kbit``...
_BYTE_WORDS = {f"{p}{u}": m for p, m in _PREFIXES.items() for u in ("byte", "bytes")}
_BIT_WORDS = {f"{p}{u}": m for p, m in _PREFIXES.items() for u in ("bit", "bits")}
#: Abbreviations, case as written: a capital B is bytes ("Mb" would be ambiguous, so it is refused).
_BYTE_SYMBOLS = {"B": 1, "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
                 "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_PER_SECOND = re.compile(r"\s*/\s*s(?:ec(?:ond)?)?\s*$", re.IGNORECASE)
MIN_THROTTLE_RATE = 1000  # bytes/s (8 kbit/s): anything less is a typo, not a policy


def _byte_unit(unit: str) -> int | None:
    return _BYTE_WORDS.get(unit.lower()) or _BYTE_SYMBOLS.get(unit)


def parse_size(value: Any) -> int:
    """``65536``, ``"64 kbyte"``, ``"64 KiB"``, ``"1 MB"`` → bytes (k/m/g = 1000ⁿ, Ki/Mi/Gi = 1024ⁿ)."""
    problem = f"{value!r} is not a size in bytes (examples: 65536, '64 kbyte', '64 KiB')"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(problem)
    match = _AMOUNT.match(str(value))
    multiplier = _byte_unit(match.group(2) or "byte") if match else None
    if match is None or multiplier is None:
        raise ValueError(problem)
    size = int(float(match.group(1)) * multiplier)
    if size >= 2**32:
        raise ValueError(f"{value!r} is too large (at most 4 GB)")
    return size


def parse_rate(value: Any) -> int:
    """``"1 mbit/s"``, ``"512 kbit/s"``, ``"2 mbyte/s"`` → bytes per second.

    Bits use SI prefixes as ISPs sell them (1 mbit/s = 1,000,000 bit/s = 125,000 bytes/s);
    ``kibit``/``KiB`` and friends are 1024-based. A bare number is refused: bits or bytes?
    """
    problem = f"{value!r} is not a rate (examples: '1 mbit/s', '512 kbit/s', '2 mbyte/s')"
    text = value if isinstance(value, str) else ""
    per_second = _PER_SECOND.search(text)
    match = _AMOUNT.match(text[:per_second.start()]) if per_second else None
    if match is None or not match.group(2):
        raise ValueError(problem)
    number, unit = float(match.group(1)), match.group(2)
    if unit.lower() in _BIT_WORDS:
        rate = int(number * _BIT_WORDS[unit.lower()] / 8)
    elif _byte_unit(unit) is not None:
        rate = int(number * (_byte_unit(unit) or 1))
    else:
        raise ValueError(problem)
    if rate < MIN_THROTTLE_RATE:
        raise ValueError(f"{value!r} is below the minimum of 8 kbit/s (1000 bytes/s)")
    if rate >= 2**40:
        raise ValueError(f"{value!r} is too large")
    return rate


def parse_listen(value: Any) -> Listen:
    """``"0.0.0.0:8080"`` or ``"[::]:8080"``: literal addresses only, no name lookups at bind."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not ADDRESS:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ipaddress.ip_address(host)
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"port {number} is out of range 1-65535")
    return Listen(host, number)


class _Reader:
    """Walks the raw mapping, records issues with key path and line, returns typed values."""

    def __init__(self, located: yamlsource.Located, filename: str) -> None:
        self.located = located
        self.filename = filename
        self.issues: list[ConfigIssue] = []

    def where(self, path: tuple[str | int, ...]) -> str:
        dotted = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path).replace(".[", "[")
        line = self.located.line(path)
        location = f"{self.filename}:{line}" if line else self.filename
        return f"{dotted or '(top level)'} ({location})"

    def fail(self, path: tuple[str | int, ...], message: str) -> None:
        self.issues.append(ConfigIssue(self.where(path), message))

    def section(self, raw: Any, path: tuple[str, ...], known: set[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail(path, f"expected a mapping, got {type(raw).__name__}")
            return {}
        for key in raw:
            if key not in known:
                self.fail(path + (str(key),), f"unknown key; expected one of: {', '.join(sorted(known))}")
        return raw

    def get(self, raw: dict[str, Any], path: tuple[str, ...], convert: Callable[[Any], Any], default: Any) -> Any:
        key = path[-1]
        if key not in raw:
            return default
        try:
            return convert(raw[key])
        except (ValueError, TypeError) as exc:
            self.fail(path, str(exc))
            return default


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _number(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _optional_listen(value: Any) -> Listen | None:
    return None if value in (None, "", False) else parse_listen(value)


def _http_url(value: Any) -> str:
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http(s) URL")
    return text


def _windows(r: _Reader, value: Any) -> Windows:
    """``policy.windows``: weekdays, hour ranges, time zone, holiday calendar."""
    path = ("policy", "windows")
    raw = r.section(value, path, {"timezone", "days", "hours", "holidays_file"})
    if not raw:
        return Windows.always()
    zone = r.get(raw, path + ("timezone",), lambda v: check_zone(_string(v)), "UTC")
    days = r.get(raw, path + ("days",), lambda v: parse_days(_string_list(v)), frozenset(range(5)))
    hours = r.get(raw, path + ("hours",), lambda v: tuple(sorted(parse_hours(h) for h in _string_list(v))),
                  ((8 * 60, 18 * 60),))
    holidays: frozenset[Any] = frozenset()
    if raw.get("holidays_file"):
        try:
            holidays = load_holidays(_string(raw["holidays_file"]))
        except HolidayError as exc:
            for issue in exc.issues:
                r.fail(path + ("holidays_file",), str(issue))
        except ValueError as exc:
            r.fail(path + ("holidays_file",), str(exc))
    return Windows(zone=zone, days=days, hours=hours, holidays=holidays, configured=True)


def _string_list(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        raise ValueError("expected a string or a non-empty list of strings")
    return items


def _escalation(r: _Reader, value: Any) -> tuple[EscalationStep, ...]:
    """``policy.escalation``: ``[{after: 7d, mode: throttle}, {after: 14d, mode: walled-garden}]``."""
    if value is None:
        return ()
    if not isinstance(value, list):
        r.fail(("policy", "escalation"), "expected a list of {after: DURATION, mode: MODE}")
        return ()
    steps = []
    for i, item in enumerate(value):
        path = ("policy", "escalation", i)
        raw = r.section(item, path, {"after", "mode"})  # type: ignore[arg-type]
        if not raw or "after" not in raw or "mode" not in raw:
            r.fail(path, "each step needs after (a duration) and mode")  # type: ignore[arg-type]
            continue
        after = r.get(raw, path + ("after",), _number, None)  # type: ignore[operator]
        mode = r.get(raw, path + ("mode",), _restricting_mode, None)  # type: ignore[operator]
        if after is not None and mode is not None:
            steps.append(EscalationStep(after, mode))
    steps.sort(key=lambda s: s.after)
    for earlier, later in zip(steps, steps[1:]):
        if later.mode is earlier.mode or SEVERITY[later.mode] < SEVERITY[earlier.mode]:
            r.fail(("policy", "escalation"), f"step {later.mode.value} after {later.after / 86400:g} days is not "
                                             f"stricter than {earlier.mode.value} before it")
    return tuple(steps)


def _restricting_mode(value: Any) -> Mode:
    try:
        mode = Mode(str(value))
    except ValueError:
        mode = Mode.FREE
    if mode is Mode.FREE:
        raise ValueError(f"{value!r} is not one of {', '.join(m.value for m in Mode.restricting())}")
    return mode


def _promise_rules(r: _Reader, value: Any) -> PromiseRules:
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

    def flag(v: Any) -> bool:
        if not isinstance(v, bool):
            raise ValueError("expected true or false")
        return v

    def reasons(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list) or not all(isinstance(i, str) for i in v):
            raise ValueError("expected a list of reason categories, e.g. [overdue] ([] = any reason)")
        return tuple(v)

    rules = PromiseRules(
        enabled=r.get(raw, path + ("enabled",), flag, True),
        term=r.get(raw, path + ("term",), _number, defaults.term),
        max_count=r.get(raw, path + ("max",), count, defaults.max_count),
        period=r.get(raw, path + ("period",), _number, defaults.period),
        reasons=r.get(raw, path + ("reasons",), reasons, defaults.reasons),
        webhook_url=r.get(raw, path + ("webhook_url",), _http_url, None),
        webhook_secret_file=r.get(raw, path + ("webhook_secret_file",), _string, None))
    if rules.webhook_url and not rules.webhook_secret_file and "webhook_secret_file" not in raw:
        # Signing outgoing promises with the inbound secret would let whoever reads billing's
        # copy of it forge events to us; the outbox has its own secret.
        r.fail(path + ("webhook_secret_file",), "required with webhook_url: a secret of its own for signing "
                                                "promises to billing (not api.webhook_secret_file)")
    if rules.term > rules.period:
        r.fail(path + ("term",), "the term is longer than the period the limit counts over")
    return rules


def load_config(path: str | None = None) -> Config:
    """Read and validate; raises ``ConfigError`` naming every problem."""
    path = path or default_config_path()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(path, f"cannot read: {exc.strerror or exc}")]) from None
    return parse_config(text, path)


def parse_config(text: str, path: str = "config.yaml") -> Config:
    try:
        located = yamlsource.load(text)
    except yamlsource.YamlSyntaxError as exc:
        where = f"{path}:{exc.line}" if exc.line else path
        raise ConfigError([ConfigIssue(where, f"not valid YAML: {exc}")]) from None
    r = _Reader(located, path)
    top = r.section(located.data, (), {"state_dir", "subscribers", "gateway", "walled_garden",
                                       "portal", "api", "metrics", "policy"})
    if located.data is None:
        r.fail((), "the file is empty")

    state_dir = r.get(top, ("state_dir",), _string, "/var/lib/walled-garden")

    raw = r.section(top.get("subscribers"), ("subscribers",), set(SubscribersConfig.__dataclass_fields__))
    if "subscribers" not in top or "source" not in raw:
        r.fail(("subscribers", "source"), "required: a file path or an http(s) URL of the restricted list")
    source = r.get(raw, ("subscribers", "source"), _string, "")
    if source.startswith(("http://", "https://")):
        r.get(raw, ("subscribers", "source"), _http_url, "")
    elif source and not source.startswith("/"):
        source = str((Path(path).parent / source).resolve())
    sub = ("subscribers",)
    guard_raw = r.section(raw.get("guard"), sub + ("guard",), set(Guard.__dataclass_fields__))
    guard = Guard(
        max_restrict=r.get(guard_raw, sub + ("guard", "max_restrict"), _positive_int, Guard.max_restrict),
        max_restrict_share=r.get(guard_raw, sub + ("guard", "max_restrict_share"), _share, Guard.max_restrict_share),
        max_lift=r.get(guard_raw, sub + ("guard", "max_lift"), _positive_int, Guard.max_lift),
        max_lift_share=r.get(guard_raw, sub + ("guard", "max_lift_share"), _share, Guard.max_lift_share),
    )
    files = {key: r.get(raw, sub + (key,), _readable_file, "")
             for key in ("bearer_token_file", "client_cert", "client_key", "ca_file")}
    if any(files.values()) and not source.startswith(("http://", "https://")):
        r.fail(sub, "bearer_token_file, client_cert, client_key and ca_file apply only to an http(s) source")
    if files["client_key"] and not files["client_cert"]:
        r.fail(sub + ("client_key",), "client_key needs client_cert")
    subscribers = SubscribersConfig(source, r.get(raw, sub + ("poll_interval",), _number, 60.0),
                                    r.get(raw, sub + ("timeout",), _number, 30.0), guard=guard, **files)

    raw = r.section(top.get("gateway"), ("gateway",), {"subscriber_interfaces", "table", "subscriber_prefixes"})
    interfaces: list[str] = []
    names = raw.get("subscriber_interfaces", [])
    if not isinstance(names, list):
        r.fail(("gateway", "subscriber_interfaces"), "expected a list of interface names ([] = any)")
        names = []
    for i, name in enumerate(names):
        if isinstance(name, str) and _IFNAME.match(name):
            interfaces.append(name)
        else:
            r.fail(("gateway", "subscriber_interfaces", i), f"{name!r} is not an interface name (1-15 characters)")
    table = r.get(raw, ("gateway", "table"), _table_name, "walled_garden")
    gateway = GatewayConfig(tuple(interfaces), table, _subscriber_prefixes(r, raw))

    garden = _garden(r, r.section(top.get("walled_garden"), ("walled_garden",), {"allow", "dns"}))

    portal = _portal(r, r.section(top.get("portal"), ("portal",), set(PortalConfig.__dataclass_fields__)), path)

    raw = r.section(top.get("api"), ("api",), {"socket", "listen", "webhook_secret_file", "socket_group"})
    api = ApiConfig(
        socket=r.get(raw, ("api", "socket"), _string, ApiConfig.socket),
        listen=r.get(raw, ("api", "listen"), _optional_listen, ApiConfig.listen),
        webhook_secret_file=r.get(raw, ("api", "webhook_secret_file"), _string, ApiConfig.webhook_secret_file),
        socket_group=r.get(raw, ("api", "socket_group"), _group, ""),
    )

    raw = r.section(top.get("metrics"), ("metrics",), {"listen", "portal_listen"})
    metrics = MetricsConfig(
        listen=r.get(raw, ("metrics", "listen"), _optional_listen, MetricsConfig.listen),
        portal_listen=r.get(raw, ("metrics", "portal_listen"), _optional_listen, MetricsConfig.portal_listen),
    )

    raw = r.section(top.get("policy"), ("policy",), {"payment_grace", "throttle_rate", "throttle_burst", "windows",
                                                     "escalation", "promise_to_pay", "exemption_default",
                                                     "audit_retention"})
    throttle_rate = r.get(raw, ("policy", "throttle_rate"), parse_rate, DEFAULT_THROTTLE_RATE)
    throttle_burst = r.get(raw, ("policy", "throttle_burst"), parse_size, default_throttle_burst(throttle_rate))
    policy = PolicyConfig(payment_grace=r.get(raw, ("policy", "payment_grace"), parse_duration,
                                              PolicyConfig.payment_grace),
                          throttle_rate=throttle_rate, throttle_burst=throttle_burst,
                          windows=_windows(r, raw.get("windows")), escalation=_escalation(r, raw.get("escalation")),
                          promise_to_pay=_promise_rules(r, raw.get("promise_to_pay")),
                          exemption_default=r.get(raw, ("policy", "exemption_default"), _number,
                                                  PolicyConfig.exemption_default),
                          audit_retention=r.get(raw, ("policy", "audit_retention"), _number,
                                                PolicyConfig.audit_retention))

    promise_secret = policy.promise_to_pay.webhook_secret_file
    if policy.promise_to_pay.webhook_url and promise_secret and \
            os.path.realpath(promise_secret) == os.path.realpath(api.webhook_secret_file):
        r.fail(("policy", "promise_to_pay", "webhook_secret_file"),
               "is api.webhook_secret_file; promises to billing need a secret of their own")
    if r.issues:
        raise ConfigError(r.issues)
    return Config(path=path, state_dir=state_dir, subscribers=subscribers, gateway=gateway,
                  walled_garden=garden, portal=portal, api=api, metrics=metrics, policy=policy)


def _subscriber_prefixes(r: _Reader, raw: dict[str, Any]) -> tuple[Network, ...]:
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


def _group(value: Any) -> str:
    """A group that exists on this machine (``groupadd --system walled-garden`` creates ours)."""
    text = _string(value)
    try:
        grp.getgrnam(text)
    except KeyError:
        raise ValueError(f"no group {text!r} on this machine (create it: groupadd --system {text})") from None
    return text


def _table_name(value: Any) -> str:
    text = _string(value)
    if not _TABLE.match(text):
        raise ValueError(f"{text!r} is not a valid nftables table name (letters, digits, _; max 32)")
    return text


def _garden(r: _Reader, raw: dict[str, Any]) -> GardenConfig:
    networks: list[Network] = []
    hosts: list[str] = []
    allow = raw.get("allow", [])
    if not isinstance(allow, list):
        r.fail(("walled_garden", "allow"), "expected a list of CIDRs or hostnames")
        allow = []
    for i, item in enumerate(allow):
        text = str(item)
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        if isinstance(item, str) and _HOSTNAME.match(text) and not text.replace(".", "").isdigit():
            hosts.append(text.rstrip("."))
        else:
            r.fail(("walled_garden", "allow", i), f"{text!r} is neither a CIDR nor a hostname")
    dns_raw = raw.get("dns", "any")
    dns: list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None = None
    if dns_raw != "any":
        dns = []
        if not isinstance(dns_raw, list):
            r.fail(("walled_garden", "dns"), "expected 'any' or a list of resolver addresses")
        else:
            for i, item in enumerate(dns_raw):
                try:
                    dns.append(ipaddress.ip_address(str(item)))
                except ValueError:
                    r.fail(("walled_garden", "dns", i), f"{item!r} is not an IP address")
    return GardenConfig(tuple(networks), tuple(hosts), None if dns is None else tuple(dns))


_COLOR = re.compile(r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")
_EMAIL = re.compile(r"^[^@\s<>\"']+@[^@\s<>\"']+\.[^@\s<>\"']+$")


def _color(value: Any) -> str:
    text = _string(value)
    if not _COLOR.match(text):
        raise ValueError(f"{text!r} is not a colour like '#0b5394'")
    return text


def _readable_file(value: Any) -> str:
    text = _string(value)
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError(f"{text}: not a readable file")
    return text


def _logo(value: Any) -> str:
    text = _readable_file(value)
    size = os.path.getsize(text)
    if size > MAX_LOGO_BYTES:
        raise ValueError(f"{text}: {size} bytes; the logo is inlined into the page and may be at most "
                         f"{MAX_LOGO_BYTES} bytes")
    if not text.lower().endswith((".png", ".svg", ".jpg", ".jpeg", ".webp", ".gif")):
        raise ValueError(f"{text}: use a .png, .svg, .jpg, .webp or .gif logo")
    return text


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("expected a whole number greater than zero")
    return value


def _portal(r: _Reader, raw: dict[str, Any], config_path: str) -> PortalConfig:
    base = ("portal",)
    provider_raw = r.section(raw.get("provider"), base + ("provider",), set(Provider.__dataclass_fields__))
    provider = Provider(**{k: r.get(provider_raw, base + ("provider", k), _string, "")
                           for k in Provider.__dataclass_fields__})
    if provider.email:
        r.get(provider_raw, base + ("provider", "email"), _email, "")
    if provider.website:
        r.get(provider_raw, base + ("provider", "website"), _http_url, "")

    links: list[PaymentLink] = []
    links_raw = raw.get("payment_links", [])
    if not isinstance(links_raw, list):
        r.fail(base + ("payment_links",), "expected a list of {label, url}")
        links_raw = []
    for i, item in enumerate(links_raw):
        where = base + ("payment_links", i)
        item = r.section(item, where, {"label", "url"})
        label, url = r.get(item, where + ("label",), _string, ""), r.get(item, where + ("url",), _http_url, "")
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
                            r.get(tls_raw, base + ("tls", "cert"), _readable_file, ""),
                            r.get(tls_raw, base + ("tls", "key"), _readable_file, ""))

    branding_raw = r.section(raw.get("branding"), base + ("branding",), set(Branding.__dataclass_fields__))
    branding = Branding(
        logo=r.get(branding_raw, base + ("branding", "logo"), _logo, ""),
        primary_color=r.get(branding_raw, base + ("branding", "primary_color"), _color, Branding.primary_color),
        background_color=r.get(branding_raw, base + ("branding", "background_color"), _color,
                               Branding.background_color),
        text_color=r.get(branding_raw, base + ("branding", "text_color"), _color, Branding.text_color),
    )

    templates_dir = r.get(raw, base + ("templates_dir",), _string, "")
    if templates_dir:
        if not templates_dir.startswith("/"):
            templates_dir = str((Path(config_path).parent / templates_dir).resolve())
        if not os.path.isdir(templates_dir):
            r.fail(base + ("templates_dir",), f"{templates_dir}: not a directory")

    texts: dict[str, dict[str, str]] = {}
    texts_raw = r.section(raw.get("texts"), base + ("texts",), set(LANGUAGES))
    for language, strings in texts_raw.items():
        if language not in LANGUAGES:
            continue  # already reported as an unknown key
        if not isinstance(strings, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in strings.items()):
            r.fail(base + ("texts", language), "expected a mapping of message key → text")
            continue
        texts[language] = dict(strings)

    default_language = r.get(raw, base + ("default_language",), _string, "en")
    if default_language not in LANGUAGES:
        r.fail(base + ("default_language",), f"{default_language!r} is not one of {', '.join(LANGUAGES)}")
        default_language = "en"

    return PortalConfig(
        listen=r.get(raw, base + ("listen",), parse_listen, PortalConfig.listen),
        url=r.get(raw, base + ("url",), _http_url, PortalConfig.url),
        provider=provider,
        payment_links=tuple(links),
        tls=tls,
        branding=branding,
        templates_dir=templates_dir,
        texts=texts,
        default_language=default_language,
        show_account=r.get(raw, base + ("show_account",), _boolean, False),
        notice_ack_for=r.get(raw, base + ("notice_ack_for",), _number, PortalConfig.notice_ack_for),
        posts_per_minute=r.get(raw, base + ("posts_per_minute",), _positive_int, PortalConfig.posts_per_minute),
    )


def _email(value: Any) -> str:
    text = _string(value)
    if not _EMAIL.match(text):
        raise ValueError(f"{text!r} is not an e-mail address")
    return text


def _share(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError("expected a share between 0 and 1, e.g. 0.25")
    return float(value)
