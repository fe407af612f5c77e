"""
Built-in transport sockets: ``envoy.transport_sockets.tls`` (Upstream/DownstreamTlsContext ->
hbonex.tls.context.TLSSettings) and ``envoy.transport_sockets.raw_buffer`` (plain TCP).

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

from hbonex.errors import ConfigError
from hbonex.http.matchers import StringMatcher
from hbonex.interfaces import ITransportSocketExtension
from hbonex.tls import pki
from hbonex.tls.certwatch import CertificateSources, SdsRef
from hbonex.tls.context import PeerPolicy, SanMatcher, TLSSettings

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

    def parseConfig(self, config: Any, path: str, context: Any) -> TlsConfig:
        upstream = config.DESCRIPTOR.name == "UpstreamTlsContext"
        if not config.HasField("common_tls_context"):
            raise context.error(path, "missing required field 'common_tls_context'")
        if upstream:
            sni = config.sni
            require_peer = True
        else:
            sni = ""
            require_peer = (config.require_client_certificate.value
                            if config.HasField("require_client_certificate") else False)
        settings, alpn_explicit, files = _common_tls_context(
            config.common_tls_context, f"{path}.common_tls_context", context,
            upstream=upstream, require_peer=require_peer,
        )
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

    def parseConfig(self, config: Any, path: str, context: Any) -> None:
        return None

    def buildTransport(self, parsed: Any, upstream: bool, context: Any) -> None:
        return None


def _version(params: Any, path: str, key: str, default: Optional[str],
             context: Any) -> Optional[str]:
    number = getattr(params, key)
    value = params.DESCRIPTOR.fields_by_name[key].enum_type.values_by_number[number].name
    if value == "TLS_AUTO":
        return default
    if value in ("TLSv1_0", "TLSv1_1"):
        raise context.error(path, f"{value} is not supported; use TLSv1_2 or TLSv1_3", key)
    return str(value)


def _common_tls_context(
    message: Any, path: str, context: Any, *, upstream: bool, require_peer: bool
) -> tuple[TLSSettings, bool, tuple[str, ...]]:
    min_version: Optional[str] = "TLSv1_2"
    max_version: Optional[str] = None
    if message.HasField("tls_params"):
        params_path = f"{path}.tls_params"
        params = message.tls_params
        min_version = _version(params, params_path, "tls_minimum_protocol_version", "TLSv1_2",
                               context)
        max_version = _version(params, params_path, "tls_maximum_protocol_version", None,
                               context)
        order = {"TLSv1_2": 2, "TLSv1_3": 3}
        if max_version and order[max_version] < order[min_version or "TLSv1_2"]:
            raise context.error(
                params_path,
                f"tls_maximum_protocol_version {max_version} is below the minimum {min_version}"
            )
    alpn = tuple(p.encode() for p in message.alpn_protocols)
    certificates = message.tls_certificates
    sds_certificates = message.tls_certificate_sds_secret_configs
    if certificates and sds_certificates:
        raise context.error(f"{path}.tls_certificate_sds_secret_configs",
                            "give tls_certificates or tls_certificate_sds_secret_configs, "
                            "not both")
    if not certificates and not sds_certificates:
        raise context.error(
            path, "tls_certificates needs one certificate (hbonex always uses mutual TLS)"
            if upstream else "missing required field 'tls_certificates'",
        )
    if len(certificates) > 1:
        raise context.error(f"{path}.tls_certificates[1]",
                            "only one entry in tls_certificates is supported")
    if len(sds_certificates) > 1:
        raise context.error(f"{path}.tls_certificate_sds_secret_configs[1]",
                            "only one entry in tls_certificate_sds_secret_configs is supported")
    certificate_sds = validation_sds = None
    if sds_certificates:
        certificate_sds = _sds_ref(sds_certificates[0],
                                   f"{path}.tls_certificate_sds_secret_configs[0]", context)
    else:
        cert = certificates[0]
        cert_path = f"{path}.tls_certificates[0]"
        for key in ("certificate_chain", "private_key"):
            if not cert.HasField(key):
                raise context.error(cert_path, f"missing required field '{key}'")
    ca = None
    matchers: tuple[SanMatcher, ...] = ()
    if message.HasField("combined_validation_context"):
        # Envoy's merge: the SDS secret's validation context over the default one (Istio's
        # shape: SAN matchers here, the trust bundle from the ROOTCA secret).
        combined = message.combined_validation_context
        combined_path = f"{path}.combined_validation_context"
        if not combined.HasField("validation_context_sds_secret_config"):
            raise context.error(combined_path, "missing required field "
                                "'validation_context_sds_secret_config'")
        validation_sds = _sds_ref(combined.validation_context_sds_secret_config,
                                  f"{combined_path}.validation_context_sds_secret_config",
                                  context)
        default = combined.default_validation_context
        default_path = f"{combined_path}.default_validation_context"
        if default.HasField("trusted_ca"):
            ca = (default.trusted_ca, f"{default_path}.trusted_ca")
        matchers = tuple(
            _san_matcher(m, f"{default_path}.match_typed_subject_alt_names[{i}]", context)
            for i, m in enumerate(default.match_typed_subject_alt_names)
        )
    elif message.HasField("validation_context_sds_secret_config"):
        validation_sds = _sds_ref(message.validation_context_sds_secret_config,
                                  f"{path}.validation_context_sds_secret_config", context)
    elif message.HasField("validation_context"):
        validation = message.validation_context
        validation_path = f"{path}.validation_context"
        if not validation.HasField("trusted_ca"):
            raise context.error(validation_path, "missing required field 'trusted_ca'")
        ca = (validation.trusted_ca, f"{validation_path}.trusted_ca")
        matchers = tuple(
            _san_matcher(m, f"{validation_path}.match_typed_subject_alt_names[{i}]", context)
            for i, m in enumerate(validation.match_typed_subject_alt_names)
        )
    elif upstream:
        raise context.error(
            path, "missing required field 'validation_context' (hbonex always verifies the "
            "server against validation_context.trusted_ca)"
        )
    elif require_peer:
        raise context.error(
            path, "require_client_certificate needs validation_context.trusted_ca to verify "
            "client certificates with"
        )
    if certificate_sds is None:
        sources = [(cert.certificate_chain, f"{cert_path}.certificate_chain"),
                   (cert.private_key, f"{cert_path}.private_key")]
        if ca is not None:
            sources.append(ca)
        certificate, chain, key, cas, files = _load(context, sources)
        file_of = [context.data_source(source, where)[0] for source, where in sources]
        if validation_sds is not None:
            cas = ()
    else:
        certificate, chain, key, cas, files = None, (), None, (), ()  # type: ignore[assignment]
        file_of = [None, None]
        if ca is not None:
            _, cas_, _ = _sds_ca_only(context, ca)
            cas, file_of = cas_, [None, None, context.data_source(*ca)[0]]
    watched = CertificateSources(
        cert_file=file_of[0], key_file=file_of[1],
        ca_file=file_of[2] if len(file_of) > 2 else None,
        certificate_sds=certificate_sds, validation_sds=validation_sds,
        base_dir=context.base_dir,
        chain_check=len(file_of) > 2 and all(f is not None for f in file_of),
        default_san_matchers=matchers if validation_sds is not None else (),
    )
    if certificate_sds is not None or validation_sds is not None:
        try:
            material = watched.load()
        except pki.PKIError as e:
            where = (f"{path}.tls_certificate_sds_secret_configs[0]" if certificate_sds
                     and str(e).startswith(f"{certificate_sds.path}:") else
                     (f"{path}.combined_validation_context.validation_context_sds_secret_config"
                      if message.HasField("combined_validation_context") else
                      f"{path}.validation_context_sds_secret_config") if validation_sds
                     else path)
            raise context.error(where, str(e))
        if material.certificate is not None:
            certificate, chain, key = material.certificate, material.chain, material.key
            try:
                pki._check_key_matches(key, certificate_sds.path,  # type: ignore[union-attr]
                                       certificate, certificate_sds.path)  # type: ignore
            except pki.PKIError as e:
                raise context.error(f"{path}.tls_certificate_sds_secret_configs[0]", str(e))
        if material.ca_certificates is not None:
            cas = material.ca_certificates
        if material.san_matchers is not None:
            # A secret's own SAN matchers win; none leaves the default context's (Envoy's
            # merge of combined_validation_context).
            matchers = material.san_matchers or watched.default_san_matchers
        files = tuple(str(f) for f in material.files)
    assert certificate is not None
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
        sources=watched,
    )
    return settings, len(alpn) > 0 or context.has(f"{path}.alpn_protocols"), files


def _sds_ref(message: Any, path: str, context: Any) -> SdsRef:
    """
    An SdsSecretConfig: hbonex reads secrets from files (``sds_config.path_config_source``).
    """
    if not message.name:
        raise context.error(path, "missing required field 'name'")
    if not message.HasField("sds_config"):
        raise context.error(path, "missing required field 'sds_config' (hbonex reads secrets "
                            "from files: sds_config.path_config_source.path)")
    source = message.sds_config
    where = f"{path}.sds_config"
    if source.HasField("path_config_source"):
        name = source.path_config_source.path
        if not name:
            raise context.error(f"{where}.path_config_source", "missing required field 'path'")
    elif source.path:
        name = source.path
    else:
        raise context.error(where, "hbonex reads secrets from files only: give "
                            "path_config_source.path (no xDS server)")
    return SdsRef(context.file_path(name), message.name)


def _sds_ca_only(context: Any, ca: tuple[Any, str]) -> tuple[Any, tuple[x509.Certificate, ...],
                                                              Any]:
    """A trusted_ca next to an SDS certificate: parsed alone."""
    source, where = ca
    file, data = context.data_source(source, where)
    try:
        label = Path(file) if file is not None else Path(_label(where))
        return None, tuple(pki._parse_certs(label, pki._read(label) if file else data)), None
    except pki.PKIError as e:
        raise context.error(where, str(e), "filename" if file else None)


def _san_matcher(message: Any, path: str, context: Any) -> SanMatcher:
    san_type = message.DESCRIPTOR.fields_by_name["san_type"].enum_type.values_by_number[
        message.san_type].name
    if san_type not in SAN_TYPES:
        raise context.error(path, f"san_type {san_type} is not one of {', '.join(SAN_TYPES)}"
                            if san_type != "SAN_TYPE_UNSPECIFIED" else
                            "missing required field 'san_type'")
    if not message.HasField("matcher"):
        raise context.error(path, "missing required field 'matcher'")
    matcher = string_matcher(message.matcher, f"{path}.matcher", context)
    return SanMatcher(san_type, matcher.kind, matcher.value, matcher.ignore_case)


def string_matcher(matcher: Any, path: str, context: Any) -> StringMatcher:
    """
    An Envoy StringMatcher (``exact``, ``prefix``, ``suffix``, ``contains``, ``safe_regex``;
    ``ignore_case``), its regex checked to compile.
    """
    kind = matcher.WhichOneof("match_pattern")
    if kind is None:
        raise context.error(path, "one of exact, prefix, suffix, contains, safe_regex is "
                            "required")
    if kind == "safe_regex":
        text = regex_field(matcher.safe_regex, f"{path}.safe_regex", context)
    elif kind in ("exact", "prefix", "suffix", "contains"):
        text = getattr(matcher, kind)
        if kind != "exact" and not text:
            raise context.error(path, f"{kind} must not be empty", kind)  # Envoy's min_len
    else:
        raise context.error(path, f"{kind} is not supported", kind)
    return StringMatcher(kind, text, matcher.ignore_case)


def regex_field(message: Any, path: str, context: Any) -> str:
    """
    An Envoy RegexMatcher ``{regex, google_re2: {}}``, checked to compile.
    """
    regex = message.regex
    if not regex and not context.has(f"{path}.regex"):
        raise context.error(path, "missing required field 'regex'")
    try:
        re.compile(regex)
    except re.error as e:
        raise context.error(path, f"invalid regex {regex!r}: {e}", "regex")
    return str(regex)


def _load(
    context: Any, sources_in: list[tuple[Any, str]]
) -> tuple[x509.Certificate, tuple[x509.Certificate, ...], Any, tuple[x509.Certificate, ...],
           tuple[str, ...]]:
    sources = [(path, *context.data_source(source, path)) for source, path in sources_in]
    files = tuple(str(file) for _, file, _ in sources if file is not None)
    chain_path = sources[0][0]

    def fail(error: pki.PKIError) -> ConfigError:
        text = str(error)
        for where, file, _ in sources:
            if file is not None and text.startswith(f"{file}:"):
                return context.error(where, text, "filename")
        for where, file, _ in sources:
            if file is None and text.startswith(f"{_label(where)}:"):
                return context.error(where, text)
        return context.error(chain_path, text)

    try:
        if len(sources) > 2 and all(file is not None for _, file, _ in sources):
            material = pki.load_material(sources[0][1], sources[1][1], sources[2][1])
            return (material.certificate, tuple(material.chain), material.key,
                    tuple(material.ca_certificates), files)
        datas = []
        for where, file, data in sources:
            label = Path(file) if file is not None else Path(_label(where))
            datas.append((label, pki._read(label) if file is not None else data))
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


def _label(path: str) -> str:
    return f"<inline {path.rsplit('.', 1)[-1]}>"
