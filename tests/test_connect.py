"""hbonex.tunnel.connect: CONNECT authorities, HTTP/2 request validation, target policy."""

from __future__ import annotations

import ipaddress

from twisted.trial import unittest

from hbonex.tunnel.connect import (
    Authority,
    BadAuthority,
    MalformedRequest,
    TargetPolicy,
    TargetRule,
    parse_authority,
    parse_h2_request,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network


def h2_headers(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs]


def connect_headers(authority: str = "10.0.0.1:8080", *extra: tuple[str, str]) -> list:
    return h2_headers((":method", "CONNECT"), (":authority", authority), *extra)


class ParseAuthorityTests(unittest.TestCase):
    def test_ipv4(self) -> None:
        a = parse_authority("10.1.2.3:8080")
        self.assertEqual(a, Authority("10.1.2.3", 8080))
        self.assertEqual(a.ip, ip("10.1.2.3"))
        self.assertEqual(str(a), "10.1.2.3:8080")

    def test_bracketed_ipv6(self) -> None:
        a = parse_authority("[2001:DB8::1]:443")
        self.assertEqual(a, Authority("2001:db8::1", 443))
        self.assertEqual(a.ip, ip("2001:db8::1"))
        self.assertEqual(str(a), "[2001:db8::1]:443")

    def test_hostname(self) -> None:
        a = parse_authority("Echo.Default.svc.cluster.local:80")
        self.assertEqual(a, Authority("echo.default.svc.cluster.local", 80))
        self.assertIsNone(a.ip)

    def test_port_bounds(self) -> None:
        self.assertEqual(parse_authority("h:1").port, 1)
        self.assertEqual(parse_authority("h:65535").port, 65535)
        for bad in ("h:0", "h:65536", "h:-1", "h:+80", "h:8o", "h:99999999999"):
            self.assertRaises(BadAuthority, parse_authority, bad)

    def test_no_port(self) -> None:
        for bad in ("example.com", "example.com:", "10.0.0.1", "[::1]", "[::1]:", ":80"):
            self.assertRaises(BadAuthority, parse_authority, bad)

    def test_unbracketed_ipv6(self) -> None:
        with self.assertRaises(BadAuthority) as cm:
            parse_authority("::1:80")
        self.assertIn("brackets", str(cm.exception))
        self.assertRaises(BadAuthority, parse_authority, "2001:db8::1:443")

    def test_bad_brackets(self) -> None:
        for bad in ("[::1:80", "[::1]80", "[not-v6]:80", "[10.0.0.1]:80"):
            self.assertRaises(BadAuthority, parse_authority, bad)

    def test_userinfo_and_path(self) -> None:
        for bad in ("user@host:80", "user:pw@host:80", "host:80/path", "/host:80"):
            self.assertRaises(BadAuthority, parse_authority, bad)

    def test_spaces_and_controls(self) -> None:
        for bad in (" host:80", "host:80 ", "ho st:80", "host:\t80", "host:80\r\n", "h\x00:80"):
            self.assertRaises(BadAuthority, parse_authority, bad)

    def test_empty(self) -> None:
        self.assertRaises(BadAuthority, parse_authority, "")

    def test_bad_hostnames(self) -> None:
        for bad in ("-lead.example:80", "a..b:80", "ex!ample:80", ("a" * 64) + ".com:80"):
            self.assertRaises(BadAuthority, parse_authority, bad)

    def test_non_ascii_digits_are_not_a_port(self) -> None:
        # Latin-1 decoding of a header turns byte 0xb2 into '²', which str.isdigit() accepts
        # but int() rejects: it must be a BadAuthority (400), not a stray ValueError.
        for bad in ("host:\xb2", "10.0.0.1:8\xb9", "host:\u0668\u0660"):
            self.assertRaises(BadAuthority, parse_authority, bad)

    def test_bad_authority_is_a_value_error(self) -> None:
        self.assertTrue(issubclass(BadAuthority, ValueError))


class ParseH2RequestTests(unittest.TestCase):
    def test_plain_connect(self) -> None:
        request = parse_h2_request(connect_headers("10.0.0.1:8080", ("x-forwarded", "a")))
        self.assertEqual(request.method, "CONNECT")
        self.assertEqual(request.authority, "10.0.0.1:8080")
        self.assertIsNone(request.protocol)
        self.assertIsNone(request.path)
        self.assertIsNone(request.scheme)
        self.assertEqual(request.headers, (("x-forwarded", "a"),))
        self.assertEqual(request.header("X-Forwarded"), "a")
        self.assertIsNone(request.header("missing"))

    def test_connect_with_path_but_no_protocol(self) -> None:
        with self.assertRaises(MalformedRequest):
            parse_h2_request(connect_headers("a:1", (":path", "/")))
        with self.assertRaises(MalformedRequest):
            parse_h2_request(connect_headers("a:1", (":scheme", "https")))
        with self.assertRaises(MalformedRequest):
            parse_h2_request(connect_headers("a:1", (":scheme", "https"), (":path", "/")))

    def test_extended_connect_envoy_style(self) -> None:
        request = parse_h2_request(
            connect_headers(
                "10.0.0.1:80", (":protocol", "bytestream"), (":scheme", "https"), (":path", "/")
            )
        )
        self.assertEqual(request.method, "CONNECT")
        self.assertEqual(request.protocol, "bytestream")
        self.assertEqual(request.scheme, "https")
        self.assertEqual(request.path, "/")

    def test_extended_connect_needs_scheme_and_path(self) -> None:
        with self.assertRaises(MalformedRequest):
            parse_h2_request(connect_headers("a:1", (":protocol", "bytestream")))
        with self.assertRaises(MalformedRequest):
            parse_h2_request(
                connect_headers("a:1", (":protocol", "bytestream"), (":path", "/"))
            )

    def test_missing_authority(self) -> None:
        with self.assertRaises(MalformedRequest):
            parse_h2_request(h2_headers((":method", "CONNECT")))
        with self.assertRaises(MalformedRequest):
            parse_h2_request(h2_headers((":method", "CONNECT"), (":authority", "")))

    def test_missing_method(self) -> None:
        with self.assertRaises(MalformedRequest):
            parse_h2_request(h2_headers((":authority", "a:1")))

    def test_unknown_pseudo_header(self) -> None:
        with self.assertRaises(MalformedRequest) as cm:
            parse_h2_request(connect_headers("a:1", (":status", "200")))
        self.assertIn(":status", str(cm.exception))

    def test_duplicate_pseudo_header(self) -> None:
        with self.assertRaises(MalformedRequest) as cm:
            parse_h2_request(connect_headers("a:1", (":authority", "b:2")))
        self.assertIn("duplicate", str(cm.exception))

    def test_pseudo_after_regular(self) -> None:
        headers = h2_headers((":method", "CONNECT"), ("x-a", "1"), (":authority", "a:1"))
        with self.assertRaises(MalformedRequest):
            parse_h2_request(headers)

    def test_uppercase_header_name(self) -> None:
        with self.assertRaises(MalformedRequest):
            parse_h2_request(connect_headers("a:1", ("X-Upper", "1")))

    def test_connection_specific_headers(self) -> None:
        for name in ("connection", "keep-alive", "proxy-connection", "transfer-encoding",
                     "upgrade"):
            with self.assertRaises(MalformedRequest, msg=name):
                parse_h2_request(connect_headers("a:1", (name, "x")))

    def test_te(self) -> None:
        request = parse_h2_request(connect_headers("a:1", ("te", "trailers")))
        self.assertEqual(request.header("te"), "trailers")
        with self.assertRaises(MalformedRequest):
            parse_h2_request(connect_headers("a:1", ("te", "gzip")))

    def test_header_value_with_newline(self) -> None:
        with self.assertRaises(MalformedRequest):
            parse_h2_request(connect_headers("a:1", ("x-a", "1\r\nx-b: 2")))

    def test_non_connect_needs_path_and_scheme(self) -> None:
        with self.assertRaises(MalformedRequest):
            parse_h2_request(h2_headers((":method", "GET"), (":authority", "a"),
                                        (":scheme", "https")))
        with self.assertRaises(MalformedRequest):
            parse_h2_request(h2_headers((":method", "GET"), (":authority", "a"), (":path", "/")))
        with self.assertRaises(MalformedRequest):
            parse_h2_request(h2_headers((":method", "GET"), (":scheme", "https"), (":path", "")))

    def test_non_connect_is_parsed(self) -> None:
        # Whether a non-CONNECT is allowed is the router's call (405), not a malformed request.
        request = parse_h2_request(
            h2_headers((":method", "POST"), (":scheme", "https"), (":authority", "a:1"),
                       (":path", "/tunnel"))
        )
        self.assertEqual((request.method, request.path, request.scheme),
                         ("POST", "/tunnel", "https"))

    def test_protocol_only_with_connect(self) -> None:
        with self.assertRaises(MalformedRequest):
            parse_h2_request(
                h2_headers((":method", "GET"), (":scheme", "https"), (":path", "/"),
                           (":protocol", "websocket"))
            )


class TargetRuleTests(unittest.TestCase):
    def test_cidr(self) -> None:
        rule = TargetRule.parse("10.0.0.0/8")
        self.assertEqual(rule, TargetRule(net("10.0.0.0/8"), 1, 65535))
        self.assertEqual(str(rule), "10.0.0.0/8")

    def test_host_bits_are_masked(self) -> None:
        self.assertEqual(TargetRule.parse("10.1.2.3/8").network, net("10.0.0.0/8"))

    def test_cidr_port(self) -> None:
        rule = TargetRule.parse("10.0.0.0/8:80")
        self.assertEqual((rule.port_low, rule.port_high), (80, 80))
        self.assertEqual(str(rule), "10.0.0.0/8:80")

    def test_cidr_range(self) -> None:
        rule = TargetRule.parse(" 10.0.0.0/8:80-90 ")
        self.assertEqual((rule.port_low, rule.port_high), (80, 90))
        self.assertEqual(str(rule), "10.0.0.0/8:80-90")

    def test_single_address_with_port(self) -> None:
        rule = TargetRule.parse("127.0.0.1:8080")
        self.assertEqual(rule, TargetRule(net("127.0.0.1/32"), 8080, 8080))

    def test_ipv6(self) -> None:
        self.assertEqual(TargetRule.parse("[::1]:8080"), TargetRule(net("::1/128"), 8080, 8080))
        self.assertEqual(TargetRule.parse("[::1]"), TargetRule(net("::1/128")))
        self.assertEqual(TargetRule.parse("::1"), TargetRule(net("::1/128")))
        self.assertEqual(
            TargetRule.parse("fd00::/8:8000-8100"), TargetRule(net("fd00::/8"), 8000, 8100)
        )
        self.assertEqual(TargetRule.parse("[fd00::/8]:443"), TargetRule(net("fd00::/8"), 443, 443))

    def test_bad(self) -> None:
        for bad in (
            "10.0.0.0/8:90-80", "10.0.0.0/8:0", "10.0.0.0/8:65536", "10.0.0.0/8:1-65536",
            "10.0.0.0/8:80-", "10.0.0.0/8:-80", "10.0.0.0/8:http", "10.0.0.0/33",
            "300.0.0.0/8", "[::1", "[::1]8080", "[::1]:x", "", "host.example:80",
            "10.0.0.0/8:\xb2", "10.0.0.0/8:\u0668\u0660",
        ):
            self.assertRaises(ValueError, TargetRule.parse, bad)

    def test_allows(self) -> None:
        rule = TargetRule.parse("10.0.0.0/8:80-90")
        self.assertTrue(rule.allows(ip("10.9.9.9"), 80))
        self.assertTrue(rule.allows(ip("10.9.9.9"), 90))
        self.assertFalse(rule.allows(ip("10.9.9.9"), 79))
        self.assertFalse(rule.allows(ip("10.9.9.9"), 91))
        self.assertFalse(rule.allows(ip("11.0.0.1"), 80))
        self.assertFalse(rule.allows(ip("::1"), 80))


class TargetPolicyTests(unittest.TestCase):
    def test_loopback_by_default(self) -> None:
        policy = TargetPolicy()
        self.assertTrue(policy.allows(ip("127.0.0.1"), 8080))
        self.assertTrue(policy.allows(ip("127.255.0.9"), 1))
        self.assertTrue(policy.allows(ip("::1"), 65535))
        self.assertFalse(policy.allows(ip("10.0.0.1"), 8080))
        self.assertFalse(policy.allows(ip("::2"), 8080))
        self.assertFalse(policy.allows(ip("169.254.169.254"), 80))

    def test_ipv4_mapped_ipv6(self) -> None:
        policy = TargetPolicy()
        self.assertTrue(policy.allows(ip("::ffff:127.0.0.1"), 80))
        self.assertFalse(policy.allows(ip("::ffff:10.0.0.1"), 80))
        ranged = TargetPolicy((TargetRule.parse("10.0.0.0/8:80-90"),))
        self.assertTrue(ranged.allows(ip("::ffff:10.1.2.3"), 85))
        self.assertFalse(ranged.allows(ip("::ffff:10.1.2.3"), 95))
        self.assertFalse(ranged.allows(ip("::ffff:127.0.0.1"), 85))

    def test_any_rule_allows(self) -> None:
        policy = TargetPolicy((TargetRule.parse("10.0.0.0/8:80"), TargetRule.parse("[::1]:443")))
        self.assertTrue(policy.allows(ip("10.0.0.1"), 80))
        self.assertTrue(policy.allows(ip("::1"), 443))
        self.assertFalse(policy.allows(ip("::1"), 80))
        self.assertFalse(policy.allows(ip("127.0.0.1"), 443))
        self.assertEqual(str(policy), "10.0.0.0/8:80, ::1/128:443")
