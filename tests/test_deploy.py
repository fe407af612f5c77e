"""
deploy/ checked offline: every YAML and JSON file parses; the Kubernetes manifests and the
systemd unit run a command line hbone-server's own option parser accepts (with the mounted
certificates and ConfigMap written to a temporary directory, so the Secret's items are exactly
what --pki/--ca read), their ports, probes, scrape annotations and grace periods agree with
that command line; the Grafana dashboard queries only metric names hbonex exports (Istio's
families from hbonex.observability.istio_metrics, Envoy's scraped from a real
``twistd hbone-server``).
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from twisted.trial import unittest

from hbonex.cli.server_tap import Options
from hbonex.observability import istio_metrics
from hbonex.observability.stats import Family
from hbonex.tls import pki
from tests.support import e2e, start_twistd

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
HBONE_PORT = 15008
#: Envoy names the dashboard may use that a fresh server does not show: each counter is
#: created by its first event (an HTTP/2 flood); their names are checked in the source.
LAZY_ENVOY = {
    "envoy_http2_inbound_empty_frames_flood_total": "inbound_empty_frames_flood",
    "envoy_http2_inbound_priority_frames_flood_total": "inbound_priority_frames_flood",
    "envoy_http2_inbound_window_update_frames_flood_total": "inbound_window_update_frames_flood",
    "envoy_http2_outbound_flood_total": "http2.outbound_flood",
    "envoy_http2_outbound_control_flood_total": "http2.outbound_control_flood",
    "envoy_http2_premature_reset_total": "premature_reset",
}
#: Labels Prometheus adds, or that PromQL makes.
PROMQL_LABELS = {"instance", "job", "le"}


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def workloads() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in manifests() if d["kind"] in ("DaemonSet", "Deployment")]


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name V`` / ``--name=V`` (the last one)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.partition("=")[2]
    return value


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def make_identity(base: Path) -> dict[str, bytes]:
    """A CA and a leaf, as a kubernetes.io/tls Secret's keys (with ca.crt)."""
    pki.init_ca(base, "cluster.local")
    pki.issue(base, "leaf", spiffe="spiffe://cluster.local/ns/istio-system/sa/hbonex",
              ip=["127.0.0.1"])
    return {"tls.crt": (base / "leaf" / "cert.pem").read_bytes(),
            "tls.key": (base / "leaf" / "key.pem").read_bytes(),
            "ca.crt": (base / "ca.pem").read_bytes()}


