"""
The running configuration (Envoy's bootstrap): listeners and clusters over one runtime, and the
Twisted service that starts and stops them.  The CLI flags and the YAML loader both build a
``Bootstrap``; nothing below this module knows where it came from.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from hbonex.errors import ConfigError
from hbonex.network.listener import Listener
from hbonex.upstream.cluster import Cluster, Runtime


class Bootstrap:
    def __init__(self, reactor: Any) -> None:
        self.runtime = Runtime(reactor)
        self.listeners: list[Listener] = []
        #: YAML path (or CLI option) each listener came from, for error messages.
        self.listener_paths: dict[str, str] = {}
        self.admin: dict[str, Any] | None = None
        #: The Envoy Bootstrap message this was built from (None when built from flags).
        self.message: Any = None
        #: How often certificate files are polled (seconds), and how many days before its
        #: expiry a certificate is warned about (hbonex.tls.certwatch).
        self.certificate_poll_interval = 1.0
        self.certificate_warning_days = 7.0
        #: Worker processes from YAML (runtime key ``hbonex.workers``; None: not set there).
        self.workers: int | None = None

    @property
    def reactor(self) -> Any:
        return self.runtime.reactor

    @property
    def clusters(self) -> dict[str, Cluster]:
        return self.runtime.clusters

    def add_cluster(self, cluster: Cluster) -> Cluster:
        self.runtime.clusters[cluster.name] = cluster
        return cluster

    def add_listener(self, listener: Listener, path: str = "") -> Listener:
        self.listeners.append(listener)
        self.listener_paths[listener.name] = path or f"listener {listener.name}"
        return listener


class ProxyService(service.MultiService):
    """
    Starts every listener of a Bootstrap; on stop, stops listening and sends GOAWAY on every
    pooled connection so open tunnels finish on their own.
    """

    log = Logger()

    def __init__(
        self, bootstrap: Bootstrap, drain_timeout: float = 5.0, source: str = ""
    ) -> None:
        super().__init__()
        self.bootstrap = bootstrap
        self.drain_timeout = drain_timeout
        #: Where the configuration came from (``--config FILE``), for startup errors.
        self.source = source
        self.ports: dict[str, Any] = {}
        #: Envoy's server states, as the admin endpoint reports them.
        self.state = "PRE_INITIALIZING"
        #: The admin endpoint (an endpoint string), from YAML ``admin.address`` or --admin.
        self.admin_endpoint = admin_endpoint(bootstrap.admin)
        self.admin_port: Any = None
        #: --log-format (text or json) and twistd's own options (where its log goes); set by
        #: the taps.  ``log_control`` holds the per-namespace levels once there are any.
        self.log_format = "text"
        self.twistd_options: Any = None
        self.log_control: Any = None
        #: Where the process log goes (set when joining twistd's application).
        self.log_out: Any = None
        #: This process's index among the workers of a supervisor (``--workers``), or None.
        self.worker: int | None = None
        from hbonex.tls.certwatch import CertificateWatcher

        #: Reloads changed certificate files (and on SIGHUP); expiry gauges.
        self.certificates = CertificateWatcher(
            bootstrap, bootstrap.certificate_poll_interval, bootstrap.certificate_warning_days)
        self.certificates.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        b = self.bootstrap
        for listener in b.listeners:
            if not listener.internal and not listener.ignore_global_conn_limit:
                # An internal listener's connections are our own second hop, counted already.
                listener.downstream_limit = b.runtime.downstream_limit
            if listener.internal:
                b.runtime.internal_listeners.register(listener.name, listener)
        for listener in b.listeners:
            if not listener.internal:
                self._listen(listener)
        if self.admin_endpoint:
            self._start_admin()
        self.state = "LIVE"

    def _listen(self, listener: Listener) -> None:
        """Open ``listener``'s kernel socket (one clean error line when it cannot)."""
        b = self.bootstrap
        d = self._open_port(listener)
        failures: list[Any] = []
        d.addCallbacks(lambda port, n=listener.name: self.ports.__setitem__(n, port),
                       failures.append)
        if failures:
            self._stop_ports()
            error = ConfigError(
                b.listener_paths[listener.name],
                f"cannot listen on {listener.endpoint}: "
                f"{failures[0].getErrorMessage()} (is another process using it?)",
            )
            # twistd would print any other exception from startService as a traceback:
            # one line and exit status 1, like a bad --config.
            prefix = f"{self.source}: " if self.source else ""
            raise SystemExit(f"twistd: error: {prefix}{error}")
        self._announce(listener)

    def _open_port(self, listener: Listener) -> defer.Deferred[Any]:
        assert listener.endpoint is not None
        endpoint = serverFromString(self.bootstrap.reactor, _with_backlog(listener))
        return endpoint.listen(listener.factory)  # type: ignore[no-any-return]

    def _announce(self, listener: Listener) -> None:
        # Tests, benchmarks and `hbonex demo` read the port from this line.
        address = self.ports[listener.name].getHost()
        self.log.info(
            "listener {name} listening on {host}:{port} ({endpoint})",
            name=listener.name, host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"), endpoint=listener.endpoint,
        )

    def _start_admin(self) -> None:
        from hbonex.observability.admin import Admin

        endpoint = serverFromString(self.bootstrap.reactor, self.admin_endpoint)
        failures: list[Any] = []
        d = endpoint.listen(Admin(self).site)
        d.addCallbacks(lambda port: setattr(self, "admin_port", port), failures.append)
        if failures:
            self._stop_ports()
            raise SystemExit(f"twistd: error: cannot listen on the admin endpoint "
                             f"{self.admin_endpoint}: {failures[0].getErrorMessage()}")
        address = self.admin_port.getHost()
        self.log.info("admin listening on {host}:{port} ({endpoint})",
                      host=getattr(address, "host", "?"), port=getattr(address, "port", "?"),
                      endpoint=self.admin_endpoint)

    def drain(self, graceful: bool = True) -> None:
        """
        Stop accepting (the admin's /drain_listeners); with ``graceful``, GOAWAY every
        HTTP/2 connection too so its tunnels finish and it closes.
        """
        self.state = "DRAINING"
        self._stop_ports()
        if graceful:
            for conn in list(self.bootstrap.runtime.server_connections):
                conn.send_goaway()

    def setServiceParent(self, parent: Any) -> None:
        # twistd asks the application for its ILogObserver after makeService: offer ours
        # (JSON lines, or twistd's text lines written for less; filtered by the run-time
        # levels).
        from twisted.logger import ILogObserver

        from hbonex.observability import process_log

        if hasattr(parent, "setComponent"):
            self.log_control = process_log.LogControl()
            out = self.log_out = process_log.output_for(self.twistd_options)
            parent.setComponent(ILogObserver, process_log.make_observer(
                self.log_format, out, self.log_control, self.worker))
        super().setServiceParent(parent)

    def set_log_level(self, level: Any, namespace: str = "") -> None:
        """
        The admin's /logging: events below ``level`` in ``namespace`` (and its children; ""
        is every namespace) are dropped from then on.
        """
        from twisted.logger import FilteringLogObserver, LogPublisher, globalLogPublisher

        from hbonex.observability import process_log

        if self.log_control is None:
            # Text logs: put a filter in front of the observers twistd installed.
            self.log_control = process_log.LogControl()
            observers = list(getattr(globalLogPublisher, "_observers", []))
            for observer in observers:
                globalLogPublisher.removeObserver(observer)
            globalLogPublisher.addObserver(
                FilteringLogObserver(LogPublisher(*observers), [self.log_control.predicate])
            )
        self.log_control.set_level(level, namespace)
        self.log.info("log level set to {name} for {namespace}", name=level.name,
                      namespace=namespace or "every namespace")

    def _stop_ports(self) -> list[defer.Deferred[Any]]:
        ports, self.ports = self.ports, {}
        return [defer.maybeDeferred(p.stopListening) for p in ports.values()]

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        self.state = "DRAINING"
        waits = self._stop_ports()
        for listener in self.bootstrap.listeners:
            if listener.internal:
                self.bootstrap.runtime.internal_listeners.unregister(listener.name)
        for cluster in self.bootstrap.clusters.values():
            cluster.close()
        drained = self._drain()
        drained.addCallback(self._drained)
        if self.admin_port is not None:
            # The admin answers /ready (503 DRAINING) until the drain is over.
            admin, self.admin_port = self.admin_port, None
            drained.addBoth(lambda _: admin.stopListening())
        waits.append(drained)
        return defer.DeferredList(waits)

    def _drained(self, _: Any) -> None:
        """
        A SIGTERM that drained is a normal end: exit 0, as Envoy does (twistd would re-raise
        the signal to exit with it).
        """
        reactor = self.bootstrap.reactor
        if getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
            reactor._exitSignal = None

    def _drain(self) -> defer.Deferred[None]:
        """
        GOAWAY every server connection; give open tunnels ``drain_timeout`` to finish.
        """
        connections = self.bootstrap.runtime.server_connections
        for conn in list(connections):
            conn.send_goaway()
        reactor = self.bootstrap.reactor
        deadline = reactor.seconds() + self.drain_timeout
        done: defer.Deferred[None] = defer.Deferred()
        aborted = False

        def check() -> None:
            nonlocal aborted
            if not connections or reactor.seconds() >= deadline + 1.0:
                done.callback(None)
                return
            if reactor.seconds() >= deadline and not aborted:
                aborted = True
                for conn in list(connections):
                    conn.abort("closed at the drain deadline")
            # After the aborts too: wait (briefly) until the connections and their tunnels
            # are gone, so their log lines are written before the process exits.
            reactor.callLater(0.05, check)

        check()
        return done

    def port_of(self, listener_name: str) -> int:
        return self.ports[listener_name].getHost().port  # type: ignore[no-any-return]


def admin_endpoint(admin: dict[str, Any] | None) -> str:
    """
    YAML ``admin.address`` as a Twisted endpoint string ('' when there is no admin).
    """
    if not admin:
        return ""
    if "endpoint" in admin:  # --admin
        return str(admin["endpoint"])
    address = admin.get("address") or {}
    pipe = address.get("pipe")
    if pipe:
        return f"unix:{pipe.get('path', '')}"
    socket_address = address.get("socket_address") or {}
    host = socket_address.get("address", "127.0.0.1")
    port = socket_address.get("port_value", 0)
    kind = "tcp6" if ":" in host else "tcp"
    return f"{kind}:{port}:interface={host.replace(':', chr(92) + ':')}"


def _with_backlog(listener: Listener) -> str:
    """
    The listener's endpoint string with its accept backlog: Twisted's default of 50 drops
    connections under a burst of new tunnels (Envoy's tcp_backlog_size).
    """
    description = listener.endpoint or ""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={listener.backlog}"
    return description
