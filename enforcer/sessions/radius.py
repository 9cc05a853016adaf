"""RADIUS accounting receiver: a BNG's Start / Interim-Update / Stop become sessions.

A BNG (accel-ppp, MikroTik, Juniper ...) sends one Accounting-Request per session event to
its accounting servers; this source is one of them (``{kind: radius, listen:, secret_file:}``).
It answers Accounting-Response **only after** ``sink.update`` returned, i.e. once the change
is enforced and saved: a NAS that got no answer resends, so a change that failed to commit
(``SessionChangeFailed``: no answer) is retried by the NAS itself and never lost.

Why not pyrad's ``ServerAsync``: it drops a packet with a bad authenticator, an unknown client
or an undecodable packet with a log line only (each must be reported to the sink and counted
here), it knows clients by single address rather than by network, opens its socket with
``SO_REUSEPORT`` (a second daemon on the same port would silently share the packets), and
calls a synchronous handler. So a small ``asyncio.DatagramProtocol`` feeds pyrad's own
decoding (``AcctPacket``), verification (``VerifyAcctRequest``, the Message-Authenticator)
and reply (``CreateReply`` / ``ReplyPacket``, which copies Proxy-State).

What a packet gives:

- key ``<nas>/<Acct-Session-Id>``, ``<nas>`` being NAS-IP-Address, else NAS-IPv6-Address,
  else NAS-Identifier, else the packet's source address;
- match: ``username`` = User-Name; ``mac`` = Calling-Station-Id when it is a MAC address
  (many BNGs put the subscriber's MAC there; other values are ignored without a report);
  ``circuit_id`` / ``remote_id`` = the DSL Forum ADSL-Agent-Circuit-Id / -Remote-Id (vendor
  3561, RFC 4679), as text when printable ASCII, else as colon-separated hex octets;
- addresses: Framed-IP-Address (/32), Framed-IPv6-Address (/128), Framed-IPv6-Prefix,
  Delegated-IPv6-Prefix; one the sink refuses (``address_problem``) is reported as
  ``outside_prefixes`` and left out, the session keeps its other addresses;
- ``expires``: receipt + ``session_timeout`` when configured, else receipt + 3 x
  Acct-Interim-Interval when the packet carries it, else None. An Interim-Update renews it,
  so a session whose Stop was lost ends by itself.

Choices, each deliberate:

- Start and Interim-Update both start (or update) the session: an Interim-Update may be the
  first packet seen (a lost Start, a restart of this daemon). One *without any usable
  address* changes nothing and is answered: IPoE BNGs send Start before DHCP gave an address
  and the address in a later Interim-Update; not a problem, so not counted.
- Stop ends the key. A Start or Interim-Update for a key stopped in the last
  ``TOMBSTONE_SECONDS`` (a retransmission that lost the race with its Stop) is answered and
  ignored, so a stale packet never revives an ended session; each is counted (``stale`` in
  ``status``) and logged (``event=radius_stale_ignored``).
- Accounting-On / Accounting-Off (the NAS rebooted, or is going down) end every session this
  receiver knows of that NAS: those the daemon holds (saved before a restart too), the ones
  started since and those in flight. They also forget that NAS's stopped keys: a rebooted NAS
  numbers its sessions afresh (``00000001`` again), and its new Start must not be taken for a
  late copy of the old session's (that left the new session unenforced for up to
  ``TOMBSTONE_SECONDS``), and the duplicates in flight from its address (a packet it sends
  after the reboot is new even when its octets equal one sent before it).
- Packets of one session key are committed in arrival order (each waits for the previous
  one of its key); different keys commit concurrently, so the sink can batch them.
- Duplicates (RFC 5080 section 2.2.2: same source address and port, Identifier and Request
  Authenticator) that arrive while the first is still being committed are dropped: the
  answer to the first answers them too. A retransmission after the answer (which was lost)
  is processed again; that is idempotent.
- Status-Server (RFC 5997) with a valid Message-Authenticator is answered (NAS health checks).
- Acct-Status-Type values with no effect here (Failed, tunnel accounting) are answered only.

Bad input, each reported with ``sink.problem`` (which logs and counts it) and changing
nothing else: a source outside ``clients`` (``unknown_client``), a packet that is truncated,
has bad attribute lengths, is not an Accounting-Request or lacks Acct-Status-Type /
Acct-Session-Id, or has an unreadable value in an attribute used here (``malformed``); a
wrong Request Authenticator or Message-Authenticator, i.e. a wrong secret
(``bad_authenticator``): all dropped unanswered (RFC 2866 section 3: silently discarded).
Attributes not in ``radius.dictionary`` (a BNG's vendor attributes) are reported as
``unknown_attribute`` (their numbers) and ignored: the packet is still processed and
answered from the attributes known. A User-Name or circuit/remote id that cannot be a match
value is reported ``malformed`` and that key is left out. The datagram handler never raises:
an unexpected error is logged with its traceback and counted (``failures`` in ``status``).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from pyrad import packet as rad  # type: ignore[import-untyped]
from pyrad.dictionary import Dictionary  # type: ignore[import-untyped]

from ..match import Match, normal_mac, normal_value
from ..model import Network
from .session import Session
from .source import SessionChangeFailed, SessionSink

log = logging.getLogger(__name__)

KIND = "radius"
#: RFC 2865 section 3: a RADIUS packet is 20 to 4096 octets.
HEADER = 20
MAX_PACKET = 4096
#: Packets being committed at once; beyond it a packet is dropped unanswered (the NAS resends).
MAX_IN_FLIGHT = 10_000
#: How long a stopped key stays stopped against late Start/Interim-Update retransmissions.
TOMBSTONE_SECONDS = 600.0
MAX_TOMBSTONES = 100_000
#: An Interim-Update missed this many times in a row ends the session (with Acct-Interim-Interval).
MISSED_INTERIMS = 3

DICTIONARY = Dictionary(io.StringIO(files(__package__).joinpath("radius.dictionary").read_text("utf-8")))

_STARTS = frozenset({"Start", "Interim-Update"})
_NAS_RESETS = frozenset({"Accounting-On", "Accounting-Off"})
#: Address attributes in the order they are read, and the prefix length of a bare address.
_ADDRESSES = (("Framed-IP-Address", 32), ("Framed-IPv6-Address", 128),
              ("Framed-IPv6-Prefix", None), ("Delegated-IPv6-Prefix", None))
_PRINTABLE = frozenset(range(0x20, 0x7F))


class Refused(Exception):
    """A packet dropped unanswered: ``kind`` is one of ``PROBLEMS``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass
