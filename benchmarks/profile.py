"""
Where hbonex's proxies spend their time: one benchmarks/run.py workload under cProfile, then per
proxy (hbone-client, hbone-server) the top functions and a split by layer.

    .venv/bin/python benchmarks/profile.py --workload rtt|upload|download|connrate
        [--top 25] [--sort tottime|cumtime] [--quick] [--reactor NAME] [--workdir DIR]

The workload runs once (run.py's sizes with one repeat; ``--quick`` for its small ones) over the
hbonex path only, with both twistd processes under ``--profiler=cprofile`` (run.py's
``--profile``). Percentages are of each process's busy time: everything cProfile saw except
the reactor waiting for events (``epoll.poll`` and the like, listed as idle). cProfile adds
its own overhead per Python call, so read the shares, not the absolute times.

(This file's name hides the standard library's ``profile`` module from what it imports while
benchmarks/ is first on sys.path; it imports nothing that needs it: pstats does not.)
"""

from __future__ import annotations

import argparse
import dataclasses
import pstats
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

WORKLOADS = ("rtt", "upload", "download", "connrate")

# Group names, in the order they are printed.
H2 = "h2 (h2, hpack, hyperframe)"
TLS = "TLS (pyOpenSSL, cryptography, OpenSSL)"
REACTOR = "Twisted (reactor, logging) and asyncio"
HBONEX = "hbonex"
BUILTINS = "syscalls and other built-ins"
OTHER = "other Python (stdlib, libraries)"
GROUPS = (HBONEX, H2, TLS, REACTOR, BUILTINS, OTHER)

LIBRARY = re.compile(r"[/\\](?:site|dist)-packages[/\\]([^/\\]+)")
H2_LIBS = {"h2", "hpack", "hyperframe"}
TLS_LIBS = {"OpenSSL", "cryptography", "service_identity", "_cffi_backend"}
REACTOR_LIBS = {"twisted", "zope", "constantly", "incremental", "automat", "attr", "attrs"}
# Built-ins that are OpenSSL: cffi's calls into libssl/libcrypto, as cProfile names them.
TLS_BUILTIN = re.compile(r"_openssl|\bSSL_|\bERR_|\bX509|\bEVP_|\bBIO_|_rust\.")
# The reactor waiting for something to do: not busy time.
IDLE = re.compile(r"'poll' of 'select\.(?:epoll|poll)' objects|built-in method select\.select"
                  r"|'run_forever' of 'uvloop")
# uvloop's run_forever is compiled code cProfile does not see as a call: its waiting (and its
# own C work) is the self time of the asyncio reactor's run(), which does nothing else.
IDLE_PYTHON = (("asyncioreactor.py", "run"),)


@dataclass(frozen=True)
class Entry:
    file: str
    line: int
    function: str
    calls: int
    tottime: float
    cumtime: float

    @property
    def name(self) -> str:
        if self.file == "~":
            return self.function
        return f"{short_path(self.file)}:{self.line} {self.function}"


def is_idle(entry: Entry) -> bool:
    if entry.file == "~":
        return bool(IDLE.search(entry.function))
    return any(entry.file.endswith(f) and entry.function == fn for f, fn in IDLE_PYTHON)


def short_path(file: str) -> str:
    """
    A file name relative to the package it belongs to (site-packages/, hbonex/, lib/pythonX).
    """
    for marker in ("site-packages/", "dist-packages/"):
        if marker in file:
            return file.split(marker, 1)[1]
    if (i := file.rfind("/hbonex/")) >= 0:
        return file[i + 1:]
    if (m := re.search(r"/python3\.\d+/(.*)$", file)):
        return m.group(1)
    return file


def group_of(entry: Entry) -> str:
    if entry.file == "~":
        return TLS if TLS_BUILTIN.search(entry.function) else BUILTINS
    if (m := LIBRARY.search(entry.file)):
        top = m.group(1).split(".")[0]
        if top in H2_LIBS:
            return H2
        if top in TLS_LIBS:
            return TLS
        if top in REACTOR_LIBS:
            return REACTOR
        return OTHER
    if "/hbonex/" in entry.file or "/twisted/plugins/hbonex" in entry.file:
        return HBONEX
    if "/twisted/" in entry.file:  # a Twisted checkout rather than an installed one
        return REACTOR
    if "/asyncio/" in entry.file:  # the asyncio reactor's event loop
        return REACTOR
    return OTHER


