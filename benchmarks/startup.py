"""
Startup time of ``twistd hbone-server --config FILE``: from spawning the process to the first
accepted mutual-TLS connection (the server's HTTP/2 SETTINGS received by a client that connects
over and over until it gets them).

    python benchmarks/startup.py [--runs 10] [--source DIR]

``--source`` runs another checkout (e.g. a ``git worktree`` of an older commit) with this
interpreter: DIR goes first on PYTHONPATH.  The YAML is the one ``hbonex config render server``
writes (TLS 1.3, client certificates, HCM terminating CONNECT, ORIGINAL_DST cluster).
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup(workdir: Path) -> tuple[Path, ssl.SSLContext]:
    sys.path.insert(0, str(REPO))
    from hbonex.tls import pki

    root = workdir / "pki"
    pki.init_ca(root, "cluster.local")
    pki.issue(root, "server", spiffe="spiffe://cluster.local/ns/default/sa/server",
              ip=["127.0.0.1"])
    pki.issue(root, "client", spiffe="spiffe://cluster.local/ns/default/sa/client")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(root / pki.CA_CERT)
    context.load_cert_chain(root / "client" / pki.LEAF_CERT, root / "client" / pki.LEAF_KEY)
    context.set_alpn_protocols(["h2"])
    return root, context


def render(root: Path, port: int, workdir: Path) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "hbonex", "config", "render", "server", "--pki",
         str(root / "server"), "--ca", str(root / "ca.pem"), "--listen", f"127.0.0.1:{port}"],
        check=True, capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    path = workdir / f"server-{port}.yaml"
    path.write_text(out.stdout)
    return path


def first_settings(port: int, context: ssl.SSLContext, deadline: float,
                   proc: subprocess.Popen[bytes]) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                with context.wrap_socket(raw) as tls:
                    tls.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                    head = tls.recv(9)
                    if len(head) >= 4 and head[3] == 0x4:  # a SETTINGS frame
                        return True
        except (ConnectionRefusedError, ConnectionResetError, ssl.SSLError, OSError):
            pass
        time.sleep(0.002)  # polling a port that is not open yet; not synchronisation
    return False


def once(source: Path, config: Path, port: int, context: ssl.SSLContext) -> float:
    env = {**os.environ, "PYTHONPATH": str(source), "PYTHONDONTWRITEBYTECODE": "0"}
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "--logfile=/dev/null", "hbone-server",
            "--config", str(config)]
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=config.parent, stderr=subprocess.PIPE)
    try:
        if not first_settings(port, context, started + 30, proc):
            error = proc.stderr.read().decode() if proc.poll() is not None else ""  # type: ignore[union-attr]
            raise SystemExit(f"{source}: no connection accepted within 30 s {error}")
        return time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--source", type=Path, default=REPO)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        root, context = setup(workdir)
        port = free_port()
        config = render(root, port, workdir)
        once(args.source, config, port, context)  # warm: .pyc files, plugin cache
        times = [once(args.source, config, port, context) for _ in range(args.runs)]
    ms = sorted(t * 1000 for t in times)
    print(f"{args.source}: start -> first accepted TLS connection over {args.runs} runs: "
          f"median {statistics.median(ms):.0f} ms, min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms")


if __name__ == "__main__":
    main()