class Accounting:
    """What one authentic Accounting-Request says, read from its known attributes."""

    status: str                     # "Start", "Stop", ... or the number of an unnamed value
    nas: str
    session_id: str                 # "" for Accounting-On/Off
    match: Match = field(default_factory=Match)
    addresses: tuple[Network, ...] = ()
    interim: int | None = None      # Acct-Interim-Interval, seconds
    problems: list[tuple[str, str]] = field(default_factory=list)   # (kind, detail), reported by the caller

    @property
    def key(self) -> str:
        return f"{self.nas}/{self.session_id}"


def check_structure(data: bytes) -> int:
    """The packet's length (octets after it are padding, RFC 2865 section 3) when its header and
    every attribute's length are consistent; ``Refused("malformed")`` naming the first fault.
    pyrad itself would take an attribute running past the end as a shorter value."""
    if len(data) < HEADER:
        raise Refused("malformed", f"packet of {len(data)} octets is shorter than the {HEADER}-octet header")
    length: int = struct.unpack("!H", data[2:4])[0]
    if not HEADER <= length <= MAX_PACKET or length > len(data):
        raise Refused("malformed", f"packet length field {length} does not fit the {len(data)} octets "
                                   f"received (must be {HEADER}..{MAX_PACKET})")
    at = HEADER
    while at < length:
        if length - at < 2:
            raise Refused("malformed", f"attribute header at octet {at} is cut off")
        code, size = data[at], data[at + 1]
        if size < 2 or at + size > length:
            raise Refused("malformed", f"attribute {code} at octet {at} has length {size}, "
                                       f"which does not fit the packet")
        at += size
    return length


