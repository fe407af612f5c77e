"""
HTTP through the connection manager: small GETs through hbonex's HCM, directly, and through Node.

    .venv/bin/python benchmarks/hcm.py [--quick] [--repeats 3] [--seconds 5] [--hbonex DIR]
                                       [--profile DIR]

(Named hcm.py, not http.py: a benchmarks/http.py would shadow the standard library's ``http``
package for every script run from this directory, e.g. soak.py's ``import http.client``.)

Paths, each measured at 1 and 32 concurrent keep-alive connections, HTTP/1.1 and HTTP/2
downstream (cleartext, prior knowledge), one request in flight per connection:

* direct: load generator -> backend (HTTP/1.1 port, or its HTTP/2 port for h2);
* node:   load generator -> tests/node/http_proxy.mjs (node:http / node:http2 downstream,
  keep-alive http.Agent upstream) -> backend over HTTP/1.1;
* hcm:    load generator -> `twistd hbone-server --config` whose HCM (codec AUTO, router only)
  routes to the backend over pooled HTTP/1.1 (a terminating HCM);
* chain:  the article's client chain from tests/configs: load generator -> `twistd hbone-client
  --config seed-encapsulate-http-in-h2-connect.yaml` (HCM -> internal listener -> tcp_proxy
  over HTTP/2 CONNECT) -> `twistd hbone-server --config seed-terminate-h2-connect.yaml`
  -> backend.

The backend (tests/node/http_backend.mjs: a fixed 64-byte body) and the load generator
(tests/node/http_load.mjs: checks status and body length of every response) are Node processes
independent of hbonex. Everything is on 127.0.0.1, every run is bounded in time, and every child
runs in its own process group and is killed on exit, error, Ctrl-C or SIGTERM.

With ``--profile DIR`` it instead runs the hcm path under cProfile (twistd --profiler=cprofile
--savestats), drives 32 connections of HTTP/1.1 and then of HTTP/2 at it, and prints the top
costs per request.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from faults import (  # noqa: E402
    LISTENER_RE,
    READY_RE,
    REPO,
    CheckFailed,
    Proc,
    install_cleanup,
    raise_fd_limit,
)
from run import machine, source_info  # noqa: E402

NODE = REPO / "tests" / "node"
CONFIGS = REPO / "tests" / "configs"
PATHS = ("direct", "node", "hcm", "chain", "mutation", "rbac", "waypoint")
#: The terminating HCM with the waypoint's filters before the router (issue 9's chain, and
#: each filter alone, for its cost per request).
MUTATION = """\
          - name: envoy.filters.http.header_mutation
            typed_config:
              "@type": {mutation_type}
              mutations:
                request_mutations:
                - append:
                    header: {key: x-waypoint-authority, value: "%REQ(:AUTHORITY)%"}
                    append_action: OVERWRITE_IF_EXISTS_OR_ADD
                response_mutations:
                - append: {header: {key: x-waypoint, value: hbonex}}
"""
RBAC = """\
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  loopback-gets:
                    permissions:
                    - header: {name: ":method", string_match: {exact: GET}}
                    principals:
                    - remote_ip: {address_prefix: 127.0.0.0, prefix_len: 8}
"""
MUTATION_TYPE = ("type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3."
                 "HeaderMutation")
FILTERS = {"hcm": "", "mutation": MUTATION, "rbac": RBAC, "waypoint": MUTATION + RBAC}
MODES = (("h1", 1), ("h1", 32), ("h2", 1), ("h2", 32))
BODY = 64
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
TERMINATING = """\
static_resources:
  listeners:
  - name: http
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm_type}
          stat_prefix: ingress
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: backend}}
          http_filters:
{filters}\
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {backend}}}
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def node(workdir: Path, name: str, script: str, *args: str) -> tuple[Proc, dict[str, Any]]:
    proc = Proc(name, ["node", str(NODE / script), *args], workdir)
    return proc, json.loads(proc.wait_for(READY_RE)[0].group(0))


@dataclass
class Setup:
    workdir: Path
    source: Path
    profile: Optional[Path] = None
    seq: int = 0

    def twistd(self, name: str, plugin: str, config: Path) -> tuple[Proc, dict[str, int]]:
        self.seq += 1
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile=-"]
        if self.profile:
            argv += ["--profiler=cprofile", f"--profile={self.profile / (name + '.prof')}",
                     "--savestats"]
        env = dict(os.environ, PYTHONPATH=str(self.source), HBONEX_STATE_DIR=str(self.workdir),
                   PYTHONUNBUFFERED="1")
        proc = Proc(f"{self.seq:02d}-{name}", [*argv, plugin, "--config", str(config)],
                    self.workdir, env)
        found = proc.wait_for(LISTENER_RE)
        return proc, {m.group(1): int(m.group(2)) for m in found}


@dataclass
class Path_:
    """One way to the backend: the port per protocol and the proxy processes (for CPU)."""

    name: str
    ports: dict[str, int]
    procs: list[Proc] = field(default_factory=list)

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)


