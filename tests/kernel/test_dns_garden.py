"""``walled_garden.dns: gateway`` end to end (issue 14, SPEC §10): a restricted subscriber's DNS is
answered by the enforcer's forwarder, which opens the garden for the addresses of allowed names
before the answer reaches the subscriber.

Real peers (tests/kernel/dns_peers.py) in the upstream namespace: Debian's dnsmasq as the
subscribers' resolver (198.51.100.53, no cache), a dnspython authority whose ``pay.psp.example``
is a CNAME to ``edge.cdn.example`` with an address that rotates on every query, a truncated big
answer, a name outside ``allow`` and an outside host recording every DNS/NTP message it gets.
Subscriber 1 is restricted, subscriber 2 free. Only the contract is used: config keys, traffic,
the ``walled_garden_dns_*`` metrics.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dns_peers import (
    BIG4,
    BIG_REACHABLE4,
    LINE_PORT,
    OTHER4,
    OTHER6,
    OUTSIDE4,
    OUTSIDE6,
    PAY4,
    PAY6,
    RECORDER4,
    RESOLVER4,
    DnsPeers,
    query,
    resolve_and_connect,
    set_resolv_conf,
)
from kernel_helpers import SUB1, python_in, tcp_connect
from prometheus_client.parser import text_string_to_metric_families

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology
from required import tool

FORWARDER_PORT = 5300
#: A second subnet on the restricted subscriber's link (test_answers_leave_from_the_address_asked).
SECOND_NET4, SECOND_GW4, SECOND_SUB4 = "100.127.1.0/29", "100.127.1.1", "100.127.1.2"   # /29: under the guard
ROUNDS = 4   # per family; the authority rotates through 10 addresses, so every round's is new
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Garden:
    topo: Topology
    peers: DnsPeers
    lab: Lab

    @property
    def restricted(self) -> str:
        return self.topo.subscribers[0].netns

    @property
    def free(self) -> str:
        return self.topo.subscribers[1].netns


@pytest.fixture(scope="module")
def garden(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Garden]:
    tool("dnsmasq", "dnsmasq-base")
    tool("dig", "bind9-dnsutils")
    work = tmp_path_factory.mktemp("dns_garden")
    folders: list[Path] = []
    with Topology(subscribers=2) as topo, DnsPeers(topo, work / "peers") as peers:
        try:
            for host in topo.subscribers:   # both configured with the same resolver, as a DHCP server would
                folders.append(set_resolv_conf(host.netns, RESOLVER4))
            entries = [{"id": SUB1, "addresses": [topo.subscribers[0].addr4, "2001:db8:100:1::/64", SECOND_NET4],
                        "reason": "overdue"}]
            lab = Lab(topo, work / "lab", entries, allow=["*.psp.example"],
                      garden={"dns": "gateway", "resolvers": [RESOLVER4],
                              "dns_forwarder": {"port": FORWARDER_PORT}})
            lab.start_daemon()
            try:
                lab.wait_for(lambda: total(metrics(topo), "walled_garden_dns_forwarder_up") == 1, timeout=15,
                             what="walled_garden_dns_forwarder_up 1")
                yield Garden(topo, peers, lab)
            finally:
                lab.stop_daemon()
                print(lab.log())
        finally:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)


def metrics(topo: Topology) -> Samples:
    text = topo.run(topo.gateway.netns, "curl", "-sf", "--max-time", "3", "http://127.0.0.1:9640/metrics").stdout
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples carrying ``labels`` (all of them when none are given)."""
    return sum(value for (sample, have), value in samples.items()
               if sample == name and set(labels.items()) <= have)


