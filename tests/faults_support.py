"""
Helpers for the half-close, truncation, early-data and fault tests (tests/test_e2e_halfclose.py,
tests/test_e2e_faults.py): Envoy-YAML HTTP/1.1 tunnel pairs, an echo target that records how
each connection ended, a raw HTTP/1.1 CONNECT server that records what arrived before its 200,
and readers of a process's memory, file descriptors and socket queues (from /proc).
"""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet import error as ierror
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
INTERNAL_LISTENER_EXTENSION = """\
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
"""


# --- Envoy YAML: plain-text HTTP/1.1 CONNECT --------------------------------------------------


def _address(port: int | None, internal: str | None) -> str:
    if internal is not None:
        return f"envoy_internal_address: {{server_listener_name: {internal}}}"
    return f"socket_address: {{address: 127.0.0.1, port_value: {port}}}"


def h1_tunnel_client_listener(name: str, port: int, target: str, cluster: str) -> str:
    """A listener whose tcp_proxy tunnels each connection (CONNECT ``target``) to ``cluster``."""
    return textwrap.dedent(f"""\
        - name: {name}
          address:
            socket_address: {{address: 127.0.0.1, port_value: {port}}}
          filter_chains:
          - filters:
            - name: envoy.filters.network.tcp_proxy
              typed_config:
                "@type": {TCP_PROXY_TYPE}
                stat_prefix: {name}
                cluster: {cluster}
                tunneling_config:
                  hostname: {target}
        """)


def h1_connect_terminator(name: str, backend: str, port: int | None = None) -> str:
    """A listener (TCP on ``port``, else internal) whose HCM terminates CONNECT to ``backend``."""
    where = (
        f"  address:\n    socket_address: {{address: 127.0.0.1, port_value: {port}}}\n"
        if port is not None else "  internal_listener: {}\n"
    )
    return f"- name: {name}\n" + where + textwrap.indent(textwrap.dedent(f"""\
          filter_chains:
          - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": {HCM_TYPE}
                stat_prefix: {name}
                codec_type: AUTO
                route_config:
                  virtual_hosts:
                  - name: all
                    domains: ["*"]
                    routes:
                    - match: {{connect_matcher: {{}}}}
                      route:
                        cluster: {backend}
                        upgrade_configs:
                        - upgrade_type: CONNECT
                          connect_config: {{}}
                http_filters:
                - name: envoy.filters.http.router
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
                upgrade_configs:
                - upgrade_type: CONNECT
        """), "  ")


def plain_cluster(name: str, port: int | None = None, internal: str | None = None) -> str:
    """A cluster without HTTP/2 options (so tunnels over it are HTTP/1.1 CONNECT)."""
    return textwrap.dedent(f"""\
        - name: {name}
          connect_timeout: 2s
          load_assignment:
            cluster_name: {name}
            endpoints:
            - lb_endpoints:
              - endpoint:
                  address:
                    {_address(port, internal)}
        """)


def bootstrap(listeners: list[str], clusters: list[str], internal: bool = False) -> str:
    def block(items: list[str]) -> str:
        return "".join(textwrap.indent(item, "  ") for item in items)

    return (
        (INTERNAL_LISTENER_EXTENSION if internal else "")
        + "static_resources:\n  listeners:\n" + block(listeners)
        + "  clusters:\n" + block(clusters)
    )


# --- targets ----------------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class RecordingEcho(protocol.Protocol):
    """
    Echoes; after EOF half-closes once its echo is flushed.  Records per connection the bytes
    and hash of what it read, whether it got a FIN, and how the connection ended.
    """

    factory: RecordingEchoFactory

    def connectionMade(self) -> None:
        self.count = 0
        self.hash = hashlib.sha256()
        self.fin = False
        self.reason: Failure | None = None
        self.factory.connections.append(self)
        self.transport.registerProducer(self.transport, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.hash.update(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.fin = True
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.reason = reason
        waiters, self.factory.waiters = self.factory.waiters, []
        for d in waiters:
            d.callback(self)

    @property
    def was_reset(self) -> bool:
        return self.reason is not None and self.reason.check(ierror.ConnectionDone) is None


class RecordingEchoFactory(protocol.Factory):
    noisy = False
    protocol = RecordingEcho

    def __init__(self) -> None:
        self.connections: list[RecordingEcho] = []
        self.waiters: list[defer.Deferred[RecordingEcho]] = []
        self.port = 0

    def wait_ended(self) -> defer.Deferred[RecordingEcho]:
        """Fire with the first connection once it has ended."""
        for c in self.connections:
            if c.reason is not None:
                return defer.succeed(c)
        d: defer.Deferred[RecordingEcho] = defer.Deferred()
        self.waiters.append(d)
        return d


async def start_recording_echo(test: Any) -> RecordingEchoFactory:
    factory = RecordingEchoFactory()
    port = await endpoints.TCP4ServerEndpoint(
        reactor, 0, backlog=1024, interface="127.0.0.1"
    ).listen(factory)
    factory.port = port.getHost().port

    def cleanup() -> defer.Deferred[Any]:
        for c in factory.connections:
            if c.reason is None:
                c.transport.abortConnection()  # type: ignore[union-attr]
        return defer.maybeDeferred(port.stopListening)

    test.addCleanup(cleanup)
    return factory


# --- a raw HTTP/1.1 CONNECT server (plain text) -----------------------------------------------


class HoldingConnectServer(protocol.Protocol):
    """
    Reads a CONNECT head and answers only when ``answer()`` is called; records every byte
    that arrived after the head, and whether any did before the answer.  Echoes after it.
    """

    factory: HoldingConnectFactory

    def connectionMade(self) -> None:
        self.head = b""
        self.head_done = False
        self.answered = False
        self.before_answer = b""
        self.after = b""
        self.factory.connections.append(self)
        self.factory.changed()

    def dataReceived(self, data: bytes) -> None:
        if not self.head_done:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            self.head, _, data = self.head.partition(b"\r\n\r\n")
            self.head_done = True
        if data:
            if self.answered:
                self.after += data
                self.transport.write(data)  # type: ignore[union-attr]
            else:
                self.before_answer += data
        self.factory.changed()

    def answer(self) -> None:
        self.answered = True
        self.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.changed()


class HoldingConnectFactory(protocol.Factory):
    noisy = False
    protocol = HoldingConnectServer

    def __init__(self) -> None:
        self.connections: list[HoldingConnectServer] = []
        self.on_change: Callable[[], None] | None = None
        self.port = 0

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


# --- /proc readers -----------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def unsent_bytes(local_port: int, remote_port: int) -> int:
    """
    Bytes a loopback socket 127.0.0.1:``local_port`` -> ``remote_port`` has not had
    acknowledged yet (tx_queue), -1 if there is no such socket.
    """
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (int(local.rsplit(":", 1)[1], 16) == local_port
                and int(remote.rsplit(":", 1)[1], 16) == remote_port):
            return int(fields[4].split(":")[0], 16)
    return -1


# --- twistd with a YAML file ------------------------------------------------------------------


def start_yaml_twistd(
    test: Any, plugin: str, name: str, yaml_text: str, listeners: int = 1,
    env: dict[str, str] | None = None,
) -> defer.Deferred[Any]:
    """
    ``twistd -n <plugin> --config FILE`` for ``yaml_text`` (written to a temp file);
    ``env``: extra environment variables (a PYTHONPATH with third-party dropins...).
    """
    from tests.support import start_twistd

    path = Path(test.mktemp()).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml_text)
    return start_twistd(test, plugin, ["--config", str(path)], listeners=listeners, name=name,
                        env=env or {})
