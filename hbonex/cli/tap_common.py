"""
Options shared by ``twistd hbone-client`` and ``twistd hbone-server``.
"""

from __future__ import annotations

import getopt
import os
import sys
from typing import Any, Sequence

from twisted.python import usage

from hbonex.errors import ConfigError
from hbonex.h2.settings import H2Settings
from hbonex.observability import process_log
from hbonex.tls import pki


def endpoint_string(text: str, option: str) -> str:
    """
    ``host:port`` / ``[v6]:port`` / ``port`` to a Twisted server endpoint string; endpoint
    strings (``tcp:...``, ``unix:...``) pass through.
    """
    text = text.strip()
    if text.split(":", 1)[0] in ("tcp", "tcp6", "unix", "ssl", "systemd"):
        return text
    if text.isdigit():
        return f"tcp:{text}:interface=127.0.0.1"
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return f"tcp6:{port}:interface={host.replace(':', chr(92) + ':')}"
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise usage.UsageError(f"{option}: {text!r} is neither host:port nor an endpoint string")
    return f"tcp:{port}:interface={host}"


class TLSOptions(usage.Options):
    """
    Mixin: certificates and HTTP/2 settings, and what both plugins do with their flags under
    twistd (one error line, no pidfile with --nodaemon, --config alone).
    """

    #: The twistd plugin name, for error lines.
    tapname = ""
    #: Flags that still apply next to --config (every other one is refused there).
    with_config: tuple[str, ...] = ()
    #: False when ``hbonex config render`` parses the flags (it refuses --config).
    accepts_config = True

    optParameters = [
        ["pki", None, None, "Identity directory DIR/NAME (cert.pem, key.pem; CA DIR/ca.pem). "
         "Default: a dev PKI created in the state directory."],
        ["ca", None, None, "Trust bundle (PEM) to verify the peer with (default DIR/ca.pem)."],
        ["trust-domain", None, "cluster.local", "SPIFFE trust domain."],
        ["tls-min", None, "1.3", "Minimum TLS version: 1.3 or 1.2."],
        ["state-dir", None, None, f"Where the dev PKI is kept: {pki.DEV_PKI_LOCATION}."],
        ["stream-window", None, 4 * 1024 * 1024, "HTTP/2 initial stream window.", int],
        ["connection-window", None, 16 * 1024 * 1024, "HTTP/2 connection window.", int],
        ["max-frame-size", None, 1024 * 1024, "HTTP/2 SETTINGS_MAX_FRAME_SIZE.", int],
        ["keepalive-interval", None, 10.0, "HTTP/2 PING interval in seconds (0: off).", float],
        ["keepalive-timeout", None, 20.0, "Close when a PING is unanswered this long.", float],
        ["connect-timeout", None, 5.0, "Upstream connect timeout in seconds.", float],
        ["admin", None, None, "Serve Envoy's admin endpoint (/ready, /stats, "
         "/stats/prometheus...) on ADDR, host:port or an endpoint string (off by default)."],
        ["max-connections", None, 0, "Refuse new downstream connections while this many are "
         "active, across all listeners (Envoy's overload manager downstream_connections; "
         "0: no limit).", int],
        ["cert-poll", None, 1.0, "How often the certificate, key and CA files (and "
         "SDS files) are checked for changes, in seconds; changed files are used for new "
         "handshakes (also on SIGHUP). 0: only on SIGHUP.", float],
        ["cert-warn-days", None, 7.0, "Log a warning when a certificate in use "
         "expires within this many days.", float],
        ["log-format", None, "text", "The process log's format: text (twistd's) or json "
         "(one JSON object per line: time, level, namespace, message, the event's fields)."],
        ["config", "c", None, "Envoy v3 bootstrap YAML file, instead of the other options."],
    ]

    def __init__(self) -> None:
        super().__init__()
        # textwrap keeps a docstring's indentation as runs of spaces inside --help's lines.
        for name, doc in self.docs.items():
            if doc:
                self.docs[name] = " ".join(doc.split())
        also = " ".join(f"--{f}" for f in self.with_config)
        self.docs["config"] = "Envoy v3 bootstrap YAML file, instead of the other options " + (
            f"(only {also} applies next to it)." if also else "(none may be given with it)."
        )
        #: The flags given on the command line (long names), whatever their values.
        self.given: set[str] = set()
        #: The plugin's own arguments, as given (a worker process runs them again).
        self.argv: list[str] = []
        #: twistd's --reactor, if given (the workers run on the same reactor).
        self.reactor_argv: list[str] = []
        self["workers"] = 1

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        self.argv = argv
        if self.parent is not None:
            # Under twistd, before anything imports twisted.internet.reactor: hbonex's epoll
            # reactor unless --reactor chose one (docs/benchmarks.md "Reactors").
            from hbonex.epollreactor import install_default

            install_default()
            # twistd's own --reactor (a global option, parsed before ours): the workers
            # must be given it too.
            chosen = self.parent.get("reactor")
            self.reactor_argv = [f"--reactor={chosen}"] if chosen else []
        self.given = self._given_flags(argv)
        try:
            super().parseOptions(argv)
        except usage.UsageError as e:
            if self.parent is None:
                raise  # hbonex config render (or a test) reports it its own way
            # Under twistd: one line, as for a bad --config; twistd itself would print its
            # whole usage text above the one line that matters.
            raise SystemExit(
                f"twistd: error: {self.tapname}: {e} (see twistd {self.tapname} --help)"
            )
        self._no_pidfile_in_foreground()

    def _given_flags(self, argv: list[str]) -> set[str]:
        try:
            opts, _ = getopt.getopt(argv, self.shortOpt, self.longOpt)
        except getopt.GetoptError:
            return set()  # parseOptions reports it
        given = set()
        for opt, _ in opts:
            name = opt.lstrip("-")
            given.add(self.synonyms.get(name) or self.synonyms.get(name.replace("-", "_"), name))
        return given

    def _no_pidfile_in_foreground(self) -> None:
        """
        ``twistd -n`` (foreground) would still write ./twistd.pid, so a second plugin in the
        same directory refuses to start: with -n, twistd's default pidfile becomes none.  An
        explicit --pidfile other than the default is kept.
        """
        parent = self.parent
        if parent is None or not parent.get("nodaemon"):
            return
        defaults = getattr(parent, "defaults", {})
        if "pidfile" in defaults and parent.get("pidfile") == defaults["pidfile"]:
            parent["pidfile"] = ""

    def opt_workers(self, value: str) -> None:
        """
        Worker processes sharing the listeners, under one supervisor (0: one per core;
        default 1: this process alone, no supervisor). YAML: runtime key hbonex.workers.
        """
        from hbonex.workers import resolve_workers

        try:
            resolve_workers(value)
        except ValueError as e:
            raise usage.UsageError(f"--workers: {e}")
        self["workers"] = int(value)

    def workers(self, bootstrap: Any) -> int:
        """How many workers: --workers over the YAML's ``hbonex.workers``, 0 one per core."""
        from hbonex.workers import resolve_workers

        given = "workers" in self.given or getattr(bootstrap, "workers", None) is None
        return resolve_workers(self["workers"] if given else bootstrap.workers)

    def twistd_command(self) -> list[str]:
        """A worker's argv (after the interpreter): twistd in the foreground, same plugin."""
        return ["-c", "from twisted.scripts.twistd import run; run()", "--nodaemon",
                "--pidfile=", "--logfile=-", *self.reactor_argv, self.tapname, *self.argv]

    def proxy_service(self, bootstrap: Any, **kwargs: Any) -> Any:
        """
        The service that runs ``bootstrap``: this process alone (one worker), a supervisor
        of N workers, or one of those workers (started by a supervisor).
        """
        from hbonex.bootstrap import ProxyService
        from hbonex.workers.worker import WorkerService, worker_spec

        spec = worker_spec()
        if spec is not None:
            try:
                os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor, which forwards it
            except OSError:
                pass
            return self.logging(WorkerService(bootstrap, spec, **kwargs))
        count = self.workers(bootstrap)
        if count > 1:
            from hbonex.workers.supervisor import SupervisorService

            return self.logging(
                SupervisorService(bootstrap, count, self.twistd_command(), **kwargs))
        return self.logging(ProxyService(bootstrap, **kwargs))

    def opt_log_format(self, value: str) -> None:
        if value not in process_log.FORMATS:
            raise usage.UsageError(
                f"--log-format must be one of {', '.join(process_log.FORMATS)}, not {value!r}")
        self["log-format"] = value

    def logging(self, proxy: Any) -> Any:
        """The process log: --log-format, written where twistd would write its own."""
        proxy.log_format = self["log-format"]
        proxy.twistd_options = self.parent
        return proxy

    def apply_limits(self, bootstrap: Any) -> None:
        """
        --max-connections: the process-wide downstream limit (over the YAML's, if given).
        """
        if "max-connections" in self.given or not self["config"]:
            bootstrap.runtime.downstream_limit.max_active = self["max-connections"]
        if self["admin"]:
            bootstrap.admin = {"endpoint": endpoint_string(self["admin"], "--admin")}
        if self["cert-poll"] < 0:
            raise SystemExit("twistd: error: --cert-poll must be at least 0")
        bootstrap.certificate_poll_interval = self["cert-poll"]
        bootstrap.certificate_warning_days = self["cert-warn-days"]

    def refuse_flags_with_config(self) -> None:
        """
        The YAML describes every listener, cluster and certificate: a flag next to --config
        would be silently ignored, so it is an error (but for ``with_config``).
        """
        ignored = sorted(self.given - {"config", *self.with_config})
        if ignored:
            also = " ".join(f"--{f}" for f in self.with_config)
            only = f"; only {also} may be given next to it" if also else ""
            raise usage.UsageError(
                f"{', '.join('--' + f for f in ignored)}: cannot be given with --config (the "
                f"YAML describes everything{only})"
            )

    def load_material(self, identity: str) -> None:
        """
        Load the certificates while parsing options, so a bad file is a usage error naming
        the file and the problem, not a traceback.
        """
        if self["config"]:
            self.refuse_flags_with_config()
            self.load_config()
            return
        try:
            self.material = self.tls_material(identity)
        except ConfigError as e:
            raise usage.UsageError(str(e))

    def load_config(self) -> None:
        """
        Load and check --config while parsing options, so a bad file is one clean error
        (path, line, problem) and a non-zero exit, not a traceback from makeService.  Not a
        UsageError: twistd would print its whole usage text above the one line that matters.
        """
        from twisted.internet import reactor

        from hbonex.config import load_bootstrap

        try:
            self.bootstrap = load_bootstrap(self["config"], reactor)
        except ConfigError as e:
            raise SystemExit(f"twistd: error: --config {self['config']}: {e}")

    def config_bootstrap(self, reactor: Any) -> Any:
        """
        The Bootstrap --config describes (loaded by postOptions, or now).
        """
        from hbonex.config import load_bootstrap

        cached = getattr(self, "bootstrap", None)
        return cached if cached is not None else load_bootstrap(self["config"], reactor)

    def tls_material(self, identity: str) -> Any:
        """
        Load --pki/--ca, or the dev PKI's ``identity``.
        """
        cached = getattr(self, "material", None)
        if cached is not None:
            return cached
        try:
            if self["pki"]:
                return pki.load_pki_dir(self["pki"], self["ca"])
            dev = pki.ensure_dev_pki(self["state-dir"], self["trust-domain"])
            return pki.load_pki_dir(dev / identity, self["ca"])
        except pki.PKIError as e:
            raise ConfigError("--pki", str(e))

    def h2_settings(self, max_concurrent_streams: int = 200) -> H2Settings:
        try:
            return H2Settings(
                initial_stream_window_size=self["stream-window"],
                initial_connection_window_size=self["connection-window"],
                max_frame_size=self["max-frame-size"],
                max_concurrent_streams=max_concurrent_streams,
                keepalive_interval=self["keepalive-interval"],
                keepalive_timeout=self["keepalive-timeout"],
            )
        except ValueError as e:
            raise usage.UsageError(str(e))

    def tls_min(self) -> str:
        version = self["tls-min"]
        if version not in ("1.2", "1.3"):
            raise usage.UsageError("--tls-min must be 1.2 or 1.3")
        return "TLSv1_2" if version == "1.2" else "TLSv1_3"


def parse_header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise usage.UsageError(f"--header {text!r}: expected NAME=VALUE")
    return key.strip().lower(), value


def optional(value: str | None) -> str | None:
    return value or None