def decode(data: bytes, secret: bytes) -> Any:
    """The verified ``pyrad.packet.AcctPacket`` of an Accounting-Request or Status-Server;
    ``Refused`` (malformed / bad_authenticator) otherwise."""
    length = check_structure(data)
    code = data[0]
    if code not in (rad.AccountingRequest, rad.StatusServer):
        raise Refused("malformed", f"packet code {code} is not an Accounting-Request ({rad.AccountingRequest})")
    try:
        request = rad.AcctPacket(secret=secret, dict=DICTIONARY, packet=data[:length])
    except (rad.PacketError, ValueError, struct.error) as exc:
        raise Refused("malformed", f"undecodable packet: {exc}") from exc
    if not request.VerifyAcctRequest():
        raise Refused("bad_authenticator", "wrong Request Authenticator (is the shared secret the same?)"
                      if code == rad.AccountingRequest else "Status-Server without a valid Message-Authenticator")
    if request.message_authenticator and not request.verify_message_authenticator():
        raise Refused("bad_authenticator", "wrong Message-Authenticator (is the shared secret the same?)")
    return request


def unknown_attributes(request: Any) -> list[str]:
    """The attributes ``radius.dictionary`` does not name: ``200``, ``26.9.1`` (vendor 9, attribute 1)."""
    out = []
    for key in request.keys():   # noqa: SIM118 - names known attributes; iterating gives raw codes
        if isinstance(key, tuple):
            out.append(f"26.{key[0]}.{key[1]}")
        elif not isinstance(key, str):
            out.append(str(key))
    return out


def _values(request: Any, name: str) -> list[Any]:
    try:
        return list(request.get(name) or ())
    except (ValueError, struct.error, rad.PacketError) as exc:
        raise Refused("malformed", f"{name} cannot be read: {exc}") from exc


def _first(request: Any, name: str) -> Any:
    values = _values(request, name)
    return values[0] if values else None


def _text(value: Any) -> str:
    """A string attribute's text; pyrad gives bytes for values that are not UTF-8."""
    return value if isinstance(value, str) else bytes(value).decode("latin-1")


def _octets_text(value: bytes) -> str:
    """A circuit or remote id: printable ASCII as it is, anything else as ``01:0a:ff``."""
    if value and all(b in _PRINTABLE for b in value):
        return value.decode("ascii")
    return ":".join(f"{b:02x}" for b in value)


def read(request: Any, source_ip: str) -> Accounting:
    """The ``Accounting`` of a verified request; ``Refused("malformed")`` when an attribute
    needed for it is missing or unreadable. Addresses are not checked against the sink here."""
    status = _first(request, "Acct-Status-Type")
    if status is None:
        raise Refused("malformed", "no Acct-Status-Type")
    status = str(status)
    nas = _first(request, "NAS-IP-Address") or _first(request, "NAS-IPv6-Address") \
        or _first(request, "NAS-Identifier") or source_ip
    found = Accounting(status, _text(nas), "")
    if status in _NAS_RESETS:
        return found
    session_id = _first(request, "Acct-Session-Id")
    if not session_id:
        raise Refused("malformed", f"Acct-Status-Type {status} without Acct-Session-Id")
    found.session_id = _text(session_id)
    if status not in _STARTS:
        return found
    found.match = _match(request, found)
    addresses: list[Network] = []
    for name, host_bits in _ADDRESSES:
        for value in _values(request, name):
            try:
                network = ipaddress.ip_network(f"{value}/{host_bits}" if host_bits else str(value))
            except ValueError as exc:
                raise Refused("malformed", f"{name} {value!r}: {exc}") from exc
            if network not in addresses:
                addresses.append(network)
    found.addresses = tuple(addresses)
    interim = _first(request, "Acct-Interim-Interval")
    found.interim = interim if isinstance(interim, int) and interim > 0 else None
    return found


