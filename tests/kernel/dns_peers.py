"""Real DNS peers for the ``dns: gateway`` kernel test and benchmark (issue 14).

The forwarder must be judged against what a subscriber really meets: a recursive resolver
(Debian's ``dnsmasq``) that forwards to authoritative servers whose answers for a payment host
behind a CDN change on every query, arrive through a CNAME, and are sometimes too big for UDP.
So this module starts, in a Topology's upstream namespace:

* ``dnsmasq`` on ``RESOLVER4``/``RESOLVER6`` port 53 (``--no-resolv --cache-size=0``: every query
  reaches the authority, so every answer is a fresh rotation), forwarding ``psp.example``,
  ``cdn.example`` and ``other.example`` to
* the authority (this file run as ``authority``, dnspython, UDP+TCP on ``AUTHORITY``):
  ``pay.psp.example`` is a CNAME to ``edge.cdn.example``, whose A/AAAA rotates through ``PAY4`` /
  ``PAY6`` (one step per query and family); ``big.psp.example`` holds so many records that a UDP
  answer is truncated (TC) and the client must retry over TCP; ``other.example`` (outside the
  test's ``allow``) has ``OTHER4``/``OTHER6``;
* TCP listeners on port 443 of every address above that a subscriber may try (``PAY*``,
  ``OTHER*``, ``BIG_REACHABLE*``), answering one line naming the address (this file run as
  ``lines``);
* the outside recorder on ``OUTSIDE4``/``OUTSIDE6`` (this file run as ``recorder``): UDP and TCP
  53 and UDP 123, it writes one line per message it receives to its log and answers DNS with its
  own distinctive address (``RECORDER4``/``RECORDER6``) and NTP with an echo, so a test can tell
  "answered by the forwarder" from "answered by the outside host" and see that nothing arrived.

The addresses live on the upstream namespace's link; the gateway routes the 192.0.2.0/24 and
2001:db8:192::/64 service ranges to the upstream host (they are neither the topology's garden
nor its upstream link, so nothing there is allowed by address). Every process runs in its own
session through ``Topology.popen`` and is stopped by ``DnsPeers.__exit__`` (and by the topology's
close if that fails); every wait is bounded; files live in the caller's directory.

Run in a namespace, this file is also the subscribers' client (``query``: one query with
dnspython, JSON out; ``pay``: resolve with the namespace's own resolv.conf, then connect at once).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from enforcer.demo.topology import Topology

HERE = Path(__file__).resolve()

RESOLVER4, RESOLVER6 = "198.51.100.53", "2001:db8:198::53"
OUTSIDE4, OUTSIDE6 = "198.51.100.99", "2001:db8:198::99"
RECORDER4, RECORDER6 = "192.0.2.99", "2001:db8:192::99"     # what the outside host answers
AUTHORITY = ("127.0.0.1", 5353)                             # in the upstream namespace
PAY4 = tuple(f"192.0.2.{i}" for i in range(20, 30))
PAY6 = tuple(f"2001:db8:192::{i}" for i in range(20, 30))
OTHER4, OTHER6 = "192.0.2.40", "2001:db8:192::40"
BIG_REACHABLE4, BIG_REACHABLE6 = "192.0.2.50", "2001:db8:192::50"
BIG4 = (BIG_REACHABLE4, *(f"192.0.2.{i}" for i in range(100, 250)))
BIG6 = (BIG_REACHABLE6, *(f"2001:db8:192::{i:x}" for i in range(0x100, 0x196)))
SERVICE_NET4, SERVICE_NET6 = "192.0.2.0/24", "2001:db8:192::/64"
ZONES = ("psp.example", "cdn.example", "other.example")
LINE_PORT = 443
PAY_TTL, CNAME_TTL = 30, 60

_READY_TIMEOUT = 8.0


# ---------------------------------------------------------------------------- the test side


class DnsPeers:
    """Resolver, authority, port-443 listeners and the outside recorder in ``topo``'s upstream
    namespace; a context manager (started in ``__enter__``, stopped in ``__exit__``, also when
    starting failed halfway)."""

    def __init__(self, topo: Topology, directory: Path, *, resolver_cache: int = 0,
                 resolver_extra: Sequence[str] = ()) -> None:
        from enforcer.demo.dhcp import Process  # the one process runner of the demo and the tests
        self.topo = topo
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.authority_log = self.dir / "authority.log"
        self.recorder_log = self.dir / "recorder.log"
        self.dnsmasq_log = self.dir / "dnsmasq.log"
        self.recorder_log.touch()
        up = topo.upstream.netns
        py = [sys.executable, str(HERE)]
        servers = [f"--server=/{zone}/{AUTHORITY[0]}#{AUTHORITY[1]}" for zone in ZONES]
        self._processes = [
            Process(topo.popen, up, [*py, "authority", f"{AUTHORITY[0]}:{AUTHORITY[1]}"], self.authority_log),
            Process(topo.popen, up, [*py, "lines", str(LINE_PORT), *PAY4, *PAY6, OTHER4, OTHER6,
                                     BIG_REACHABLE4, BIG_REACHABLE6], self.dir / "lines.log"),
            Process(topo.popen, up, [*py, "recorder", OUTSIDE4, OUTSIDE6], self.recorder_log),
            Process(topo.popen, up, [
                "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                f"--cache-size={resolver_cache}", "--port=53", f"--listen-address={RESOLVER4}",
                f"--listen-address={RESOLVER6}", "--bind-interfaces", "--user=root", "--group=root",
                f"--pid-file={self.dir / 'dnsmasq.pid'}", "--log-facility=-", *servers, *resolver_extra,
            ], self.dnsmasq_log),
        ]

    def __enter__(self) -> DnsPeers:
        try:
            self._addresses()
            for process, ready in zip(self._processes, ("READY", "READY", "READY", "started, version"),
                                      strict=True):
                process.start_until(ready, _READY_TIMEOUT)
            self._wait_resolver()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self._processes):
            process.stop()

    def _addresses(self) -> None:
        add_upstream_addresses(self.topo, RESOLVER4, OUTSIDE4, *PAY4, OTHER4, *BIG4, RECORDER4,
                               RESOLVER6, OUTSIDE6, *PAY6, OTHER6, *BIG6, RECORDER6)

    def _wait_resolver(self) -> None:
        """dnsmasq logs "started" before it can forward; ready is an answer through it."""
        deadline = time.monotonic() + _READY_TIMEOUT
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = query(self.topo, self.topo.upstream.netns, RESOLVER4, "other.example", "A", timeout=1.0)
            if last.get("addresses") == [OTHER4]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"resolver {RESOLVER4} not answering other.example within {_READY_TIMEOUT}s: "
                           f"{last}; dnsmasq: {self.dnsmasq_log.read_text(errors='replace')[-1500:]}")

    def recorded(self) -> list[str]:
        """What the outside recorder received so far, one line per message."""
        return [line for line in self.recorder_log.read_text(errors="replace").splitlines()
                if line.startswith("got ")]

    def authority_answers(self) -> list[str]:
        """The authority's log lines ``answer <transport> <name> <type> <addresses...>``."""
        return [line for line in self.authority_log.read_text(errors="replace").splitlines()
                if line.startswith("answer ")]