class ParseTests(unittest.TestCase):
    def test_every_file_parses(self) -> None:
        files = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
        self.assertTrue(files)
        for path in files:
            if path.suffix in (".yaml", ".yml"):
                docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
                self.assertTrue(docs, path)
                for doc in docs:
                    self.assertIn("apiVersion", doc, path)
                    self.assertIn("kind", doc, path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            else:
                self.assertEqual(path.suffix, ".service", f"{path}: not checked by this test")

    def test_kinds(self) -> None:
        kinds = {(d["apiVersion"], d["kind"]) for _, d in manifests()}
        expected = {("v1", "ServiceAccount"), ("v1", "ConfigMap"), ("v1", "Service"),
                    ("apps/v1", "DaemonSet"), ("apps/v1", "Deployment"),
                    ("policy/v1", "PodDisruptionBudget")}
        self.assertEqual(kinds, expected)
        names = {d["kind"]: p.name for p, d in workloads()}
        self.assertEqual(names, {"DaemonSet": "ztunnel-daemonset.yaml",
                                 "Deployment": "waypoint-deployment.yaml"})


class WorkloadTests(unittest.TestCase):
    """The DaemonSet and the Deployment, each against its own command line."""

    def check_workload(self, path: Path, doc: dict[str, Any]) -> None:
        where = f"{path.name} {doc['kind']}"
        spec = doc["spec"]
        self.assertEqual(spec["selector"]["matchLabels"].items()
                         - spec["template"]["metadata"]["labels"].items(), set(), where)
        pod = spec["template"]["spec"]
        [container] = pod["containers"]
        self.assertEqual(container["command"], ["twistd", "-n", "hbone-server"], where)
        args = [str(a) for a in container["args"]]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        for m in container["volumeMounts"]:
            self.assertNotIn("subPath", m, f"{where}: a subPath mount is never updated")
            self.assertTrue(m.get("readOnly"), where)
        secret_mounts = {p: v for p, v in mounts.items() if "secret" in v}
        self.assertTrue(secret_mounts, where)

        # The volumes, written out under a temporary directory: the certificates as the Secret
        # items name them, the ConfigMap's keys.
        tmp = Path(self.mktemp()).resolve()
        secret = make_identity(tmp / "ca")

        def local(text: str) -> str:
            for mount_path in sorted(mounts, key=len, reverse=True):
                text = text.replace(mount_path, str(tmp / "mounts" / mount_path.strip("/")))
            return text

        config_text = None
        for mount_path, volume in mounts.items():
            target = Path(local(mount_path))
            target.mkdir(parents=True)
            if "secret" in volume:
                items = volume["secret"]["items"]
                self.assertEqual({i["key"] for i in items}, {"tls.crt", "tls.key", "ca.crt"})
                for item in items:
                    (target / item["path"]).write_bytes(secret[item["key"]])
            else:
                [configmap] = [d for _, d in manifests() if d["kind"] == "ConfigMap"
                               and d["metadata"]["name"] == volume["configMap"]["name"]]
                for key, text in configmap["data"].items():
                    (target / key).write_text(local(text))
                    config_text = text

        # What the command line says: the HBONE and admin ports, the certificate files.
        config = flag(args, "--config")
        if config is None:
            listen_port = port_of(flag(args, "--listen") or "")
            admin_port = port_of(flag(args, "--admin") or "")
            cert_files = [flag(args, "--pki") + "/cert.pem", flag(args, "--pki") + "/key.pem",
                          flag(args, "--ca")]
        else:
            self.assertIsNotNone(config_text, f"{where}: --config is not a mounted ConfigMap")
            [mount_path] = [p for p in mounts if config.startswith(p + "/")]
            self.assertIn("configMap", mounts[mount_path], where)
            bootstrap = yaml.safe_load(config_text)
            [listener] = bootstrap["static_resources"]["listeners"]
            listen_port = listener["address"]["socket_address"]["port_value"]
            admin_port = bootstrap["admin"]["address"]["socket_address"]["port_value"]
            cert_files = re.findall(r"filename: (\S+?)[,}\s]", config_text)
            self.assertEqual(len(cert_files), 3, where)
            self.check_config_check(Path(local(config)))
        self.assertEqual(listen_port, HBONE_PORT, where)
        for name in cert_files:
            assert name is not None
            mount_path = str(Path(name).parent)
            self.assertIn(mount_path, secret_mounts, f"{where}: {name} is not in a Secret")
            items = {i["path"] for i in secret_mounts[mount_path]["secret"]["items"]}
            self.assertIn(Path(name).name, items, where)

        # The plugin's option parser takes the command line (certificates loaded, YAML
        # checked), as twistd will.
        options = Options()
        options.parseOptions([local(a) for a in args])
        drain = options["drain-timeout"]
        self.assertIn("drain-timeout", options.given, f"{where}: set --drain-timeout")
        self.assertGreater(pod["terminationGracePeriodSeconds"], drain, where)

        # Ports, probes and scrape annotations.
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        self.assertEqual(ports, {"hbone": HBONE_PORT, "admin": admin_port}, where)

        def probe_port(probe: dict[str, Any]) -> int:
            port = probe["httpGet"]["port"]
            return ports[port] if isinstance(port, str) else int(port)

        for kind in ("startupProbe", "readinessProbe"):
            self.assertEqual(container[kind]["httpGet"]["path"], "/ready", f"{where} {kind}")
            self.assertEqual(probe_port(container[kind]), admin_port, f"{where} {kind}")
        liveness = container["livenessProbe"]
        self.assertIn(liveness["httpGet"]["path"], ("/ready", "/server_info"), where)
        self.assertEqual(probe_port(liveness), admin_port, where)
        self.assertGreater(liveness["periodSeconds"] * liveness["failureThreshold"],
                           pod["terminationGracePeriodSeconds"],
                           f"{where}: liveness must not kill a pod while it drains")
        annotations = spec["template"]["metadata"]["annotations"]
        self.assertEqual(annotations["prometheus.io/scrape"], "true", where)
        self.assertEqual(annotations["prometheus.io/path"], "/stats/prometheus", where)
        self.assertEqual(int(annotations["prometheus.io/port"]), admin_port, where)
        self.assertNotIn("lifecycle", container, f"{where}: SIGTERM drains, no preStop")

    def check_config_check(self, path: Path) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "hbonex", "config", "check", str(path)],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        self.assertIn("OK (1 listener(s), 1 cluster(s))", result.stdout)
        self.assertEqual(result.stderr, "", "warnings from config check")

    def test_daemonset(self) -> None:
        [(path, doc)] = [(p, d) for p, d in workloads() if d["kind"] == "DaemonSet"]
        self.check_workload(path, doc)
        self.assertIn("hostNetwork", doc["spec"]["template"]["spec"])

    def test_deployment(self) -> None:
        [(path, doc)] = [(p, d) for p, d in workloads() if d["kind"] == "Deployment"]
        self.check_workload(path, doc)

    def test_service_targets_the_hbone_port(self) -> None:
        [(_, service)] = [(p, d) for p, d in manifests() if d["kind"] == "Service"]
        [(_, deployment)] = [(p, d) for p, d in workloads() if d["kind"] == "Deployment"]
        self.assertEqual(service["spec"]["selector"],
                         deployment["spec"]["selector"]["matchLabels"])
        [port] = service["spec"]["ports"]
        self.assertEqual((port["port"], port["targetPort"]), (HBONE_PORT, "hbone"))


