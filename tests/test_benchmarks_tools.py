"""
The benchmark tooling's pure parts: run.py's JSON results, the chart data (benchmarks/plots.py),
loadgen's bounded round-trip quantiles and profile.py's split by layer. The drawing itself
needs matplotlib (the optional ``bench`` extra): with it the charts are drawn; without it, the
message must say what to install.

benchmarks/ is not a package and holds a ``profile.py``, which must never shadow the standard
library's: its modules are loaded by file path under names of their own, and benchmarks/ is
never put on sys.path.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from twisted.trial import unittest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str) -> ModuleType:
    unique = f"hbonex_bench_{name}"
    if unique in sys.modules:
        return sys.modules[unique]
    spec = importlib.util.spec_from_file_location(unique, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module
    spec.loader.exec_module(module)
    return module


plots = load("plots")
loadgen = load("loadgen")
profile = load("profile")
run = load("run")


def synthetic_rows() -> list[Any]:
    """
    Rows as run.py builds them: a throughput row, a round-trip row with distributions, a CPU
    row (no direct figure) and a row whose Node run failed.
    """
    up = run.Row("upload, 1 tunnel × 32 MiB", "MB/s", "higher", key="upload-1")
    up.samples = {"direct": [2000.0, 3000.0, 4000.0], "hbonex": [300.0, 400.0, 500.0],
                  "node": [200.0, 250.0, 260.0]}
    p50 = run.Row("round trip p50 (64 B × 4)", "µs", "lower", key="rtt-p50")
    p50.samples = {"direct": [50.0], "hbonex": [300.0], "node": [150.0]}
    p50.distributions = {"direct": [[40.0, 50.0], [45.0, 60.0]], "hbonex": [[200.0, 300.0]],
                         "node": [[100.0, 150.0, 170.0]]}
    cpu = run.Row("proxy CPU per round trip", "µs", "lower", target=False, cpu=True,
                  key="cpu-rtt")
    cpu.samples = {"direct": [], "hbonex": [240.0], "node": [120.0]}
    failed = run.Row("new tunnels/s (16 at a time, 30)", "tunnels/s", "higher", key="connrate")
    failed.samples = {"direct": [5000.0], "hbonex": [1000.0], "node": []}
    failed.failures = {"node": "node did not start"}
    return [up, p50, cpu, failed]


def synthetic_results() -> dict[str, Any]:
    info = {"date": "2026-12-06 01:00 UTC", "command": "benchmarks/run.py --quick",
            "versions": {"hbonex": "commit abc1234 of /x (clean)"}}
    # Through run.py's own writer and back, as --plot-from reads it.
    return json.loads(run.dump_json(run.results_json(synthetic_rows(), info)))


class ResultsJsonTests(unittest.TestCase):
    def test_round_trip_keeps_rows_and_one_line_each(self) -> None:
        rows = synthetic_rows()
        text = run.dump_json(run.results_json(rows, {"date": "d"}))
        self.assertEqual(len(text.splitlines()), 2 + len(rows))
        back = json.loads(text)
        self.assertEqual(back["format"], 1)
        self.assertEqual(back["info"], {"date": "d"})
        self.assertEqual([r["key"] for r in back["rows"]],
                         ["upload-1", "rtt-p50", "cpu-rtt", "connrate"])
        self.assertEqual(back["rows"][1]["distributions"]["node"], [[100.0, 150.0, 170.0]])
        self.assertEqual(back["rows"][3]["failures"], {"node": "node did not start"})


class ChartDataTests(unittest.TestCase):
    def test_ratios_against_node_and_direct(self) -> None:
        bars = {b["key"]: b for b in plots.ratio_bars(synthetic_results())}
        self.assertEqual(sorted(bars), ["connrate", "cpu-rtt", "rtt-p50", "upload-1"])
        self.assertAlmostEqual(bars["upload-1"]["vs_node"], 400 / 250)
        self.assertAlmostEqual(bars["upload-1"]["vs_direct"], 400 / 3000)
        self.assertEqual(bars["upload-1"]["better"], "higher")
        self.assertAlmostEqual(bars["rtt-p50"]["vs_node"], 2.0)
        self.assertAlmostEqual(bars["rtt-p50"]["vs_direct"], 6.0)
        self.assertEqual(bars["rtt-p50"]["better"], "lower")
        self.assertAlmostEqual(bars["cpu-rtt"]["vs_node"], 2.0)
        self.assertIsNone(bars["cpu-rtt"]["vs_direct"])
        self.assertEqual(bars["upload-1"]["label"], plots.SHORT["upload-1"])

    def test_failed_node_leaves_only_the_direct_ratio(self) -> None:
        results = synthetic_results()
        results["rows"][3]["samples"]["node"] = [900.0]  # a figure, but a repeat failed
        bars = {b["key"]: b for b in plots.ratio_bars(results)}
        self.assertIsNone(bars["connrate"]["vs_node"])
        self.assertAlmostEqual(bars["connrate"]["vs_direct"], 0.2)
        del results["rows"][3]["samples"]["direct"]  # neither ratio: no bar at all
        self.assertNotIn("connrate", [b["key"] for b in plots.ratio_bars(results)])

    def test_cdf_pools_repeats_and_ends_at_one(self) -> None:
        cdf = plots.cdf_points(synthetic_results())
        self.assertEqual(list(cdf), ["direct", "hbonex", "node"])
        xs, ys = cdf["direct"]
        self.assertEqual(xs, [40.0, 45.0, 50.0, 60.0])
        self.assertEqual(ys, [0.25, 0.5, 0.75, 1.0])
        self.assertEqual(cdf["node"][1][-1], 1.0)

    def test_no_distributions_no_cdf(self) -> None:
        results = synthetic_results()
        for row in results["rows"]:
            row["distributions"] = {}
        self.assertEqual(plots.cdf_points(results), {})

    def test_missing_matplotlib_names_the_extra(self) -> None:
        saved = sys.modules.get("matplotlib")
        sys.modules["matplotlib"] = None  # type: ignore[assignment]  # import fails
        try:
            message = plots.missing_matplotlib()
        finally:
            if saved is None:
                del sys.modules["matplotlib"]
            else:
                sys.modules["matplotlib"] = saved
        self.assertIsNotNone(message)
        self.assertIn("pip install -e '.[bench]'", message)

    def test_draw_or_say_what_to_install(self) -> None:
        """
        With matplotlib: both SVGs, identical when drawn twice. Without: the message above.
        """
        missing = plots.missing_matplotlib()
        if missing is not None:
            self.assertIn(plots.INSTALL, missing)
            return
        out = Path(self.mktemp())
        written = plots.draw(synthetic_results(), out)
        self.assertEqual([p.name for p in written], [plots.RATIOS_FILE, plots.CDF_FILE])
        first = [p.read_bytes() for p in written]
        for data in first:
            self.assertIn(b"<svg", data)
        plots.draw(synthetic_results(), out)
        self.assertEqual([p.read_bytes() for p in written], first)


class QuantileTests(unittest.TestCase):
    def test_bounded_with_both_ends(self) -> None:
        samples = list(range(1000, 1000 * 10_001, 1000))  # 10,000 samples, ns
        q = loadgen.quantiles(samples, 500)
        self.assertEqual(len(q), 500)
        self.assertEqual(q[0], 1.0)
        self.assertEqual(q[-1], 10_000.0)
        self.assertEqual(q, sorted(q))

    def test_few_samples_all_kept(self) -> None:
        self.assertEqual(loadgen.quantiles([1500, 2500], 500), [1.5, 2.5])


class ProfileSplitTests(unittest.TestCase):
    SITE = "/v/lib/python3.11/site-packages/"

    def entry(self, file: str, function: str, tottime: float) -> Any:
        return profile.Entry(file, 1, function, 10, tottime, tottime)

    def test_groups(self) -> None:
        cases = {
            (self.SITE + "h2/connection.py", "send_data"): profile.H2,
            (self.SITE + "hpack/hpack.py", "encode"): profile.H2,
            (self.SITE + "OpenSSL/SSL.py", "send"): profile.TLS,
            ("~", "<built-in method _openssl.SSL_read>"): profile.TLS,
            (self.SITE + "twisted/internet/tcp.py", "doRead"): profile.REACTOR,
            ("/usr/lib/python3.11/asyncio/events.py", "_run"): profile.REACTOR,
            ("/tmp/wt/hbonex/h2/connection.py", "dataReceived"): profile.HBONEX,
            ("~", "<method 'send' of '_socket.socket' objects>"): profile.BUILTINS,
            ("/usr/lib/python3.11/json/encoder.py", "encode"): profile.OTHER,
        }
        for (file, function), group in cases.items():
            self.assertEqual(profile.group_of(self.entry(file, function, 0.1)), group,
                             (file, function))

    def test_split_takes_the_wait_out(self) -> None:
        items = [
            self.entry("~", "<method 'poll' of 'select.epoll' objects>", 3.0),
            self.entry("/tmp/wt/hbonex/relay.py", "dataReceived", 0.25),
            self.entry(self.SITE + "h2/frame_buffer.py", "__next__", 0.5),
            self.entry("~", "<method 'recv' of '_socket.socket' objects>", 0.25),
        ]
        s = profile.split(items)
        self.assertAlmostEqual(s.busy, 1.0)
        self.assertAlmostEqual(s.idle, 3.0)
        self.assertAlmostEqual(s.share(s.groups[profile.H2]), 50.0)
        self.assertAlmostEqual(s.share(s.groups[profile.HBONEX]), 25.0)
        names = [e.function for e in profile.top(items, 2, "tottime")]
        self.assertEqual(names, ["__next__", "dataReceived"])

    def test_uvloop_wait_is_the_asyncio_reactor_run(self) -> None:
        reactor = self.SITE + "twisted/internet/asyncioreactor.py"
        items = [self.entry(reactor, "run", 2.0), self.entry(reactor, "callLater", 0.5),
                 self.entry("/tmp/wt/hbonex/relay.py", "dataReceived", 0.5)]
        s = profile.split(items)
        self.assertAlmostEqual(s.idle, 2.0)
        self.assertAlmostEqual(s.busy, 1.0)
        self.assertAlmostEqual(s.groups[profile.REACTOR], 0.5)

    def test_report_reads_a_real_stats_file(self) -> None:
        import cProfile

        stats = Path(self.mktemp())
        cProfile.runctx("sorted(range(1000))", {}, {}, str(stats))
        text = profile.report("hbone-client", stats, 5, "cumtime")
        self.assertIn("== hbone-client", text)
        self.assertIn(profile.BUILTINS, text)
        self.assertIn("top 5 by cumtime", text)

    def test_profiles_found_per_role(self) -> None:
        work = Path(self.mktemp())
        work.mkdir()
        for name in ("001-rtt-hbonex-server.prof", "002-rtt-hbonex-client.prof", "x.log"):
            (work / name).write_text("")
        found = profile.profiles(work)
        self.assertEqual({k: v.name for k, v in found.items()},
                         {"hbone-server": "001-rtt-hbonex-server.prof",
                          "hbone-client": "002-rtt-hbonex-client.prof"})


class ChartSectionTests(unittest.TestCase):
    def test_links_relative_to_the_markdown_with_a_sentence_each(self) -> None:
        base = Path(self.mktemp())
        charts = [base / "docs" / plots.RATIOS_FILE, base / "docs" / plots.CDF_FILE]
        lines = run.chart_section(charts, base / "docs" / "benchmarks.md",
                                  "docs/benchmarks.json")
        self.assertEqual(lines[1], "## Charts")
        self.assertIn("--plot-from docs/benchmarks.json", lines[3])
        links = [line for line in lines if line.startswith("![")]
        self.assertEqual([line.rsplit("(", 1)[1] for line in links],
                         ["bench-ratios.svg)", "bench-rtt-cdf.svg)"])
        for name in (plots.RATIOS_FILE, plots.CDF_FILE):
            self.assertIn(run.CHART_TEXT[name][1], lines)

    def test_nothing_drawn_no_section(self) -> None:
        self.assertEqual(run.chart_section([], Path("docs/benchmarks.md"), None), [])