def entries(stats: pstats.Stats) -> list[Entry]:
    raw = stats.stats  # type: ignore[attr-defined]  # {(file, line, fn): (cc, nc, tt, ct, ...)}
    return [Entry(file, line, fn, nc, tt, ct) for (file, line, fn), (_, nc, tt, ct, _c)
            in raw.items()]


@dataclass
class Split:
    busy: float  # seconds of self time outside the reactor's wait
    idle: float
    groups: dict[str, float]  # group -> self seconds
    idle_names: list[str]

    def share(self, seconds: float) -> float:
        return 100 * seconds / self.busy if self.busy else 0.0


def split(items: list[Entry]) -> Split:
    """
    Self time per group, the reactor's waits taken out as idle.
    """
    groups = dict.fromkeys(GROUPS, 0.0)
    idle, idle_names = 0.0, []
    for e in items:
        if is_idle(e):
            idle += e.tottime
            idle_names.append(e.name)
            continue
        groups[group_of(e)] += e.tottime
    return Split(sum(groups.values()), idle, groups, idle_names)


def top(items: list[Entry], count: int, sort: str) -> list[Entry]:
    busy = [e for e in items if not is_idle(e)]
    return sorted(busy, key=lambda e: getattr(e, sort), reverse=True)[:count]


def report(label: str, stats_file: Path, count: int, sort: str) -> str:
    items = entries(pstats.Stats(str(stats_file)))
    s = split(items)
    idle = ", ".join(sorted(set(s.idle_names))) or "none found"
    out = [f"== {label} ({stats_file.name}): busy {s.busy:.3f} s; idle {s.idle:.3f} s ({idle})",
           "", f"  {'% busy':>7}  {'self s':>8}  group"]
    out += [f"  {s.share(t):6.1f}%  {t:8.3f}  {g}" for g, t in s.groups.items()]
    out += ["", f"  top {count} by {sort} ({'self' if sort == 'tottime' else 'cumulative'} time "
            "as % of busy):", f"  {'%':>6}  {'self ms':>9}  {'cum ms':>9}  {'calls':>9}  "
            "group / function"]
    for e in top(items, count, sort):
        pct = s.share(getattr(e, sort))
        out.append(f"  {pct:5.1f}%  {e.tottime * 1e3:9.1f}  {e.cumtime * 1e3:9.1f}  "
                   f"{e.calls:9,}  [{group_of(e).split(' ')[0]}] {e.name}")
    return "\n".join(out)


def profiles(workdir: Path) -> dict[str, Path]:
    """
    The newest stats file per proxy in ``workdir`` (run.py names them NNN-LABEL-hbonex-ROLE).
    """
    found: dict[str, Path] = {}
    for path in sorted(workdir.glob("*-hbonex-*.prof")):
        role = "hbone-server" if path.stem.endswith("-server") else "hbone-client"
        found[role] = path
    return found


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=WORKLOADS, required=True)
    parser.add_argument("--top", type=int, default=25, help="functions listed per proxy")
    parser.add_argument("--sort", choices=("tottime", "cumtime"), default="tottime")
    parser.add_argument("--quick", action="store_true", help="run.py's --quick sizes")
    parser.add_argument("--reactor", metavar="NAME", help="twistd --reactor for the proxies")
    parser.add_argument("--hbonex", metavar="DIR", help="another hbonex tree to profile")
    parser.add_argument("--workdir", metavar="DIR",
                        help="keep the profiles and logs in DIR (default: a temporary one)")
    args = parser.parse_args(argv)

    import run  # benchmarks/run.py: its processes, sizes and --profile machinery

    sizes = run.QUICK if args.quick else dataclasses.replace(run.FULL, repeats=1)
    run_args = argparse.Namespace(quick=args.quick, only=args.workload, profile=True,
                                  reactor=args.reactor, hbonex=args.hbonex or str(run.REPO),
                                  yaml=False, workers=1)
    with tempfile.TemporaryDirectory(prefix="hbonex-prof-") as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        for old in workdir.glob("*.prof"):
            old.unlink()  # only this run's profiles are read below
        rows = run.run(run_args, workdir, [], paths=("hbonex",), sizes=sizes)
        for row in rows:  # the profiled run's own figures (slowed by the profiler)
            print(f"{row.metric}: {row.cell('hbonex')} {row.unit} (under cProfile)")
        found = profiles(workdir)
        if len(found) != 2:
            print(f"expected two profiles in {workdir}, found {sorted(found)}", file=sys.stderr)
            return 1
        for label in ("hbone-client", "hbone-server"):
            print()
            print(report(label, found[label], args.top, args.sort))
    return 1 if run.failures(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