def start_paths(setup: Setup, backend: dict[str, Any], names: tuple[str, ...]) -> list[Path_]:
    paths = []
    for name in names:
        if name == "direct":
            paths.append(Path_(name, {"h1": backend["http1"], "h2": backend["h2c"]}))
        elif name == "node":
            proc, ready = node(setup.workdir, "node-proxy", "http_proxy.mjs",
                               "--upstream", f"127.0.0.1:{backend['http1']}")
            paths.append(Path_(name, {"h1": ready["http1"], "h2": ready["h2c"]}, [proc]))
        elif name in FILTERS:
            config = setup.workdir / f"{name}.yaml"
            filters = FILTERS[name].replace("{mutation_type}", MUTATION_TYPE)
            config.write_text(TERMINATING.format(hcm_type=HCM_TYPE, backend=backend["http1"],
                                                 filters=filters))
            proc, ports = setup.twistd(name, "hbone-server", config)
            paths.append(Path_(name, {"h1": ports["http"], "h2": ports["http"]}, [proc]))
        elif name == "chain":
            text = (CONFIGS / "seed-terminate-h2-connect.yaml").read_text()
            text = text.replace("port_value: 10001", "port_value: 0")
            text = text.replace("port_value: 8080", f"port_value: {backend['http1']}")
            (setup.workdir / "chain-server.yaml").write_text(text)
            server, ports = setup.twistd("chain-server", "hbone-server",
                                         setup.workdir / "chain-server.yaml")
            text = (CONFIGS / "seed-encapsulate-http-in-h2-connect.yaml").read_text()
            text = text.replace("port_value: 10000", "port_value: 0")
            text = text.replace("port_value: 10001", f"port_value: {ports['listener_0']}")
            (setup.workdir / "chain-client.yaml").write_text(text)
            client, ports = setup.twistd("chain-client", "hbone-client",
                                         setup.workdir / "chain-client.yaml")
            paths.append(Path_(name, {"h1": ports["http"], "h2": ports["http"]},
                               [client, server]))
    return paths


def load(port: int, proto: str, conns: int, seconds: float, warmup: float) -> dict[str, Any]:
    argv = ["node", str(NODE / "http_load.mjs"), "--proto", proto, "--port", str(port),
            "--conns", str(conns), "--size", str(BODY), "--warmup", str(warmup),
            "--seconds", str(seconds)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=seconds + warmup + 60)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "load generator timed out"}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
    except (IndexError, ValueError):
        return {"ok": False, "error": f"load generator exited {done.returncode}: "
                                      f"{done.stderr.strip()[-300:]}"}


def measure(path: Path_, proto: str, conns: int, seconds: float, warmup: float
            ) -> dict[str, Any]:
    """One load-generator run, with the proxies' CPU µs per request and the load average."""
    loadavg = os.getloadavg()[0]
    cpu = path.cpu()
    result = load(path.ports[proto], proto, conns, seconds, warmup)
    result["loadavg"] = loadavg
    if result.get("ok") and path.procs:
        result["cpu_us"] = (path.cpu() - cpu) * 1e6 / result["all_requests"]
    return result


def crashes(paths: list[Path_]) -> list[str]:
    return [f"{p.name}: {c}" for path in paths for p in path.procs for c in p.crashes()]


# ---------------------------------------------------------------- report

METRICS = (("rps", "req/s", 0), ("p50_us", "p50 µs", 0), ("p99_us", "p99 µs", 0),
           ("cpu_us", "proxy CPU µs/req", 0))


def median(results: list[dict[str, Any]], key: str) -> Optional[float]:
    values = [r[key] for r in results if r.get("ok") and key in r]
    return statistics.median(values) if values else None


