"""
Charts of a benchmarks/run.py result (``--plot``, ``--plot-from FILE``): the ratios of hbonex to
Node and to direct TCP, and the round-trip latency distribution of each path.

The data preparation (``ratio_bars``, ``cdf_points``) is pure and needs nothing but the results
JSON; only ``draw`` needs matplotlib, an optional extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

INSTALL = "pip install -e '.[bench]'"
PATHS = ("direct", "hbonex", "node")
RATIOS_FILE = "bench-ratios.svg"
CDF_FILE = "bench-rtt-cdf.svg"

#: Short chart labels for run.py's row keys (a row without one is labelled by its metric).
SHORT = {
    "upload-1": "upload\n1 tunnel",
    "upload-8": "upload\n8 tunnels",
    "download-1": "download\n1 tunnel",
    "download-8": "download\n8 tunnels",
    "rtt-p50": "round trip\np50",
    "rtt-p99": "round trip\np99",
    "connrate": "new\ntunnels/s",
    "idle": "RSS per\nidle tunnel",
    "cpu-upload-1": "CPU/MB\nupload 1",
    "cpu-upload-8": "CPU/MB\nupload 8",
    "cpu-download-1": "CPU/MB\ndownload 1",
    "cpu-download-8": "CPU/MB\ndownload 8",
    "cpu-rtt": "CPU per\nround trip",
    "cpu-connrate": "CPU per\nnew tunnel",
}
COLOURS = {"direct": "#4c72b0", "hbonex": "#dd8452", "node": "#55a868"}


def missing_matplotlib() -> Optional[str]:
    """
    None when the charts can be drawn, else what to install.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("--plot needs matplotlib, which is not installed here; install the bench extra: "
                f"{INSTALL}")
    return None


def median(row: dict[str, Any], path: str) -> Optional[float]:
    """
    The row's median for ``path``, None when it failed or has no samples (as run.py's table).
    """
    samples = row.get("samples", {}).get(path) or []
    if path in row.get("failures", {}) or not samples:
        return None
    return float(statistics.median(samples))


def ratio_bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    """
    One bar group per row that has an hbonex median: hbonex / Node and hbonex / direct TCP (None
    where that path has no figure, e.g. direct for the CPU and memory rows), and which way is
    better ("higher" or "lower": a ratio above 1.0 is good for throughput, bad for latency).
    """
    bars = []
    for row in results["rows"]:
        mine = median(row, "hbonex")
        if mine is None:
            continue
        ratios = {}
        for other in ("node", "direct"):
            theirs = median(row, other)
            ratios[other] = mine / theirs if theirs else None
        if ratios["node"] is None and ratios["direct"] is None:
            continue
        bars.append({"key": row.get("key", ""), "label": SHORT.get(row.get("key", ""),
                                                                   row["metric"]),
                     "better": row["better"], "vs_node": ratios["node"],
                     "vs_direct": ratios["direct"]})
    return bars


def cdf_points(results: dict[str, Any]) -> dict[str, tuple[list[float], list[float]]]:
    """
    Per path, the round-trip CDF: the quantiles of all repeats pooled and sorted (each repeat
    reports as many), against the fraction of round trips at or below each.
    """
    rows = [r for r in results["rows"] if r.get("distributions")]
    if not rows:
        return {}
    out = {}
    for path in PATHS:
        pooled = sorted(v for repeat in rows[0]["distributions"].get(path, []) for v in repeat)
        if pooled:
            out[path] = (pooled, [(i + 1) / len(pooled) for i in range(len(pooled))])
    return out


def caption(results: dict[str, Any]) -> str:
    info = results.get("info", {})
    commit = str(info.get("versions", {}).get("hbonex", "")).split(" of ")[0]
    return " · ".join(x for x in (info.get("command", ""), info.get("date", ""), commit) if x)


def draw(results: dict[str, Any], directory: Path) -> list[Path]:
    """
    Write the charts the results allow into ``directory``; the files written. Thin on purpose:
    what is drawn comes from ``ratio_bars`` and ``cdf_points``.
    """
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "hbonex"  # stable element ids: diffable SVGs
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    bars = ratio_bars(results)
    if bars:
        fig, ax = plt.subplots(figsize=(max(8.0, 0.85 * len(bars) + 2), 5.2))
        xs = range(len(bars))
        for offset, key, name, colour in ((-0.2, "vs_node", "hbonex / Node", COLOURS["node"]),
                                          (0.2, "vs_direct", "hbonex / direct TCP",
                                           COLOURS["direct"])):
            heights = [b[key] or 0.0 for b in bars]
            drawn = ax.bar([x + offset for x in xs], heights, 0.38, label=name, color=colour)
            ax.bar_label(drawn, labels=[f"{b[key]:.2f}×" if b[key] else "" for b in bars],
                         fontsize=7, rotation=90, padding=2)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        shown = [r for b in bars for r in (b["vs_node"], b["vs_direct"]) if r] + [1.0]
        ax.set_ylim(min(shown) / 1.6, max(shown) * 3)  # room for the labels above the bars
        ax.set_xticks(list(xs), [b["label"] + ("\n↑ better" if b["better"] == "higher"
                                                else "\n↓ better") for b in bars], fontsize=8)
        ax.set_ylabel("ratio (log scale; 1.0 = the same)")
        ax.set_title("hbonex relative to Node and to direct TCP (medians)", fontsize=11)
        fig.text(0.01, 0.01, caption(results), fontsize=7, color="grey")
        ax.legend(fontsize=8)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        written.append(save(fig, directory / RATIOS_FILE))
        plt.close(fig)
    cdf = cdf_points(results)
    if cdf:
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for path, (xs_us, ys) in cdf.items():
            ax.step(xs_us, ys, where="post", color=COLOURS[path],
                    label=f"{path} (p50 {xs_us[len(xs_us) // 2]:,.0f} µs)")
        for level in (0.5, 0.99):
            ax.axhline(level, color="lightgrey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("round-trip time of 64 bytes (µs, log scale)")
        ax.set_ylabel("fraction of round trips ≤ x")
        ax.set_title("Round-trip latency distribution per path (all repeats)", fontsize=11)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.text(0.01, 0.01, caption(results), fontsize=7, color="grey")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        written.append(save(fig, directory / CDF_FILE))
        plt.close(fig)
    return written


def save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="svg", metadata={"Date": None})  # no timestamp in the file
    return path
