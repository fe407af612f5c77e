"""
Certificates over time: where a TLS context's certificate, key and trust bundle come from
(files, or Envoy's file-based SDS: a watched file holding ``Secret`` resources), reloading them
when the files change or on SIGHUP, and their expiry as stats.

New handshakes use the new material (the connection creators get a new ``SSL.Context``);
connections already established keep theirs.  A new file that does not load (unparsable, key
mismatch, expired, another identity than the one in use) is refused with one log line naming the
file and the problem, and the material in use stays.

Files are polled (mtime, size, inode: a rename or a Kubernetes symlink swap is seen too); a
change is applied once the files have stayed the same for one more poll, so a rotation that
writes the key and then the certificate is never loaded half done.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
from cryptography import x509
from twisted.application import service
from twisted.logger import Logger

from hbonex.observability.stats import STATS
from hbonex.sighup import SighupHook
from hbonex.tls import pki
from hbonex.tls.context import SanMatcher, TLSSettings

__all__ = ["CertificateSources", "CertificateWatcher", "Material", "SdsRef", "load_sds_secret"]

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
#: Envoy's name for the stat.
DAYS_UNTIL_FIRST_CERT_EXPIRING = "server.days_until_first_cert_expiring"


@attrs.frozen
class SdsRef:
    """An ``SdsSecretConfig`` with ``sds_config.path_config_source``: the file and the name."""

    path: Path
    name: str


@attrs.frozen
class Material:
    """What a load produced; None fields are kept from the settings in use."""

    certificate: Optional[x509.Certificate] = None
    chain: tuple[x509.Certificate, ...] = ()
    key: Any = None
    ca_certificates: Optional[tuple[x509.Certificate, ...]] = None
    san_matchers: Optional[tuple[SanMatcher, ...]] = None
    #: Every file read (the SDS files and the files their secrets name), to be watched.
    files: tuple[Path, ...] = ()


class _Context:
    """Enough of hbonex.config.loader.ConfigContext to parse a Secret outside the loader."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def error(self, path: str, message: str, key: Optional[str] = None) -> Exception:
        where = f"{path}.{key}" if key else path
        return pki.PKIError(f"{self.file}: {where}: {message}")

    def has(self, path: str) -> bool:
        return False

    def warn(self, path: str, text: str) -> None:
        pass


def load_sds_secret(ref: SdsRef, base_dir: Optional[Path]) -> tuple[Any, list[Path]]:
    """
    The ``Secret`` called ``ref.name`` in the SDS file (YAML or JSON, a DiscoveryResponse:
    ``resources: [{"@type": ...Secret, name, tls_certificate | validation_context}]``), and
    the data sources' contents resolved: returns (secret, [files it names]).  Raises PKIError
    naming the file.
    """
    import yaml

    from hbonex.config import support
    from hbonex.config.schema import message_class, to_message
    from hbonex.errors import ConfigError

    data = pki._read(ref.path)
    try:
        document = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise pki.PKIError(f"{ref.path}: not YAML or JSON: {str(e).splitlines()[0]}")
    resources = document.get("resources") if isinstance(document, dict) else None
    if not isinstance(resources, list):
        raise pki.PKIError(f"{ref.path}: expected a mapping with a 'resources' list "
                           "(an Envoy DiscoveryResponse holding Secret resources)")
    cls = message_class("envoy.extensions.transport_sockets.tls.v3.Secret")
    assert cls is not None
    names = []
    for index, resource in enumerate(resources):
        if not isinstance(resource, dict):
            raise pki.PKIError(f"{ref.path}: resources[{index}]: expected a mapping")
        resource = dict(resource)
        type_url = resource.pop("@type", SECRET_TYPE)
        if type_url != SECRET_TYPE:
            raise pki.PKIError(f"{ref.path}: resources[{index}]: @type {type_url!r} is not "
                               f"{SECRET_TYPE}")
        try:
            secret: Any = to_message(resource, cls, f"resources[{index}]")
        except ConfigError as e:
            raise pki.PKIError(f"{ref.path}: {e}")
        names.append(secret.name)
        if secret.name == ref.name:
            support.check(secret, f"resources[{index}]", _Context(ref.path))
            return secret, []
    found = ", ".join(repr(n) for n in names) or "none"
    raise pki.PKIError(f"{ref.path}: no secret named {ref.name!r} (found: {found})")