def connect_all(topo: Topology, netns: str, addresses: list[str], port: int = LINE_PORT) -> dict[str, str]:
    """One TCP connect per address from ``netns`` (in one process): address -> the line read, or
    the error (ECONNREFUSED for the garden's reject)."""
    code = f"""
        import errno, json, socket
        out = {{}}
        for address in {addresses!r}:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family) as s:
                s.settimeout(2)
                try:
                    s.connect((address, {port})); out[address] = s.makefile().readline().strip()
                except socket.timeout: out[address] = "timeout"
                except OSError as exc: out[address] = errno.errorcode.get(exc.errno, str(exc))
        print(json.dumps(out))
    """
    result = python_in(topo, netns, code, timeout=5.0 + 3.0 * len(addresses))
    return dict(json.loads(result.stdout)) if result.returncode == 0 else {"error": result.stderr}


def handed_out(peers: DnsPeers) -> set[str]:
    return {address for line in peers.authority_answers() for address in line.split()[4:]}


@pytest.mark.parametrize(("rdtype", "pool"), [("A", PAY4), ("AAAA", PAY6)])
def test_pay_host_behind_a_rotating_cname_is_reachable_at_once(garden: Garden, rdtype: str,
                                                               pool: tuple[str, ...]) -> None:
    topo, peers = garden.topo, garden.peers
    fresh = [address for address in pool if address not in handed_out(peers)]
    assert len(fresh) >= ROUNDS, f"the authority has handed out too many {rdtype} already: {fresh}"
    before = connect_all(topo, garden.restricted, fresh)
    assert all(result == "ECONNREFUSED" for result in before.values()), f"reachable before any DNS: {before}"

    rounds = resolve_and_connect(topo, garden.restricted, "pay.psp.example", rdtype, ROUNDS)

    print("rounds:", rounds)
    addresses = [row.get("address") for row in rounds]
    assert all(row["nameservers"] == [RESOLVER4] for row in rounds)
    assert [row.get("error") for row in rounds] == [None] * ROUNDS, rounds
    assert [row["line"] for row in rounds] == [f"HELLO {address}" for address in addresses]
    assert all(row["canonical"] == "edge.cdn.example" for row in rounds)
    assert len(set(addresses)) == ROUNDS, f"the answers did not rotate: {addresses}"
    assert set(addresses) <= set(fresh), f"not the fresh addresses {fresh}: {addresses}"


def test_name_outside_allow_resolves_but_its_address_stays_refused(garden: Garden) -> None:
    topo = garden.topo
    for rdtype, address in (("A", OTHER4), ("AAAA", OTHER6)):
        answer = query(topo, garden.restricted, RESOLVER4, "other.example", rdtype)
        assert answer.get("addresses") == [address], answer
        assert tcp_connect(topo, garden.restricted, address, LINE_PORT)[0] == "ECONNREFUSED"
        assert connect_all(topo, garden.free, [address]) == {address: f"HELLO {address}"}


def test_dns_to_an_outside_host_is_answered_by_the_forwarder(garden: Garden) -> None:
    topo, peers = garden.topo, garden.peers
    restricted4, restricted6 = topo.subscribers[0].addr4, topo.subscribers[0].addr6
    answers = [query(topo, garden.restricted, OUTSIDE4, "other.example", "A"),
               query(topo, garden.restricted, OUTSIDE4, "other.example", "A", tcp=True),
               query(topo, garden.restricted, OUTSIDE6, "other.example", "A"),
               query(topo, garden.restricted, OUTSIDE6, "other.example", "A", tcp=True)]
    resolver = query(topo, garden.restricted, RESOLVER4, "other.example", "A")
    for answer in answers:
        assert answer.get("id_ok") and answer.get("addresses") == resolver["addresses"] == [OTHER4], answer
    assert not [line for line in peers.recorded() if restricted4 in line or restricted6 in line], peers.recorded()

    # a free subscriber's DNS goes where it was sent: the outside host answers and records it
    free = query(topo, garden.free, OUTSIDE4, "other.example", "A")
    assert free.get("addresses") == [RECORDER4], free
    assert any(f"udp {OUTSIDE4} 53 from {topo.subscribers[1].addr4}" in line for line in peers.recorded())