class SystemdTests(unittest.TestCase):
    UNIT = DEPLOY / "systemd" / "hbone-server.service"

    def test_unit(self) -> None:
        text = self.UNIT.read_text()
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read_string(text)
        self.assertEqual(set(unit.sections()), {"Unit", "Service", "Install"})
        service = unit["Service"]
        environment = dict(v.split("=", 1) for v in
                           re.findall(r"^Environment=(\S+=\S+)$", text, re.MULTILINE))
        self.assertIn("HBONEX_VENV", environment)
        argv = shlex.split(service["ExecStart"].replace("\\\n", " "))
        self.assertEqual(argv[:4], ["/usr/bin/env", "${HBONEX_VENV}/bin/twistd", "-n",
                                    "hbone-server"])
        self.assertEqual(service["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertEqual(service["KillSignal"], "SIGTERM")
        self.assertEqual(unit["Install"]["WantedBy"], "multi-user.target")

        # The flags, with the certificates laid out as `hbonex pki` does in a temporary dir.
        args = argv[4:]
        tmp = Path(self.mktemp()).resolve()
        pki_flag, ca_flag = flag(args, "--pki"), flag(args, "--ca")
        assert pki_flag is not None and ca_flag is not None
        root = Path(pki_flag).parent
        self.assertEqual(Path(ca_flag), root / "ca.pem")
        pki.init_ca(tmp, "cluster.local")
        pki.issue(tmp, Path(pki_flag).name, spiffe="spiffe://cluster.local/ns/x/sa/server")
        options = Options()
        options.parseOptions([a.replace(str(root), str(tmp)) for a in args])
        self.assertGreater(float(service["TimeoutStopSec"]), options["drain-timeout"])
        self.assertIn("drain-timeout", options.given)
        self.assertTrue(options["admin"].startswith("127.0.0.1:"),
                        "outside Kubernetes the admin stays on loopback")
        self.assertEqual(port_of(flag(args, "--listen") or ""), HBONE_PORT)


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "hbonex.json").read_text())
    exprs = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        targets = panel["targets"]
        if not targets:
            raise AssertionError(f"panel {panel['title']!r} has no query")
        exprs.extend(t["expr"] for t in targets)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def istio_names() -> dict[str, set[str]]:
    """Every series name hbonex.observability.istio_metrics exports, with its labels."""
    names: dict[str, set[str]] = {}
    families = [f for f in vars(istio_metrics).values() if isinstance(f, Family)]
    assert len(families) == 8, families
    for family in families:
        suffixes = ["_total"] if family.kind == "counter" else ["_bucket", "_sum", "_count"]
        for suffix in suffixes:
            names[family.name + suffix] = set(family.labels)
    return names