def _data_source(source: Any, what: str, file: Path, base_dir: Optional[Path],
                 files: list[Path]) -> tuple[Path, bytes]:
    """(label for errors, contents) of a DataSource inside an SDS secret."""
    kind = source.WhichOneof("specifier")
    if kind == "filename":
        path = Path(os.path.expanduser(source.filename))
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        files.append(path)
        return path, pki._read(path)
    if kind == "inline_string":
        return Path(f"{file} ({what})"), source.inline_string.encode()
    if kind == "inline_bytes":
        return Path(f"{file} ({what})"), bytes(source.inline_bytes)
    if kind == "environment_variable":
        value = os.environ.get(source.environment_variable)
        if value is None:
            raise pki.PKIError(f"{file}: {what}: environment variable "
                               f"{source.environment_variable} is not set")
        return Path(f"{file} ({what})"), value.encode()
    raise pki.PKIError(f"{file}: {what}: one of filename, inline_string, inline_bytes, "
                       "environment_variable is required")


@attrs.frozen
class CertificateSources:
    """
    Where a TLS context's material is reloaded from.  A part without a file (inline data)
    is kept as it is.  ``chain_check``: the leaf must chain to the bundle (as the flags and an
    all-files YAML context are checked at load).
    """

    cert_file: Optional[Path] = None
    key_file: Optional[Path] = None
    ca_file: Optional[Path] = None
    certificate_sds: Optional[SdsRef] = None
    validation_sds: Optional[SdsRef] = None
    base_dir: Optional[Path] = None
    chain_check: bool = False
    #: SAN matchers of a combined_validation_context's default context: they apply while
    #: the validation secret has none of its own (Envoy's merge).
    default_san_matchers: tuple[SanMatcher, ...] = ()

    def files(self) -> tuple[Path, ...]:
        found = [self.cert_file, self.key_file, self.ca_file,
                 self.certificate_sds.path if self.certificate_sds else None,
                 self.validation_sds.path if self.validation_sds else None]
        return tuple(f for f in found if f is not None)

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.files())

    def load(self, now: Optional[datetime.datetime] = None) -> Material:
        """
        Read and check everything; PKIError naming the file and the problem otherwise.
        """
        now = pki._aware(now)
        files: list[Path] = list(self.files())
        if self.chain_check and self.cert_file and self.key_file and self.ca_file:
            m = pki.load_material(self.cert_file, self.key_file, self.ca_file, now=now)
            return Material(m.certificate, tuple(m.chain), m.key, tuple(m.ca_certificates),
                            None, tuple(files))
        certificate = key = None
        chain: tuple[x509.Certificate, ...] = ()
        cas = matchers = None
        cert_part: Optional[tuple[Path, bytes]] = None
        key_part: Optional[tuple[Path, bytes]] = None
        if self.certificate_sds is not None:
            ref = self.certificate_sds
            secret, _ = load_sds_secret(ref, self.base_dir)
            if not secret.HasField("tls_certificate"):
                raise pki.PKIError(f"{ref.path}: secret {ref.name!r} has no tls_certificate")
            tc = secret.tls_certificate
            for field in ("certificate_chain", "private_key"):
                if not tc.HasField(field):
                    raise pki.PKIError(f"{ref.path}: secret {ref.name!r}: tls_certificate "
                                       f"needs {field}")
            cert_part = _data_source(tc.certificate_chain, "certificate_chain", ref.path,
                                     self.base_dir, files)
            key_part = _data_source(tc.private_key, "private_key", ref.path, self.base_dir,
                                    files)
        else:
            if self.cert_file is not None:
                cert_part = (self.cert_file, pki._read(self.cert_file))
            if self.key_file is not None:
                key_part = (self.key_file, pki._read(self.key_file))
        if cert_part is not None:
            certs = pki._parse_certs(*cert_part)
            certificate, chain = certs[0], tuple(certs[1:])
            pki._check_validity(certificate, cert_part[0], now)
            try:
                pki.spiffe_id_of(certificate)
            except Exception as e:
                raise pki.PKIError(f"{cert_part[0]}: {e}")
        if key_part is not None:
            key = pki._parse_key(*key_part)
        if self.validation_sds is not None:
            ref = self.validation_sds
            secret, _ = load_sds_secret(ref, self.base_dir)
            if not secret.HasField("validation_context"):
                raise pki.PKIError(f"{ref.path}: secret {ref.name!r} has no "
                                   "validation_context")
            validation = secret.validation_context
            if not validation.HasField("trusted_ca"):
                raise pki.PKIError(f"{ref.path}: secret {ref.name!r}: validation_context "
                                   "needs trusted_ca")
            cas = tuple(pki._parse_certs(*_data_source(
                validation.trusted_ca, "trusted_ca", ref.path, self.base_dir, files)))
            from hbonex.tls.transport_sockets import _san_matcher

            matchers = tuple(
                _san_matcher(m, f"match_typed_subject_alt_names[{i}]", _Context(ref.path))
                for i, m in enumerate(validation.match_typed_subject_alt_names)
            )
        elif self.ca_file is not None:
            cas = tuple(pki._parse_certs(self.ca_file, pki._read(self.ca_file)))
        return Material(certificate, chain, key, cas, matchers, tuple(files))

    def apply(self, material: Material, settings: TLSSettings) -> TLSSettings:
        """
        ``settings`` with ``material`` in place; PKIError if the key does not match the
        certificate or the identity changed (pools and access logs know it; restart for that).
        """
        changes: dict[str, Any] = {}
        certificate = material.certificate or settings.certificate
        key = material.key if material.key is not None else settings.private_key
        if material.certificate is not None:
            changes.update(certificate=certificate, chain=material.chain)
        if material.key is not None:
            changes["private_key"] = key
        label = self._cert_label()
        if pki._public_der(key) != pki._public_der(certificate):
            key_label = self.key_file or label
            raise pki.PKIError(f"{key_label}: private key does not match certificate {label}")
        old, new = _identity(settings.certificate), _identity(certificate)
        if old != new:
            raise pki.PKIError(f"{label}: identity {new or 'none'} is not the identity in use "
                               f"({old or 'none'}); changing identity needs a restart")
        if material.ca_certificates is not None:
            changes["ca_certificates"] = material.ca_certificates
        if material.san_matchers is not None:
            changes["peer_policy"] = attrs.evolve(
                settings.peer_policy,
                san_matchers=material.san_matchers or self.default_san_matchers)
        return attrs.evolve(settings, **changes)

    def _cert_label(self) -> Path:
        if self.certificate_sds is not None:
            return self.certificate_sds.path
        return self.cert_file or Path("<inline certificate>")