def test_dns_over_tcp_and_a_truncated_answer_retried_over_tcp(garden: Garden) -> None:
    topo = garden.topo
    answer = query(topo, garden.restricted, RESOLVER4, "pay.psp.example", "A", tcp=True)
    assert answer.get("cnames") == ["edge.cdn.example"] and len(answer["addresses"]) == 1, answer
    assert connect_all(topo, garden.restricted, answer["addresses"]) == {
        answer["addresses"][0]: f"HELLO {answer['addresses'][0]}"}

    assert tcp_connect(topo, garden.restricted, BIG_REACHABLE4, LINE_PORT)[0] == "ECONNREFUSED"
    truncated = query(topo, garden.restricted, RESOLVER4, "big.psp.example", "A", edns=True)
    assert truncated.get("tc") is True and truncated["addresses"] == [], truncated   # TC passed through
    dig = topo.run(garden.restricted, "dig", f"@{RESOLVER4}", "big.psp.example", "A", "+tries=1", "+time=3",
                   timeout=15)
    print(dig.stdout)
    assert "Truncated, retrying in TCP mode" in dig.stdout, dig.stdout
    records = [line.split()[-1] for line in dig.stdout.splitlines() if "\tIN\tA\t" in line]
    assert sorted(records) == sorted(BIG4), dig.stdout
    assert connect_all(topo, garden.restricted, [BIG_REACHABLE4]) == {BIG_REACHABLE4: f"HELLO {BIG_REACHABLE4}"}


def test_the_forwarder_is_no_open_resolver(garden: Garden) -> None:
    """Its port answers only redirected DNS: not the internet, not a free subscriber, not a
    restricted one asking it directly (a timeout: the packets are dropped)."""
    topo = garden.topo
    for netns, gateway in ((topo.upstream.netns, "198.51.100.1"), (garden.free, topo.gateway_addr4(2)),
                           (garden.restricted, topo.gateway_addr4(1)), (topo.upstream.netns, "2001:db8:198::1")):
        for tcp in (False, True):
            answer = query(topo, netns, gateway, "other.example", "A", port=FORWARDER_PORT, tcp=tcp, timeout=1.0)
            assert "error" in answer, f"{netns} got an answer from {gateway}:{FORWARDER_PORT} (tcp={tcp}): {answer}"


