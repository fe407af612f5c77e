"""
Built-in transport sockets: ``envoy.transport_sockets.tls`` (Upstream/DownstreamTlsContext ->
hbonex.tls.TLSSettings) and ``envoy.transport_sockets.raw_buffer`` (plain TCP).

Certificates are loaded and cross-checked when the configuration is (key matches, not expired,
chains to the trust bundle), so a bad file is an error naming the YAML field and the file.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any, Optional

import attrs
from cryptography import x509
from twisted.plugin import IPlugin
from zope.interface import implementer

from hbonex import pki
from hbonex.errors import ConfigError
from hbonex.interfaces import ITransportSocketExtension
from hbonex.tls import PeerPolicy, SanMatcher, TLSSettings
from hbonex.yamlpath import Node

__all__ = ["RawBufferTransportSocket", "TlsConfig", "TlsTransportSocket"]

TLS = "envoy.transport_sockets.tls"
UPSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
RAW_BUFFER = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
VERSIONS = ("TLS_AUTO", "TLSv1_0", "TLSv1_1", "TLSv1_2", "TLSv1_3")
SAN_TYPES = ("URI", "DNS", "IP_ADDRESS", "EMAIL")


@attrs.frozen
class TlsConfig:
    """
    A parsed Upstream/DownstreamTlsContext.
    """

    upstream: bool
    path: str
    settings: TLSSettings
    alpn_explicit: bool
    files: tuple[str, ...] = ()  # certificate, key, CA file names as configured


@implementer(IPlugin, ITransportSocketExtension)
class TlsTransportSocket:
    name = TLS
    typeUrls = (UPSTREAM, DOWNSTREAM)

    def parseConfig(self, config: dict[str, Any], path: str, context: Any) -> TlsConfig:
        node = context.node(config, path)
        upstream = context.type_url != DOWNSTREAM
        common = node.map_field("common_tls_context")
        if common is None:
            raise node.error("missing required field 'common_tls_context'")
        if upstream:
            sni = node.str_field("sni", "")
            require_peer = True
        else:
            sni = ""
            require_peer = node.bool_field("require_client_certificate", False)
        settings, alpn_explicit, files = _common_tls_context(
            common, context, upstream=upstream, require_peer=require_peer
        )
        node.finish()
        return TlsConfig(upstream, path, attrs.evolve(settings, sni=sni), alpn_explicit, files)

    def buildTransport(self, parsed: Any, upstream: bool, context: Any) -> TLSSettings:
        if parsed.upstream != upstream:
            want = "UpstreamTlsContext" if upstream else "DownstreamTlsContext"
            where = "a cluster" if upstream else "a listener"
            url = UPSTREAM if upstream else DOWNSTREAM
            raise ConfigError(f"{parsed.path}.@type", f"{where} needs {want} ({url})")
        return parsed.settings


@implementer(IPlugin, ITransportSocketExtension)
class RawBufferTransportSocket:
    name = "envoy.transport_sockets.raw_buffer"
    typeUrls = (RAW_BUFFER,)

    def parseConfig(self, config: dict[str, Any], path: str, context: Any) -> None:
        context.node(config, path).finish()
        return None

    def buildTransport(self, parsed: Any, upstream: bool, context: Any) -> None:
        return None


def _version(node: Node, key: str, default: Optional[str]) -> Optional[str]:
    value = node.str_field(key, None, choices=VERSIONS)
    if value is None or value == "TLS_AUTO":
        return default
    if value in ("TLSv1_0", "TLSv1_1"):
        raise node.error(f"{value} is not supported; use TLSv1_2 or TLSv1_3", key)
    return value  # type: ignore[no-any-return]


def _common_tls_context(
    node: Node, context: Any, *, upstream: bool, require_peer: bool
) -> tuple[TLSSettings, bool, tuple[str, ...]]:
    min_version: Optional[str] = "TLSv1_2"
    max_version: Optional[str] = None
    params = node.map_field("tls_params")
    if params is not None:
        min_version = _version(params, "tls_minimum_protocol_version", "TLSv1_2")
        max_version = _version(params, "tls_maximum_protocol_version", None)
        params.finish()
        order = {"TLSv1_2": 2, "TLSv1_3": 3}
        if max_version and order[max_version] < order[min_version or "TLSv1_2"]:
            raise params.error(
                f"tls_maximum_protocol_version {max_version} is below the minimum {min_version}"
            )
    alpn_nodes = node.get("alpn_protocols")
    alpn = tuple(p.encode() for p in node.str_list_field("alpn_protocols"))
    certificates = node.list_field("tls_certificates")
    if not certificates:
        raise node.error(
            "tls_certificates needs one certificate (hbonex always uses mutual TLS)"
            if upstream else "missing required field 'tls_certificates'",
        )
    if len(certificates) > 1:
        raise certificates[1].error("only one entry in tls_certificates is supported")
    cert_entry = certificates[0].expect_map()
    chain_node = cert_entry.map_field("certificate_chain", required=True)
    key_node = cert_entry.map_field("private_key", required=True)
    cert_entry.finish()
    validation = node.map_field("validation_context")
    ca_node = None
    matchers: tuple[SanMatcher, ...] = ()
    if validation is not None:
        ca_node = validation.map_field("trusted_ca", required=True)
        matchers = tuple(
            _san_matcher(m) for m in validation.list_field("match_typed_subject_alt_names")
        )
        validation.finish()
    elif upstream:
        raise node.error(
            "missing required field 'validation_context' (hbonex always verifies the server "
            "against validation_context.trusted_ca)"
        )
    elif require_peer:
        raise node.error(
            "require_client_certificate needs validation_context.trusted_ca to verify "
            "client certificates with"
        )
    node.finish()
    assert chain_node is not None and key_node is not None
    certificate, chain, key, cas, files = _load(context, chain_node, key_node, ca_node)
    settings = TLSSettings(
        certificate=certificate,
        private_key=key,
        ca_certificates=cas,
        chain=chain,
        min_version=min_version or "TLSv1_2",
        max_version=max_version,
        alpn=alpn,
        peer_policy=PeerPolicy(san_matchers=matchers),
        require_peer_certificate=require_peer,
    )
    return settings, alpn_nodes is not None, files


def _san_matcher(node: Node) -> SanMatcher:
    node.expect_map()
    san_type = node.str_field("san_type", required=True, choices=SAN_TYPES)
    matcher = node.map_field("matcher", required=True)
    assert matcher is not None
    kind, value = matcher.oneof(  # type: ignore[misc]
        "exact", "prefix", "suffix", "contains", "safe_regex"
    )
    ignore_case = matcher.bool_field("ignore_case")
    if kind == "safe_regex":
        text = regex_field(value)
    else:
        text = value.as_str()
    matcher.finish()
    node.finish()
    return SanMatcher(san_type, kind, text, ignore_case)


def regex_field(node: Node) -> str:
    """
    An Envoy RegexMatcher ``{regex, google_re2: {}}``, checked to compile.
    """
    node.expect_map()
    node.ignore("google_re2")
    regex = node.str_field("regex", required=True)
    node.finish()
    try:
        re.compile(regex)
    except re.error as e:
        raise node.error(f"invalid regex {regex!r}: {e}", "regex")
    return regex  # type: ignore[no-any-return]


def _load(
    context: Any, chain_node: Node, key_node: Node, ca_node: Optional[Node]
) -> tuple[x509.Certificate, tuple[x509.Certificate, ...], Any, tuple[x509.Certificate, ...],
           tuple[str, ...]]:
    sources = [
        (node, *context.data_source(node))
        for node in (chain_node, key_node, ca_node) if node is not None
    ]
    files = tuple(str(path) for _, path, _ in sources if path is not None)

    def fail(error: pki.PKIError) -> ConfigError:
        text = str(error)
        for node, path, _ in sources:
            if path is not None and text.startswith(f"{path}:"):
                return node.error(text, "filename")
        for node, path, _ in sources:
            if path is None and text.startswith(f"{_label(node)}:"):
                return node.error(text)
        return chain_node.error(text)

    try:
        if ca_node is not None and all(path is not None for _, path, _ in sources):
            material = pki.load_material(sources[0][1], sources[1][1], sources[2][1])
            return (material.certificate, tuple(material.chain), material.key,
                    tuple(material.ca_certificates), files)
        datas = []
        for node, path, data in sources:
            label = Path(path) if path is not None else Path(_label(node))
            datas.append((label, pki._read(label) if path is not None else data))
        (cert_label, cert_data), (key_label, key_data) = datas[0], datas[1]
        certs = pki._parse_certs(cert_label, cert_data)
        key = pki._parse_key(key_label, key_data)
        pki._check_key_matches(key, key_label, certs[0], cert_label)
        pki._check_validity(certs[0], cert_label, datetime.datetime.now(datetime.timezone.utc))
        cas: tuple[x509.Certificate, ...] = ()
        if len(datas) > 2:
            cas = tuple(pki._parse_certs(*datas[2]))
        return certs[0], tuple(certs[1:]), key, cas, files
    except pki.PKIError as e:
        raise fail(e)


def _label(node: Node) -> str:
    return f"<inline {node.path.rsplit('.', 1)[-1]}>"