def _identity(cert: x509.Certificate) -> str:
    sid = pki.spiffe_id_of(cert)
    if sid is not None:
        return str(sid)
    from hbonex.tls.context import certificate_sans

    sans = certificate_sans(cert)
    return ",".join(f"{k}:{v}" for k, vs in sorted(sans.items()) for v in sorted(vs))


# -- the watcher ---------------------------------------------------------------------------------


@attrs.define
class _User:
    """One TLS context built from a source: a listener's filter chain or a cluster."""

    label: str  # "listener hbone", "cluster hbone"
    stat_prefix: str  # "listener.hbone.ssl.certificate.default"
    get: Callable[[], TLSSettings]
    set: Callable[[TLSSettings], None]
    server: bool


@attrs.define
class _Watched:
    sources: CertificateSources
    users: list[_User]
    files: tuple[Path, ...]
    signature: tuple[Any, ...] = ()
    pending: Optional[tuple[Any, ...]] = None


def _signature(files: tuple[Path, ...]) -> tuple[Any, ...]:
    result: list[Any] = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError as e:
            result.append((str(path), e.errno))
            continue
        result.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
    return tuple(result)


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


class CertificateWatcher(service.Service):
    """
    Polls every TLS context's files of a Bootstrap every ``interval`` seconds (and reloads all
    on SIGHUP); keeps the expiry gauges; warns once per certificate whose expiry is nearer than
    ``warning_days``.
    """

    log = Logger()

    def __init__(self, bootstrap: Any, interval: float = 1.0, warning_days: float = 7.0,
                 clock: Any = None) -> None:
        self.bootstrap = bootstrap
        self.interval = interval
        self.warning_days = warning_days
        self.clock = clock if clock is not None else bootstrap.reactor
        self.watched: list[_Watched] = []
        self._call: Any = None
        self._warned: set[tuple[int, str]] = set()
        self._sighup = SighupHook(lambda: self.reload_all("SIGHUP"))

    # -- setup ---------------------------------------------------------------------------------

    def collect(self) -> None:
        """Find every TLS context with reloadable sources (after the configuration is built)."""
        groups: dict[CertificateSources, _Watched] = {}

        def add(sources: Any, user: _User) -> None:
            if not isinstance(sources, CertificateSources) or not sources.files():
                return
            group = groups.get(sources)
            if group is None:
                files = sources.files()
                group = groups[sources] = _Watched(sources, [], files, _signature(files))
            group.users.append(user)

        for listener in self.bootstrap.listeners:
            tls_chains = [c for c in listener.all_chains if c.tls is not None]
            for index, chain in enumerate(tls_chains):
                creator = chain.tls
                name = _cert_name(creator.settings.sources, index if len(tls_chains) > 1 else -1)
                add(creator.settings.sources, _User(
                    f"listener {listener.name}",
                    f"listener.{listener.name}.ssl.certificate.{name}",
                    lambda c=creator: c.settings,  # type: ignore[misc]
                    creator.reload, True))
        for cluster in self.bootstrap.clusters.values():
            if cluster.tls is None or cluster.client_tls is None:
                continue

            def set_cluster(settings: TLSSettings, c: Any = cluster) -> None:
                c.client_tls.reload(settings)
                c.tls = settings

            add(cluster.tls.sources, _User(
                f"cluster {cluster.name}",
                f"cluster.{cluster.name}.ssl.certificate.{_cert_name(cluster.tls.sources, -1)}",
                lambda c=cluster: c.tls,  # type: ignore[misc]
                set_cluster, False))
        self.watched = list(groups.values())
        # The files the SDS secrets name are watched too.
        for group in self.watched:
            try:
                group.files = group.sources.load().files
                group.signature = _signature(group.files)
            except pki.PKIError:
                pass  # the loader checked them a moment ago; a change shows on the next poll

    def startService(self) -> None:
        super().startService()
        self.collect()
        self.update_expiry()
        if self.watched and self.interval > 0:
            self._call = self.clock.callLater(self.interval, self._poll)
        if self.watched:
            self._sighup.start(self.bootstrap.reactor)

    def stopService(self) -> Any:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._sighup.stop()

    # -- reloading -----------------------------------------------------------------------------

    def _poll(self) -> None:
        self._call = None
        try:
            self.check()
        finally:
            if self.running:
                self._call = self.clock.callLater(self.interval, self._poll)

    def check(self) -> None:
        """One poll: reload what changed and stayed unchanged since the previous poll."""
        for group in self.watched:
            signature = _signature(group.files)
            if signature == group.signature:
                group.pending = None
                continue
            if signature != group.pending:
                group.pending = signature  # changed: wait until it stays so for one poll
                continue
            group.pending = None
            self._reload(group, "changed")
        self.update_expiry()

    def reload_all(self, why: str = "SIGHUP") -> None:
        self.log.info("{why}: reloading certificates", why=why)
        for group in self.watched:
            group.pending = None
            self._reload(group, why)
        self.update_expiry()

    def _reload(self, group: _Watched, why: str) -> None:
        sources = group.sources
        first = group.users[0].get()
        try:
            material = sources.load(self._now())
            built = []
            for user in group.users:
                settings = sources.apply(material, user.get())
                built.append((user, settings))
            for user, settings in built:
                user.set(settings)  # builds the SSL context: OpenSSL may still refuse
        except Exception as e:
            # Remember the signature of the bad files: one line, until they change again.
            group.signature = _signature(group.files)
            text = str(e) if isinstance(e, pki.PKIError) else f"{sources.describe()}: {e}"
            self.log.error(
                "certificate reload refused ({why}): {problem}; still using serial {serial} "
                "(for {users})", why=why, problem=text, serial=_serial(first.certificate),
                users=", ".join(u.label for u in group.users))
            return
        group.files = material.files or group.files
        group.signature = _signature(group.files)
        new = group.users[0].get()
        self.log.info(
            "certificates reloaded ({why}) from {files}: serial {serial} (was {old}), "
            "expires {expires}, trust bundle of {cas} CA(s) (for {users})",
            why=why, files=sources.describe(), serial=_serial(new.certificate),
            old=_serial(first.certificate), expires=pki.format_time(
                pki.not_after(new.certificate)),
            cas=len(new.ca_certificates), users=", ".join(u.label for u in group.users))

    # -- expiry --------------------------------------------------------------------------------

    def _now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.timezone.utc)

    def update_expiry(self) -> None:
        """
        ``server.days_until_first_cert_expiring`` over every context (certificates and CAs, as
        Envoy), one ``...ssl.certificate.<name>.expiration_unix_time_seconds`` per context,
        and a warning (once per certificate) when one expires within ``warning_days``.
        """
        now = self._now()
        first: Optional[float] = None
        for group in self.watched:
            for user in group.users:
                settings = user.get()
                leaf_expiry = pki.not_after(settings.certificate)
                STATS.gauge(f"{user.stat_prefix}.expiration_unix_time_seconds").set(
                    int(leaf_expiry.timestamp()))
                for cert, kind in [(settings.certificate, "certificate"),
                                   *((c, "certificate chain") for c in settings.chain),
                                   *((c, "CA certificate") for c in settings.ca_certificates)]:
                    days = (pki.not_after(cert) - now).total_seconds() / 86400
                    first = days if first is None else min(first, days)
                    key = (cert.serial_number, kind)
                    if days < self.warning_days and key not in self._warned:
                        self._warned.add(key)
                        self.log.warn(
                            "{kind} serial {serial} ({subject}) of {user} expires in {days:.1f} "
                            "days, on {expires} (warning at {threshold:g} days)",
                            kind=kind, serial=_serial(cert), subject=pki._describe(cert),
                            user=user.label, days=days,
                            expires=pki.format_time(pki.not_after(cert)),
                            threshold=self.warning_days)
        if first is not None:
            STATS.gauge(DAYS_UNTIL_FIRST_CERT_EXPIRING).set(max(0, int(first)))


def _cert_name(sources: Any, index: int) -> str:
    name = "default"
    if isinstance(sources, CertificateSources) and sources.certificate_sds is not None:
        name = sources.certificate_sds.name
    return name if index < 0 else f"{name}_{index}"