def report(results: dict[tuple[str, int, str], list[dict[str, Any]]],
           names: tuple[str, ...]) -> str:
    head = ["downstream", "conns", "metric", *names]
    if "node" in names:
        head += [f"{n}/node" for n in names if n not in ("direct", "node")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for proto, conns in MODES:
        for key, label, digits in METRICS:
            row = [{"h1": "HTTP/1.1", "h2": "HTTP/2 (h2c)"}[proto], str(conns), label]
            for name in names:
                rs = results.get((proto, conns, name), [])
                failed = [r for r in rs if not r.get("ok")]
                v = median(rs, key)
                row.append("FAILED" if failed else "—" if v is None else f"{v:,.{digits}f}")
            if "node" in names:
                base = median(results.get((proto, conns, "node"), []), key)
                for name in names:
                    if name not in ("direct", "node"):
                        v = median(results.get((proto, conns, name), []), key)
                        row.append(f"{v / base:.2f}×" if v and base else "—")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def samples(results: dict[tuple[str, int, str], list[dict[str, Any]]]) -> str:
    out = []
    for (proto, conns, name), rs in results.items():
        cells = "; ".join(
            f"{r['rps']:,.0f} req/s {r['p50_us']:,.0f}/{r['p99_us']:,.0f} µs "
            f"(load {r['loadavg']:.1f})" if r.get("ok") else "FAILED: " + r.get("error", "?")
            for r in rs)
        out.append(f"* {proto} × {conns} {name}: {cells}")
    return "\n".join(out)


# ---------------------------------------------------------------- profile


def profile(setup: Setup, backend: dict[str, Any], seconds: float, top: int) -> int:
    """The hcm path under cProfile, one twistd per protocol; top costs per request."""
    assert setup.profile is not None
    for proto in ("h1", "h2"):
        (path,) = start_paths(setup, backend, ("hcm",))
        result = load(path.ports[proto], proto, 32, seconds, 1)
        for p in path.procs:
            p.stop()
        if not result.get("ok"):
            print(f"{proto}: FAILED {result.get('error')}")
            return 1
        prof = setup.profile / f"{setup.seq:02d}-hcm.prof"
        os.replace(setup.profile / "hcm.prof", prof)
        n = result["all_requests"]
        print(f"\n## {proto}, 32 connections, {n:,} requests under cProfile "
              f"({result['rps']:,.0f} req/s measured while profiled); {prof}\n")
        stats = pstats.Stats(str(prof))
        total = stats.total_tt  # type: ignore[attr-defined]
        print(f"total profiled time {total:.2f} s = {total * 1e6 / n:,.0f} µs per request\n")
        print("| tottime µs/req | cumtime µs/req | calls/req | function |")
        print("|---|---|---|---|")
        rows = sorted(stats.stats.items(),  # type: ignore[attr-defined]
                      key=lambda kv: kv[1][2], reverse=True)
        for (filename, line, func), (_cc, nc, tt, ct, _callers) in rows[:top]:
            where = filename.replace(str(setup.source) + "/", "")
            where = where.split("site-packages/")[-1]
            print(f"| {tt * 1e6 / n:,.1f} | {ct * 1e6 / n:,.1f} | {nc / n:.1f} | "
                  f"`{where}:{line}({func})` |")
    return 0


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat of 2 s (smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (3)")
    parser.add_argument("--seconds", type=float, default=5, help="recorded seconds per run (5)")
    parser.add_argument("--warmup", type=float, default=1, help="unrecorded seconds first (1)")
    parser.add_argument("--paths", default="direct,node,hcm,chain,waypoint",
                        help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--hbonex", default=str(REPO),
                        help="hbonex source tree for the twistd processes (default: this one)")
    parser.add_argument("--workdir", help="keep configs and process logs in DIR")
    parser.add_argument("--profile", metavar="DIR",
                        help="instead: cProfile the hcm path into DIR and print the top costs")
    parser.add_argument("--top", type=int, default=30, help="functions listed by --profile")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.seconds, args.warmup = 1, 2, 0.5
    names = tuple(n for n in PATHS if n in args.paths.split(","))
    install_cleanup()
    raise_fd_limit()
    source = Path(args.hbonex).resolve()
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            **machine(), "hbonex": source_info(source)}
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hbonex-h-")))
        stack.callback(Proc.stop_all)
        _, backend = node(workdir, "backend", "http_backend.mjs", "--size", str(BODY))
        if args.profile:
            prof_dir = Path(args.profile).resolve()
            prof_dir.mkdir(parents=True, exist_ok=True)
            return profile(Setup(workdir, source, prof_dir), backend, args.seconds, args.top)
        try:
            paths = start_paths(Setup(workdir, source), backend, names)
        except CheckFailed as e:
            print(f"FAILED to start: {e}", file=sys.stderr)
            return 1
        results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
        started = time.monotonic()
        for proto, conns in MODES:  # unrecorded: pools filled, Node's JIT warm on every path
            for path in paths:
                load(path.ports[proto], proto, conns, args.warmup, 0)
        for rep in range(args.repeats):
            for proto, conns in MODES:
                for path in paths:
                    r = measure(path, proto, conns, args.seconds, args.warmup)
                    results.setdefault((proto, conns, path.name), []).append(r)
                    shown = (f"{r['rps']:>8,.0f} req/s  p50 {r['p50_us']:>7,.0f} µs  "
                             f"p99 {r['p99_us']:>7,.0f} µs  cpu {r.get('cpu_us', 0):>5,.0f} µs"
                             if r.get("ok") else "FAILED: " + r.get("error", "?"))
                    print(f"[{rep + 1}/{args.repeats}] {proto} × {conns:<2} {path.name:<6} "
                          f"{shown}  (load {r['loadavg']:.2f})", file=sys.stderr, flush=True)
        broken = crashes(paths)
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["seconds"] = f"{time.monotonic() - started:.0f}"
    info["runs"] = (f"{args.repeats} repeat(s) × {args.warmup:g} s warm-up + {args.seconds:g} s "
                    "recorded per path and mode")
    print("\n".join(f"* {k}: {v}" for k, v in info.items()))
    print()
    print(report(results, names))
    print()
    print(samples(results))
    failed = [k for k, rs in results.items() if any(not r.get("ok") for r in rs)]
    for line in broken:
        print("CRASH " + line[:600])
    return 1 if failed or broken else 0


if __name__ == "__main__":
    sys.exit(main())