def add_upstream_addresses(topo: Topology, *addresses: str) -> None:
    """``addresses`` on the upstream host's link (so the gateway reaches those in its upstream
    /24 and /64 on link); the gateway routes ``SERVICE_NET4``/``SERVICE_NET6`` to that host once."""
    up, gw = topo.upstream.netns, topo.gateway.netns
    link = _link_with(topo, up, topo.upstream.addr4)
    for address in addresses:
        if ":" in address:
            topo.run(up, "ip", "-6", "addr", "add", f"{address}/128", "dev", link, "nodad", check=True)
        else:
            topo.run(up, "ip", "addr", "add", f"{address}/32", "dev", link, check=True)
    routes = topo.run(gw, "ip", "route", "show", SERVICE_NET4, check=True).stdout
    if not routes.strip():
        topo.run(gw, "ip", "route", "add", SERVICE_NET4, "via", topo.upstream.addr4, check=True)
        topo.run(gw, "ip", "-6", "route", "add", SERVICE_NET6, "via", topo.upstream.addr6, check=True)


def _link_with(topo: Topology, netns: str, address: str) -> str:
    out = topo.run(netns, "ip", "-o", "-4", "addr", "show", check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields[3].split("/")[0] == address:
            return fields[1]
    raise RuntimeError(f"no link with {address} in {netns}: {out}")


def set_resolv_conf(netns: str, nameserver: str) -> Path:
    """``/etc/netns/<netns>/resolv.conf`` naming ``nameserver``: what ``ip netns exec`` shows the
    namespace's programs as /etc/resolv.conf. Returns the folder (the caller removes it)."""
    folder = Path("/etc/netns") / netns
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:2 attempts:1\n")
    return folder


def query(topo: Topology, netns: str, server: str, name: str, rdtype: str = "A", *, tcp: bool = False,
          port: int = 53, timeout: float = 2.0, edns: bool = False) -> dict[str, Any]:
    """One query from ``netns`` (dnspython, no retry, no TCP fallback): its outcome as a dict
    (``rcode``, ``tc``, ``aa``, ``addresses``, ``cnames``, ``id_ok``, ``wire``) or ``error``."""
    argv = [sys.executable, str(HERE), "query", server, str(port), name, rdtype, str(timeout)]
    argv += ["--tcp"] if tcp else []
    argv += ["--edns"] if edns else []
    result = topo.run(netns, *argv, timeout=timeout + 15.0)
    try:
        return dict(json.loads(result.stdout))
    except ValueError:
        raise RuntimeError(f"query client in {netns} failed: {result.stdout}{result.stderr}") from None


def resolve_and_connect(topo: Topology, netns: str, name: str, rdtype: str, rounds: int,
                        port: int = LINE_PORT) -> list[dict[str, Any]]:
    """``rounds`` times in ``netns``: resolve ``name`` with the namespace's resolv.conf, then at
    once (no sleep, no retry) connect to the first address and read its line."""
    result = topo.run(netns, sys.executable, str(HERE), "pay", name, rdtype, str(rounds), str(port),
                      timeout=rounds * 10.0 + 15.0)
    try:
        return list(json.loads(result.stdout))
    except ValueError:
        raise RuntimeError(f"pay client in {netns} failed: {result.stdout}{result.stderr}") from None


# ---------------------------------------------------------------------------- the peer side


def _authority(listen: str) -> None:
    """Authoritative for ``ZONES`` on UDP and TCP at ``listen`` (host:port)."""
    import dns.exception
    import dns.flags
    import dns.message
    import dns.name
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    host, port = listen.rsplit(":", 1)
    lock = threading.Lock()
    turn = {4: 0, 6: 0}

    def rotated(family: int) -> str:
        with lock:
            index = turn[family]
            turn[family] += 1
        pool = PAY4 if family == 4 else PAY6
        return pool[index % len(pool)]

    def answer(wire: bytes, transport: str) -> bytes | None:
        try:
            request = dns.message.from_wire(wire)
        except dns.exception.DNSException as exc:
            print(f"unparsable {transport}: {exc}", flush=True)
            return None
        response = dns.message.make_response(request)
        response.flags |= dns.flags.AA
        if not request.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = request.question[0]
        qname = question.name.to_text(omit_final_dot=True).lower()
        rdtype = question.rdtype
        family = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(rdtype)
        records: list[str] = []
        target = question.name
        if qname in ("pay.psp.example", "edge.cdn.example"):
            if qname == "pay.psp.example":
                target = dns.name.from_text("edge.cdn.example")
                response.answer.append(dns.rrset.from_text(question.name, CNAME_TTL, "IN", "CNAME",
                                                           target.to_text()))
            if family is not None:
                records = [rotated(family)]
        elif qname == "big.psp.example":
            records = list(BIG4 if family == 4 else BIG6 if family == 6 else ())
        elif qname == "other.example":
            records = [OTHER4] if family == 4 else [OTHER6] if family == 6 else []
        elif not any(qname == zone for zone in ZONES):
            response.set_rcode(dns.rcode.NXDOMAIN)
        if records:
            response.answer.append(dns.rrset.from_text_list(target, PAY_TTL, "IN",
                                                            dns.rdatatype.to_text(rdtype), records))
        limit = 65535 if transport == "tcp" else max(512, request.payload if request.edns >= 0 else 512)
        print(f"answer {transport} {qname} {dns.rdatatype.to_text(rdtype)} {' '.join(records)}", flush=True)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer = []
            response.flags |= dns.flags.TC
            print(f"truncated {transport} {qname}", flush=True)
            return response.to_wire()

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            out = answer(data, "udp")
            if out is not None:
                sock.sendto(out, self.client_address)

    class Tcp(socketserver.StreamRequestHandler):
        timeout = 10.0   # a client that goes quiet does not hold a thread for ever

        def handle(self) -> None:
            for _ in range(10_000):   # bounded: a test sends a handful per connection
                size = self.rfile.read(2)
                if len(size) < 2:
                    return
                data = self.rfile.read(int.from_bytes(size, "big"))
                out = answer(data, "tcp")
                if out is None:
                    return
                self.wfile.write(len(out).to_bytes(2, "big") + out)

    _serve([_udp_server((host, int(port)), Udp), _tcp_server((host, int(port)), Tcp)])


def _lines(port: str, addresses: Sequence[str]) -> None:
    """TCP ``port`` on each address: one line ``HELLO <address>`` per connection, then close."""

    class Hello(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            local = self.connection.getsockname()[0]
            self.wfile.write(f"HELLO {local}\n".encode())

    _serve([_tcp_server((address, int(port)), Hello) for address in addresses])


def _recorder(addresses: Sequence[str]) -> None:
    """The outside host a subscriber might tunnel to: UDP/TCP 53 and UDP 123 on ``addresses``,
    a ``got`` line per message received; DNS answered with ``RECORDER4``/``RECORDER6``."""
    import dns.exception
    import dns.message
    import dns.rdatatype
    import dns.rrset

    def dns_answer(wire: bytes) -> bytes | None:
        try:
            request = dns.message.from_wire(wire)
        except dns.exception.DNSException as exc:   # a recorder answers what it can, logs the rest
            print(f"unparsable: {exc}", flush=True)
            return None
        response = dns.message.make_response(request)
        if request.question:
            question = request.question[0]
            value = {dns.rdatatype.A: RECORDER4, dns.rdatatype.AAAA: RECORDER6}.get(question.rdtype)
            if value:
                response.answer.append(dns.rrset.from_text(question.name, 5, "IN",
                                                           dns.rdatatype.to_text(question.rdtype), value))
        return response.to_wire()

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            port = sock.getsockname()[1]
            print(f"got udp {sock.getsockname()[0]} {port} from {self.client_address[0]} {len(data)}", flush=True)
            out = dns_answer(data) if port == 53 else data
            if out is not None:
                sock.sendto(out, self.client_address)

    class Tcp(socketserver.StreamRequestHandler):
        timeout = 10.0   # a client that goes quiet does not hold a thread for ever

        def handle(self) -> None:
            local = self.connection.getsockname()
            print(f"got tcp {local[0]} {local[1]} from {self.client_address[0]} connect", flush=True)
            size = self.rfile.read(2)
            if len(size) == 2:
                data = self.rfile.read(int.from_bytes(size, "big"))
                print(f"got tcp {local[0]} {local[1]} from {self.client_address[0]} {len(data)}", flush=True)
                out = dns_answer(data)
                if out is not None:
                    self.wfile.write(len(out).to_bytes(2, "big") + out)

    servers: list[socketserver.BaseServer] = []
    for address in addresses:
        servers += [_udp_server((address, 53), Udp), _udp_server((address, 123), Udp),
                    _tcp_server((address, 53), Tcp)]
    _serve(servers)


def _udp_server(address: tuple[str, int], handler: type[socketserver.BaseRequestHandler]) -> socketserver.BaseServer:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    server_class = type("Udp", (socketserver.ThreadingUDPServer,),
                        {"address_family": family, "allow_reuse_address": True, "daemon_threads": True})
    return server_class(address, handler)   # type: ignore[no-any-return]


def _tcp_server(address: tuple[str, int], handler: type[socketserver.BaseRequestHandler]) -> socketserver.BaseServer:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    server_class = type("Tcp", (socketserver.ThreadingTCPServer,),
                        {"address_family": family, "allow_reuse_address": True, "daemon_threads": True})
    return server_class(address, handler)   # type: ignore[no-any-return]


def _serve(servers: Sequence[socketserver.BaseServer]) -> None:
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    print("READY", flush=True)
    for thread in threads:
        thread.join()


def _query(server: str, port: int, name: str, rdtype: str, timeout: float, tcp: bool, edns: bool) -> dict[str, Any]:
    import dns.exception
    import dns.flags
    import dns.message
    import dns.query
    import dns.rcode
    import dns.rdatatype

    request = dns.message.make_query(name, rdtype, use_edns=0 if edns else False)
    started = time.monotonic()
    try:
        if tcp:
            response = dns.query.tcp(request, server, timeout=timeout, port=port)
        else:
            response = dns.query.udp(request, server, timeout=timeout, port=port)
    except (dns.exception.DNSException, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - started}
    addresses: list[str] = []
    cnames: list[str] = []
    for rrset in response.answer:
        for rdata in rrset:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                addresses.append(rdata.address)
            elif rrset.rdtype == dns.rdatatype.CNAME:
                cnames.append(rdata.target.to_text(omit_final_dot=True))
    return {"rcode": dns.rcode.to_text(response.rcode()), "tc": bool(response.flags & dns.flags.TC),
            "aa": bool(response.flags & dns.flags.AA), "addresses": addresses, "cnames": cnames,
            "id_ok": response.id == request.id, "seconds": time.monotonic() - started}


def _pay(name: str, rdtype: str, rounds: int, port: int) -> list[dict[str, Any]]:
    import dns.exception
    import dns.rdatatype
    import dns.resolver

    resolver = dns.resolver.Resolver()   # /etc/resolv.conf: the namespace's own, via ip netns exec
    resolver.lifetime = 4.0
    results: list[dict[str, Any]] = []
    for _ in range(rounds):
        row: dict[str, Any] = {"nameservers": list(map(str, resolver.nameservers))}
        started = time.monotonic()
        try:
            answer = resolver.resolve(name, rdtype)
        except dns.exception.DNSException as exc:
            row["error"] = f"resolve: {type(exc).__name__}: {exc}"
            results.append(row)
            continue
        resolved = time.monotonic()
        address = answer[0].address
        row.update(address=address, canonical=answer.canonical_name.to_text(omit_final_dot=True),
                   resolve_ms=(resolved - started) * 1000)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(3.0)
            try:
                sock.connect((address, port))
                row["line"] = sock.makefile().readline().strip()
            except OSError as exc:
                row["error"] = f"connect: {type(exc).__name__}: {exc}"
        row["connect_ms"] = (time.monotonic() - resolved) * 1000
        results.append(row)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DNS peers of the kernel tests (run inside a namespace)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("authority").add_argument("listen")
    lines = sub.add_parser("lines")
    lines.add_argument("port")
    lines.add_argument("addresses", nargs="+")
    sub.add_parser("recorder").add_argument("addresses", nargs="+")
    one = sub.add_parser("query")
    for arg in ("server", "port", "name", "rdtype", "timeout"):
        one.add_argument(arg)
    one.add_argument("--tcp", action="store_true")
    one.add_argument("--edns", action="store_true")
    pay = sub.add_parser("pay")
    for arg in ("name", "rdtype", "rounds", "port"):
        pay.add_argument(arg)
    args = parser.parse_args(argv)
    for address in getattr(args, "addresses", ()) or ():
        ipaddress.ip_address(address)   # a typo fails here, not as a silent missing listener
    if args.command == "authority":
        _authority(args.listen)
    elif args.command == "lines":
        _lines(args.port, args.addresses)
    elif args.command == "recorder":
        _recorder(args.addresses)
    elif args.command == "query":
        print(json.dumps(_query(args.server, int(args.port), args.name, args.rdtype, float(args.timeout),
                                args.tcp, args.edns)))
    else:
        print(json.dumps(_pay(args.name, args.rdtype, int(args.rounds), int(args.port))))


@contextlib.contextmanager
def resolv_conf(netns: str, nameserver: str) -> Iterator[Path]:
    """``set_resolv_conf`` for a block, removed after it (also on failure)."""
    import shutil
    folder = set_resolv_conf(netns, nameserver)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