def test_ntp_to_an_arbitrary_host_is_refused(garden: Garden) -> None:
    topo, peers = garden.topo, garden.peers
    code = f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5)
        s.sendto(b"\\x23" + bytes(47), ({OUTSIDE4!r}, 123))
        try: print("answered", len(s.recv(100)))
        except socket.timeout: print("timeout")
    """
    assert python_in(topo, garden.free, code).stdout.split()[0] == "answered"
    assert python_in(topo, garden.restricted, code).stdout.split()[0] == "timeout"
    ntp = [line for line in peers.recorded() if f"{OUTSIDE4} 123 " in line]
    assert [line for line in ntp if topo.subscribers[1].addr4 in line], ntp
    assert not [line for line in ntp if topo.subscribers[0].addr4 in line], ntp


def test_metrics_count_queries_and_added_addresses(garden: Garden) -> None:
    topo = garden.topo
    fresh = [address for address in PAY6 if address not in handed_out(garden.peers)]
    udp, tcp = 3, 2
    assert len(fresh) >= udp + tcp, f"too few fresh AAAA left for new admits: {fresh}"
    before = metrics(topo)
    for _ in range(udp):
        assert query(topo, garden.restricted, RESOLVER4, "pay.psp.example", "AAAA").get("addresses")
    for _ in range(tcp):
        assert query(topo, garden.restricted, RESOLVER4, "pay.psp.example", "AAAA", tcp=True).get("addresses")
    assert query(topo, garden.restricted, RESOLVER4, "other.example", "A").get("addresses") == [OTHER4]

    def grown(name: str, by: int, **labels: str) -> bool:
        return total(metrics(topo), name, **labels) >= total(before, name, **labels) + by

    queries = "walled_garden_dns_queries_total"
    garden.lab.wait_for(lambda: grown(queries, udp + 1, transport="udp", result="forwarded"), timeout=5,
                        what=f"{queries} udp forwarded +{udp + 1}")
    garden.lab.wait_for(lambda: grown(queries, tcp, transport="tcp", result="forwarded"), timeout=5,
                        what=f"{queries} tcp forwarded +{tcp}")
    garden.lab.wait_for(lambda: grown("walled_garden_dns_garden_addresses_added_total", udp + tcp), timeout=5,
                        what=f"walled_garden_dns_garden_addresses_added_total +{udp + tcp}")
    after = metrics(topo)
    print({key: value for key, value in after.items() if key[0].startswith("walled_garden_dns")})
    assert total(after, "walled_garden_dns_garden_answers_total") >= total(
        before, "walled_garden_dns_garden_answers_total") + udp + tcp   # other.example is not one
    assert total(after, "walled_garden_dns_garden_addresses") >= udp + tcp
    assert total(after, "walled_garden_dns_garden_capacity") > 0
    assert total(after, "walled_garden_dns_added_seconds_count") >= total(
        before, "walled_garden_dns_added_seconds_count") + udp + tcp + 1
    assert total(after, "walled_garden_dns_forwarder_up") == 1
    assert total(after, "walled_garden_dns_upstream_failures_total") == 0


def test_answers_leave_from_the_address_asked_on_a_link_with_two_subnets(garden: Garden) -> None:
    """A subscriber in the link's second subnet: the nat hook redirects its query to the link's
    first address, while the route back to it prefers the second subnet's. The answer must still
    leave from the first (IP_PKTINFO), or conntrack cannot translate it back and it is lost."""
    topo = garden.topo
    gw_if, peer = topo.subscriber_interfaces[0], topo._sub_peer[0]
    topo.run(topo.gateway.netns, "ip", "addr", "add", f"{SECOND_GW4}/29", "dev", gw_if, check=True)
    topo.run(garden.restricted, "ip", "addr", "add", f"{SECOND_SUB4}/29", "dev", peer, check=True)
    try:
        code = f"""
            import dns.message, dns.query
            for tcp in (False, True):
                ask = dns.query.tcp if tcp else dns.query.udp
                try:
                    answer = ask(dns.message.make_query("other.example", "A"), {RESOLVER4!r}, timeout=2,
                                 source={SECOND_SUB4!r})
                    print("tcp" if tcp else "udp", answer.rcode(), answer.answer[0][0].address)
                except Exception as exc:
                    print("tcp" if tcp else "udp", "error", type(exc).__name__)
        """
        result = python_in(topo, garden.restricted, code)
        assert result.stdout.split("\n")[:2] == [f"udp 0 {OTHER4}", f"tcp 0 {OTHER4}"], result.stdout + result.stderr
    finally:
        topo.run(garden.restricted, "ip", "addr", "del", f"{SECOND_SUB4}/29", "dev", peer)
        topo.run(topo.gateway.netns, "ip", "addr", "del", f"{SECOND_GW4}/29", "dev", gw_if)


def test_status_shows_the_forwarder_as_an_operator_reads_it(garden: Garden) -> None:
    status = subprocess.run([sys.executable, "-m", "enforcer.cli", "status", "--config", str(garden.lab.config_path)],
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    (line,) = [line for line in status.stdout.splitlines() if line.startswith("dns forwarder:")]
    assert line.startswith("dns forwarder: ready (pid ") and f"port {FORWARDER_PORT}" in line, line
    as_json = subprocess.run([sys.executable, "-m", "enforcer.cli", "status", "--json", "--config",
                              str(garden.lab.config_path)], capture_output=True, text=True, timeout=30, check=True)
    forwarder = json.loads(as_json.stdout)["dns_forwarder"]
    assert forwarder["running"] and forwarder["ready"] and forwarder["restarts"] == 0, forwarder
