"""
Property tests (hypothesis, bounded example counts): the CONNECT authority parser, the target
policy, and H1TunnelServer's HTTP/1.1 request parsing fed arbitrary bytes in arbitrary chunks.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from hbonex.http.routing import RouteDecision
from hbonex.network.listener import ConnectionInfo
from hbonex.tunnel.connect import (
    Authority,
    BadAuthority,
    ConnectRequest,
    TargetPolicy,
    TargetRule,
    parse_authority,
)
from hbonex.tunnel.server import MAX_REQUEST_HEAD, H1TunnelServer, TunnelLog

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
ports = st.integers(1, 65535)
label = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,20}", fullmatch=True)
hostname = st.lists(label, min_size=1, max_size=5).map(".".join).filter(
    lambda h: not _looks_numeric(h)
)


def _looks_numeric(host: str) -> bool:
    # "1.2" or "1" would be a (partial) IPv4 literal, not a name: left to the IP strategies.
    return all(part.isdigit() for part in host.split("."))


class AuthorityTests(unittest.TestCase):
    @FAST
    @given(st.text(max_size=80))
    def test_any_text_parses_or_is_bad_authority(self, text: str) -> None:
        try:
            authority = parse_authority(text)
        except BadAuthority:
            return
        self.assertIsInstance(authority, Authority)
        self.assertTrue(1 <= authority.port <= 65535)
        self.assertFalse(any(c.isspace() or c in "@/" for c in authority.host))
        # What parsed prints as an authority that parses to the same thing.
        self.assertEqual(parse_authority(str(authority)), authority)

    @FAST
    @given(st.binary(max_size=80))
    def test_latin1_bytes_parse_or_are_bad_authority(self, raw: bytes) -> None:
        # HTTP/2 and HTTP/1.1 headers are decoded as latin-1.
        try:
            parse_authority(raw.decode("latin-1"))
        except BadAuthority:
            pass

    @FAST
    @given(st.one_of(ipv4, ipv6), ports)
    def test_ip_literals_round_trip(self, ip: Any, port: int) -> None:
        text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        authority = parse_authority(text)
        self.assertEqual((authority.ip, authority.port), (ip, port))
        self.assertEqual(str(authority), text)

    @FAST
    @given(hostname, ports)
    def test_names_round_trip_lowercased(self, host: str, port: int) -> None:
        authority = parse_authority(f"{host}:{port}")
        self.assertEqual(authority, Authority(host.lower(), port))
        self.assertIsNone(authority.ip)

    @FAST
    @given(st.one_of(ipv4.map(str), hostname), st.integers(-5, 100_000).filter(
        lambda p: not 1 <= p <= 65535))
    def test_ports_out_of_range_are_refused(self, host: str, port: int) -> None:
        with self.assertRaises(BadAuthority):
            parse_authority(f"{host}:{port}")

    @FAST
    @given(ipv6, ports)
    def test_ipv6_without_brackets_is_refused(self, ip: Any, port: int) -> None:
        with self.assertRaises(BadAuthority):
            parse_authority(f"{ip}:{port}")


networks = st.one_of(
    st.tuples(ipv4, st.integers(0, 32)).map(
        lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False)),
    st.tuples(ipv6, st.integers(0, 128)).map(
        lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False)),
)
port_ranges = st.tuples(ports, ports).map(sorted)


class TargetPolicyTests(unittest.TestCase):
    @FAST
    @given(st.text(max_size=60))
    def test_any_rule_text_parses_or_is_value_error(self, text: str) -> None:
        try:
            rule = TargetRule.parse(text)
        except ValueError:
            return
        self.assertTrue(1 <= rule.port_low <= rule.port_high <= 65535)

    @FAST
    @given(networks, port_ranges)
    def test_rules_round_trip(self, network: Any, low_high: list[int]) -> None:
        low, high = low_high
        rule = TargetRule(network, low, high)
        self.assertEqual(TargetRule.parse(str(rule)), rule)

    @FAST
    @given(st.lists(st.tuples(networks, port_ranges), min_size=1, max_size=4),
           st.one_of(ipv4, ipv6), ports)
    def test_allows_is_membership(self, specs: Any, ip: Any, port: int) -> None:
        rules = tuple(TargetRule(net, lo, hi) for net, (lo, hi) in specs)
        policy = TargetPolicy(rules)
        # An IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
        judged = ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped is not None else ip
        expected = any(judged in net and lo <= port <= hi for net, (lo, hi) in specs)
        self.assertEqual(policy.allows(ip, port), expected)

    @FAST
    @given(ipv4, ports)
    def test_ipv4_mapped_ipv6_is_judged_as_ipv4(self, ip: Any, port: int) -> None:
        mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
        policy = TargetPolicy()  # loopback only
        self.assertEqual(policy.allows(mapped, port), ip.is_loopback)


# --- H1TunnelServer's request parsing ----------------------------------------------------------

STATUS_LINE = re.compile(rb"^HTTP/1\.1 (\d{3}) [A-Za-z ]+\r\n")


class RecordingRouter:
    """Refuses every tunnel (403) after recording the request: no upstream is connected."""

    def __init__(self) -> None:
        self.requests: list[ConnectRequest] = []

    def route(self, request: ConnectRequest, info: Any) -> RouteDecision:
        self.requests.append(request)
        return RouteDecision(403, "fuzz")


def feed(chunks: list[bytes]) -> tuple[H1TunnelServer, StringTransport, RecordingRouter]:
    router = RecordingRouter()
    server = H1TunnelServer(Clock(), router, ConnectionInfo("l", "1.2.3.4:5", "5.6.7.8:9"),
                            TunnelLog())
    transport = StringTransport()
    server.makeConnection(transport)
    for chunk in chunks:
        server.dataReceived(chunk)
        if transport.disconnecting:
            break
    return server, transport, router


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


token = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}", fullmatch=True)
header_value = st.from_regex(r"[ -~]{0,40}", fullmatch=True).map(str.strip)


class H1RequestParsingTests(unittest.TestCase):
    @FAST
    @given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
    def test_arbitrary_bytes_never_raise(self, data: bytes, cuts: list[int]) -> None:
        _, transport, router = feed(split(data, cuts))
        out = transport.value()
        if out:
            m = STATUS_LINE.match(out)
            assert m is not None, out
            self.assertIn(m.group(1), {b"400", b"403", b"405", b"431"})
            self.assertTrue(transport.disconnecting)
        elif b"\r\n\r\n" in data:
            self.fail(f"a complete head got no answer: {data!r}")
        self.assertLessEqual(len(router.requests), 1)

    @FAST
    @given(st.one_of(ipv4.map(str), hostname), ports,
           st.lists(st.tuples(token, header_value), max_size=5),
           st.lists(st.integers(0, 2000), max_size=6))
    def test_valid_connect_reaches_the_router(
        self, host: str, port: int, headers: list[tuple[str, str]], cuts: list[int]
    ) -> None:
        target = f"{host}:{port}"
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        _, transport, router = feed(split(head.encode("latin-1"), cuts))
        [request] = router.requests
        self.assertEqual((request.method, request.authority), ("CONNECT", target))
        self.assertEqual(request.headers[1:], tuple((k.lower(), v) for k, v in headers))
        self.assertRegex(transport.value(), rb"^HTTP/1\.1 403 ")

    @settings(max_examples=20, deadline=None)
    @given(st.binary(min_size=1, max_size=64).filter(lambda b: b"\r\n\r\n" not in b))
    def test_endless_head_is_431(self, unit: bytes) -> None:
        junk = (unit * (MAX_REQUEST_HEAD // len(unit) + 2)).replace(b"\r\n\r", b"\r\nx")
        _, transport, router = feed([junk[i:i + 8192] for i in range(0, len(junk), 8192)])
        if b"\r\n\r\n" in junk:  # the replacement can still leave one at a chunk seam
            return
        self.assertRegex(transport.value(), rb"^HTTP/1\.1 431 ")
        self.assertEqual(router.requests, [])