class DashboardTests(unittest.TestCase):
    timeout = 60

    def test_panels(self) -> None:
        dashboard = json.loads((DEPLOY / "grafana" / "hbonex.json").read_text())
        ids = [p["id"] for p in dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        titles = " ".join(p["title"] for p in dashboard["panels"])
        for words in ("by response code", "p50 / p99", "opened / closed", "bytes",
                      "HTTP/2 floods", "Upstream connections active"):
            self.assertIn(words, titles)
        exprs = " ".join(dashboard_exprs())
        self.assertIn("histogram_quantile(0.99", exprs)
        self.assertIn("sum by (response_code) (rate(istio_requests_total", exprs)

    def test_lazy_envoy_names_are_in_the_source(self) -> None:
        source = "\n".join(p.read_text() for p in (ROOT / "hbonex" / "h2").glob("*.py"))
        for name, stat in LAZY_ENVOY.items():
            self.assertIn(f'"{stat}"', source, name)

    @e2e
    async def test_metric_names_exist(self) -> None:
        """
        Every name in a query is exported: Istio's by hbonex.observability.istio_metrics,
        Envoy's by a real hbone-server's /stats/prometheus; and every label grouped on is one of
        its labels.
        """
        from prometheus_client.parser import text_string_to_metric_families
        from twisted.internet import reactor
        from twisted.web.client import Agent, readBody

        from tests.support import make_pki

        server = await start_twistd(
            self, "hbone-server",
            ["--listen", "127.0.0.1:0", *make_pki(self).args("server"),
             "--admin", "127.0.0.1:0"],
            name="hbone-server",
        )
        [m] = await server.wait_for_count(r"admin listening on 127\.0\.0\.1:(?P<port>\d+)", 1)
        response = await Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{m['port']}/stats/prometheus".encode())
        self.assertEqual(response.code, 200)
        text = (await readBody(response)).decode()
        scraped: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                scraped.setdefault(sample.name, set()).update(sample.labels)
        exported = istio_names()
        for name in exported:
            if name.endswith(("_total", "_bucket")):
                # Declared in the exposition even before the first sample.
                base = re.escape(name.rpartition("_")[0])
                self.assertRegex(text, rf"(?m)^# TYPE {base}(_total)? ")
        envoy = {n: labels for n, labels in scraped.items() if n.startswith("envoy_")}
        envoy.update((name, set()) for name in LAZY_ENVOY)
        known = {**exported, **envoy}
        used = set()
        for expr in dashboard_exprs():
            without_groups = re.sub(r"by \([^)]*\)", "", expr)
            names = set(re.findall(r"\b((?:istio|envoy)_[a-zA-Z0-9_]+)", without_groups))
            self.assertTrue(names, expr)
            labels = set()
            for name in names:
                self.assertIn(name, known, f"{name} is not exported ({expr})")
                labels |= known[name]
                used.add(name)
            for group in re.findall(r"by \(([^)]*)\)", expr):
                for label in (g.strip() for g in group.split(",")):
                    self.assertIn(label, labels | PROMQL_LABELS, f"{label} in {expr}")
        # The Envoy names the dashboard relies on are there on a fresh server.
        for name in ("envoy_cluster_upstream_cx_active", "envoy_server_downstream_cx_active",
                     "envoy_http2_rx_reset_total", "envoy_http2_goaway_sent_total",
                     "envoy_http_downstream_cx_upgrades_active"):
            self.assertIn(name, scraped)
            self.assertIn(name, used)
        self.assertIn("istio_request_duration_milliseconds_bucket", used)


class ReadmeTests(unittest.TestCase):
    def test_linked(self) -> None:
        self.assertIn("[docs/operations.md](docs/operations.md)",
                      (ROOT / "README.md").read_text())
        self.assertTrue((ROOT / "docs" / "operations.md").is_file())