def _match(request: Any, found: Accounting) -> Match:
    values: dict[str, str] = {}
    raw: list[tuple[str, str, str]] = []
    if (user := _first(request, "User-Name")) is not None:
        raw.append(("username", "User-Name", _text(user)))
    for key, name in (("circuit_id", "ADSL-Agent-Circuit-Id"), ("remote_id", "ADSL-Agent-Remote-Id")):
        if (value := _first(request, name)) is not None:
            raw.append((key, name, _octets_text(bytes(value))))
    for key, name, text in raw:
        try:
            values[key] = normal_value(key, text)
        except ValueError as exc:
            found.problems.append(("malformed", f"{name} of radius session {found.session_id} from {found.nas}: "
                                                f"{exc}; left out"))
    calling = _first(request, "Calling-Station-Id")
    if calling is not None:
        try:
            values["mac"] = normal_mac(_text(calling))
        except ValueError:
            pass   # a phone number, a circuit description: not a MAC, not an error
    return Match(**values)


class RadiusSource:
    """The ``radius`` session source (``SessionSource``): an accounting server on ``host``:``port``
    (0: any free port, see ``bound``) for NAS clients sharing ``secret``; ``clients``, when
    given, are the networks a packet may come from."""

    kind = KIND

    def __init__(self, name: str, host: str, port: int, secret: bytes,
                 clients: Sequence[Network] = (), session_timeout: float | None = None) -> None:
        if not secret:
            raise ValueError(f"radius source {name!r}: the shared secret is empty")
        self.name = name
        self.host = host
        self.port = port
        self.secret = secret
        self.clients = tuple(clients)
        self.session_timeout = session_timeout
        self.bound: tuple[str, int] | None = None       # the address listened on, once listening
        self.listening = asyncio.Event()
        self._transport: asyncio.DatagramTransport | None = None
        self._sink: SessionSink | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[tuple[str, int, int, bytes], asyncio.Task[None]] = {}   # (ip, port, id, authenticator)
        self._flying_for: dict[tuple[str, int, int, bytes], str] = {}   # the same keys: the NAS each is from
        self._last: dict[tuple[str, str], asyncio.Task[None]] = {}  # (nas, session id) -> newest task
        self._known: dict[str, set[str]] = {}                        # nas -> session ids started
        self._stopped: dict[tuple[str, str], float] = {}             # (nas, session id) -> when stopped
        self.counts = {"requests": 0, "answered": 0, "dropped": 0, "duplicates": 0, "busy": 0,
                       "failures": 0, "uncommitted": 0, "stale": 0}
        self.last_request: float | None = None

    # -- SessionSource -----------------------------------------------------------------------
    async def run(self, sink: SessionSink) -> None:
        loop = asyncio.get_running_loop()
        self._sink = sink
        for key in sink.keys(self.name):   # sessions saved before a restart: Accounting-On ends them too
            nas, _, session_id = key.partition("/")
            self._known.setdefault(nas, set()).add(session_id)
        transport, _ = await loop.create_datagram_endpoint(lambda: _Endpoint(self),
                                                           local_addr=(self.host, self.port))
        self._transport = transport
        self.bound = transport.get_extra_info("sockname")[:2]
        self.listening.set()
        log.info("event=radius_listening source=%s listen=%s:%d", self.name, *self.bound)
        try:
            await asyncio.Future()
        finally:
            self.listening.clear()
            transport.close()
            self._transport = None
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()   # unanswered: the NAS resends to whoever listens next
            await asyncio.gather(*tasks, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        host, port = self.bound or (self.host, self.port)
        return {"kind": KIND, "listen": f"{host}:{port}", "listening": self.listening.is_set(),
                "clients": [str(c) for c in self.clients], "session_timeout": self.session_timeout,
                "sessions": sum(len(ids) for ids in self._known.values()), "in_flight": len(self._tasks),
                "last_request": self.last_request, **self.counts}

    # -- receiving ---------------------------------------------------------------------------
    def received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """One datagram; never raises (an unexpected error is logged and counted)."""
        try:
            self._receive(data, str(addr[0]), int(addr[1]))
        except Exception:   # the socket must keep serving; logged with traceback and counted
            self.counts["failures"] += 1
            log.exception("event=radius_packet_failed source=%s from=%s", self.name, addr[0])

    def _receive(self, data: bytes, ip: str, port: int) -> None:
        assert self._sink is not None
        sink = self._sink
        self.counts["requests"] += 1
        self.last_request = time.time()
        try:
            if self.clients and not self._allowed(ip):
                raise Refused("unknown_client", f"{len(data)} octets from {ip}, which is not in clients")
            request = decode(data, self.secret)
            if request.code == rad.StatusServer:
                self._answer(request, (ip, port))
                return
            accounting = read(request, ip)
        except Refused as refused:
            self.counts["dropped"] += 1
            sink.problem(self.name, refused.kind, f"{refused.detail} (packet from {ip}:{port}; dropped)")
            return
        unknown = unknown_attributes(request)
        if unknown:
            sink.problem(self.name, "unknown_attribute",
                         f"attributes {', '.join(unknown)} from {ip} not in the dictionary; ignored, "
                         f"the packet is processed from the others")
        for kind, detail in accounting.problems:
            sink.problem(self.name, kind, detail)
        duplicate = (ip, port, request.id, bytes(request.authenticator))
        if duplicate in self._in_flight:
            self.counts["duplicates"] += 1     # the first one's answer answers it
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.counts["busy"] += 1
            log.warning("event=radius_busy source=%s in_flight=%d action=dropped", self.name,
                        len(self._tasks))   # unanswered: the NAS resends
            return
        self._start(sink, request, accounting, duplicate, received=self.last_request)

    def _allowed(self, ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.clients)

    # -- committing --------------------------------------------------------------------------
    def _start(self, sink: SessionSink, request: Any, accounting: Accounting,
               duplicate: tuple[str, int, int, bytes], received: float) -> None:
        """Work out the change now (in arrival order) and commit it in a task ordered after the
        earlier packets of the same keys."""
        nas = accounting.nas
        started: list[Session] = []
        stopped: list[str] = []
        if accounting.status in _NAS_RESETS:
            ids = set(self._known.get(nas, ())) | {sid for (n, sid) in self._last if n == nas}
            stopped = [f"{nas}/{sid}" for sid in sorted(ids)]
            self._forget(nas)
        elif accounting.status == "Stop":
            ids = {accounting.session_id}
            stopped = [accounting.key]
            self._stopped[(nas, accounting.session_id)] = received
        elif accounting.status in _STARTS:
            ids = {accounting.session_id}
            session = self._session(sink, accounting, received)
            if session is not None and self._alive(accounting, received):
                started = [session]
        else:
            ids = set()
        after = [task for sid in ids if (task := self._last.get((nas, sid))) is not None]
        task = asyncio.get_running_loop().create_task(
            self._commit(sink, request, accounting, started, stopped, after, duplicate, received),
            name=f"radius {accounting.key}")
        self._tasks.add(task)
        self._in_flight[duplicate] = task
        self._flying_for[duplicate] = nas
        keys = [(nas, sid) for sid in ids]
        for key in keys:
            self._last[key] = task

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            if self._in_flight.get(duplicate) is finished:   # not an equal packet's after a NAS reset
                del self._in_flight[duplicate]
                self._flying_for.pop(duplicate, None)
            for key in keys:
                if self._last.get(key) is finished:
                    del self._last[key]
        task.add_done_callback(done)

    def _session(self, sink: SessionSink, accounting: Accounting, received: float) -> Session | None:
        """The session a Start/Interim-Update reports, its refused addresses reported and left
        out; None without any address."""
        addresses = []
        for network in accounting.addresses:
            why = sink.address_problem(network)
            if why is None:
                addresses.append(network)
            else:
                sink.problem(self.name, "outside_prefixes",
                             f"{network} of radius session {accounting.session_id} from {accounting.nas}: {why}; "
                             "left out")
        if not addresses:
            return None
        if self.session_timeout is not None:
            expires: float | None = received + self.session_timeout
        elif accounting.interim is not None:
            expires = received + MISSED_INTERIMS * accounting.interim
        else:
            expires = None
        return Session(self.name, accounting.key, accounting.match, tuple(addresses), expires=expires,
                       detail=f"radius session {accounting.session_id} from {accounting.nas}")

    def _alive(self, accounting: Accounting, now: float) -> bool:
        """False for a key stopped recently (a Start/Interim-Update that lost the race with its
        Stop): counted and logged, for a NAS that keeps sending for a session it ended is
        otherwise invisible (answered, and nothing enforced)."""
        while self._stopped:
            oldest, when = next(iter(self._stopped.items()))
            if when > now - TOMBSTONE_SECONDS and len(self._stopped) <= MAX_TOMBSTONES:
                break
            del self._stopped[oldest]
        stopped = self._stopped.get((accounting.nas, accounting.session_id))
        if stopped is None:
            return True
        self.counts["stale"] += 1
        log.info("event=radius_stale_ignored source=%s session=%s status=%s stopped_seconds_ago=%.0f (answered; "
                 "a packet for a key stopped in the last %.0f s does not start it again)", self.name, accounting.key,
                 accounting.status, now - stopped, TOMBSTONE_SECONDS)
        return False

    def _forget(self, nas: str) -> None:
        """Accounting-On/Off: ``nas`` starts afresh. Its stopped keys no longer hold off a Start
        (it reuses session ids after a reboot), and its packets in flight no longer swallow an
        equal new one as a duplicate (only its own: behind a RADIUS proxy one source address
        carries many NASes). ``_last`` stays: the new packets of its keys must commit after the
        stops this reset makes. O(tombstones + packets in flight), once per reset."""
        for key in [key for key in self._stopped if key[0] == nas]:
            del self._stopped[key]
        for duplicate in [d for d, of in self._flying_for.items() if of == nas]:
            del self._in_flight[duplicate]
            del self._flying_for[duplicate]

    async def _commit(self, sink: SessionSink, request: Any, accounting: Accounting, started: list[Session],
                      stopped: list[str], after: list[asyncio.Task[None]], duplicate: tuple[str, int, int, bytes],
                      received: float) -> None:
        if after:
            await asyncio.wait(after)      # their outcome is theirs; only the order matters here
        if started or stopped:
            try:
                await sink.update(self.name, started=started, stopped=stopped, observed=received)
            except SessionChangeFailed as exc:
                # the sink reported it (commit_failed); no answer, so the NAS resends
                self.counts["uncommitted"] += 1
                log.info("event=radius_not_answered source=%s session=%s reason=%s", self.name, accounting.key, exc)
                return
            except Exception:   # a sink bug must not end the receiver; logged and counted
                self.counts["failures"] += 1
                log.exception("event=radius_commit_failed source=%s session=%s", self.name, accounting.key)
                return
        known = self._known.setdefault(accounting.nas, set())
        if accounting.status in _NAS_RESETS:
            known.difference_update(key[len(accounting.nas) + 1:] for key in stopped)
        elif stopped:
            known.discard(accounting.session_id)
        elif started:
            known.add(accounting.session_id)
        if not known:
            del self._known[accounting.nas]
        self._answer(request, duplicate[:2])

    def _answer(self, request: Any, addr: tuple[str, int]) -> None:
        if self._transport is None:
            return
        reply = request.CreateReply()
        self._transport.sendto(reply.ReplyPacket(), addr)
        self.counts["answered"] += 1


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, source: RadiusSource) -> None:
        self.source = source

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.source.received(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.warning("event=radius_socket_error source=%s error=%s", self.source.name, exc)
