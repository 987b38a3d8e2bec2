"""Soak: `clotho up` for N minutes with every process's resident memory sampled.

Starts `python -m services.cli up --steps 0` (until stopped) in a fresh data
directory, samples the memory of `clotho up` itself and of each of its children (from
/proc; Linux only) every --interval seconds, and after --minutes stops the mesh and
prints, per process, the slope over time once warm (the samples after
--warmup-minutes, default a fifth of the run): a least-squares fit in MB/min with its
standard error, the residual noise (MB) and the growth over the warm window. A slope
within two standard errors of zero, or whose growth over the window is within the
noise, counts as flat.

Two measures per process: `anon` (RssAnon: the heap and other private memory, where a
leak shows) and `rss` (VmRSS: anon plus file-backed pages such as the mapped torch
libraries, which the kernel drops and faults back in with the machine's page-cache
pressure, so its slope moves with what else runs on the machine).

Usage: python bench/soak.py [--minutes 30] [--interval 5] [--out soak.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


MEASURES = ("anon", "rss")


def memory_mb(pid: int) -> dict[str, float] | None:
    """RssAnon and VmRSS of `pid` in MB (None once it is gone)."""
    fields = {"RssAnon:": "anon", "VmRSS:": "rss"}
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in fields:
                    out[fields[parts[0]]] = int(parts[1]) / 1024
    except (OSError, ValueError):
        return None
    return out if len(out) == len(fields) else None


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (scans /proc/*/stat for the parent id)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the parent id follows its ")".
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return str(pid)
    args = [a.decode(errors="replace") for a in argv if a]
    if "-m" in args and args.index("-m") + 1 < len(args):
        return args[args.index("-m") + 1].removeprefix("services.")
    return Path(args[0]).name if args else str(pid)


@dataclass
class Fit:
    slope: float  # MB per minute
    stderr: float
    noise: float  # residual standard deviation, MB
    growth: float  # slope x window, MB
    samples: int

    @property
    def flat(self) -> bool:
        return abs(self.slope) <= 2 * self.stderr or abs(self.growth) <= self.noise

    @property
    def verdict(self) -> str:
        return "flat" if self.flat else ("GROWS" if self.slope > 0 else "shrinks")


def fit(points: list[tuple[float, float]]) -> Fit | None:
    """Least squares of (minutes, MB)."""
    n = len(points)
    if n < 3:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    residuals = [y - (my + slope * (x - mx)) for x, y in zip(xs, ys)]
    rss = sum(r * r for r in residuals)
    noise = math.sqrt(rss / (n - 2))
    stderr = noise / math.sqrt(sxx)
    return Fit(slope, stderr, noise, slope * (xs[-1] - xs[0]), n)


def _empty_points() -> dict[str, list[tuple[float, float]]]:
    return {m: [] for m in MEASURES}


@dataclass
class Series:
    name: str
    # measure -> (minutes, MB)
    points: dict[str, list[tuple[float, float]]] = field(default_factory=_empty_points)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the mesh runs")
    ap.add_argument(
        "--warmup-minutes", type=float, default=None, help="samples ignored at the start (default: a fifth)"
    )
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="write the samples and fits here as JSON")
    args = ap.parse_args()
    warmup = args.minutes / 5 if args.warmup_minutes is None else args.warmup_minutes

    with tempfile.TemporaryDirectory(prefix="clotho-soak-") as data_dir:
        cmd = [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--steps",
            "0",
            "--quiet",
            "--batch-size",
            str(args.batch_size),
            "--data-dir",
            data_dir,
        ]
        up = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, start_new_session=True)
        series: dict[int, Series] = {up.pid: Series("clotho up")}
        start = time.monotonic()
        end = start + args.minutes * 60
        try:
            while time.monotonic() < end and up.poll() is None:
                for child in children_of(up.pid):
                    if child not in series:
                        series[child] = Series(process_name(child))
                now = (time.monotonic() - start) / 60
                for pid, s in series.items():
                    sample = memory_mb(pid)
                    if sample is not None:
                        for measure, mb in sample.items():
                            s.points[measure].append((now, mb))
                time.sleep(args.interval)
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGINT)
                try:
                    up.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(up.pid, signal.SIGKILL)
                    up.wait()
        if up.returncode not in (0, -signal.SIGINT, 130) and time.monotonic() < end:
            print(f"clotho up exited early with {up.returncode}; logs in {data_dir}/logs", file=sys.stderr)

    print(f"soak: {args.minutes:g} min, warm after {warmup:g} min, a sample every {args.interval:g}s")
    print(
        f"{'process':<12} {'measure':<7} {'start MB':>9} {'end MB':>9} {'MB/min':>8} {'± se':>7} "
        f"{'noise MB':>9} {'growth':>8}  verdict"
    )
    report: dict[str, dict] = {}
    for s in series.values():
        report[s.name] = {}
        for measure in MEASURES:
            warm = [p for p in s.points[measure] if p[0] >= warmup]
            f = fit(warm)
            report[s.name][measure] = {
                "points": s.points[measure],
                "fit": None if f is None else vars(f) | {"flat": f.flat},
            }
            if f is None:
                print(f"{s.name:<12} {measure:<7} (too few warm samples)")
                continue
            print(
                f"{s.name:<12} {measure:<7} {warm[0][1]:>9.1f} {warm[-1][1]:>9.1f} {f.slope:>8.3f} "
                f"{f.stderr:>7.3f} {f.noise:>9.2f} {f.growth:>8.2f}  {f.verdict}"
            )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
