"""Soak: `clotho up` for N minutes with every process's resident memory sampled.

Starts `python -m services.cli up --steps 0` (until stopped) in a fresh data
directory, samples the memory of `clotho up` itself and of each of its children (from
/proc; Linux only) every --interval seconds, and after --minutes stops the mesh and
prints, per process, the slope over time once warm (the samples after
--warmup-minutes, default the first half of the run, so the slope is that of the second
half): a least-squares fit in MB/min with its standard error, the residual noise (MB)
and the growth over the warm window. A slope within two standard errors of zero, or
whose growth over the window is within the noise, counts as flat; so does a slope
under --floor-mb-per-hour (default 0.5 MB/h, 12 MB a day), shown as "flat<floor": a
process whose RssAnon barely moves has a residual noise of a page or two, and a slope
of a few kB a minute would otherwise count as growth.

Warm-up is what a process fills once and then keeps: allocator arenas and caches, the
tokenizer's and torch's first allocations, and structures bounded by design (the
gateway's version receipts, up to 100k distinct completions: the demo's repeat task
serves a few dozen, so they stay that small here; the trajectory store's kept batches, up
to --gateway.max_kept_batches, full within seconds). The excluded window is printed
with the table, and so are the trainer's steps in the warm window (memory that grows
per step shows in KB per 1000 steps as well as MB/min) and the load average at the
start and end (a loaded machine runs fewer steps per minute).

Two measures per process: `anon` (RssAnon: the heap and other private memory, where a
leak shows) and `rss` (VmRSS: anon plus file-backed pages such as the mapped torch
libraries, which the kernel drops and faults back in with the machine's page-cache
pressure, so its slope moves with what else runs on the machine).

The gateway's own view is sampled too (its /metrics, on a port the soak picks): SQLite's
heap in the gateway (`clotho_gateway_store_sqlite_bytes`, capped by the store at 8 MiB)
and the store's WAL on disk (`clotho_gateway_store_wal_bytes`), printed under the table
with their start, end and largest values.

Usage: python bench/soak.py [--minutes 30] [--warmup-minutes M] [--interval 5] [--out soak.json]
       python bench/soak.py --refit soak.json [--warmup-minutes M]   (the table again)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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


# The gateway's gauges the soak follows: (metric, label in the report).
GATEWAY_GAUGES = (
    ("clotho_gateway_store_sqlite_bytes", "SQLite heap"),
    ("clotho_gateway_store_wal_bytes", "WAL on disk"),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_gauges(port: int) -> dict[str, float]:
    """GATEWAY_GAUGES from the gateway's /metrics in MB ({} while it does not answer)."""
    wanted = {name for name, _ in GATEWAY_GAUGES}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return {}
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in wanted:
            with contextlib.suppress(ValueError):
                out[parts[0]] = float(parts[1]) / 2**20
    return out


def print_gateway_gauges(gauges: dict[str, list[tuple[float, float]]]) -> None:
    for name, label in GATEWAY_GAUGES:
        points = gauges.get(name) or []
        if points:
            values = [v for _, v in points]
            print(
                f"gateway {label}: {values[0]:.2f} MB at the start, {values[-1]:.2f} at the end, "
                f"{max(values):.2f} at most ({len(points)} samples)"
            )


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
    floor: float = 0.0  # MB per minute below which a slope counts as flat

    @property
    def within_noise(self) -> bool:
        return abs(self.slope) <= 2 * self.stderr or abs(self.growth) <= self.noise

    @property
    def flat(self) -> bool:
        return self.within_noise or abs(self.slope) < self.floor

    @property
    def verdict(self) -> str:
        if self.within_noise:
            return "flat"
        if self.flat:
            return "flat<floor"
        return "GROWS" if self.slope > 0 else "shrinks"


def fit(points: list[tuple[float, float]], floor: float = 0.0) -> Fit | None:
    """Least squares of (minutes, MB); `floor` in MB per minute."""
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
    return Fit(slope, stderr, noise, slope * (xs[-1] - xs[0]), n, floor)


def step_times(path: Path) -> list[float]:
    """When each trainer step ended, in minutes since the start (clotho up's step log)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    out.append(json.loads(line)["elapsed_seconds"] / 60)
    except OSError:
        pass
    return out


def _empty_points() -> dict[str, list[tuple[float, float]]]:
    return {m: [] for m in MEASURES}


@dataclass
class Series:
    name: str
    # measure -> (minutes, MB)
    points: dict[str, list[tuple[float, float]]] = field(default_factory=_empty_points)


def print_report(
    points: dict[str, dict[str, list[tuple[float, float]]]],
    steps: list[float],
    run: dict,
    warmup: float,
    floor_mb_per_hour: float,
) -> dict:
    """Print the table; return the samples, fits and run figures (the --out JSON)."""
    minutes = run["minutes"]
    warm_steps = sum(1 for t in steps if t >= warmup)
    print(
        f"soak: {minutes:g} min, a sample every {run['interval']:g}s; warm-up excluded: the first {warmup:g} min "
        f"(fits over {minutes - warmup:g} min); floor {floor_mb_per_hour:g} MB/h"
    )
    load = f"{run['load_start'][0]:.1f} at the start, {run['load_end'][0]:.1f} at the end" if "load_end" in run else "?"
    print(
        f"trainer steps: {len(steps)} in all, {warm_steps} in the warm window "
        f"({warm_steps / max(minutes - warmup, 1e-9):.0f}/min); load average {load}"
    )
    print(
        f"{'process':<12} {'measure':<7} {'start MB':>9} {'end MB':>9} {'MB/min':>8} {'± se':>7} "
        f"{'noise MB':>9} {'growth':>8} {'KB/1k st':>8}  verdict"
    )
    processes: dict[str, dict] = {}
    for name, series in points.items():
        processes[name] = {}
        for measure in MEASURES:
            warm = [p for p in series[measure] if p[0] >= warmup]
            f = fit(warm, floor_mb_per_hour / 60)
            processes[name][measure] = {
                "points": series[measure],
                "fit": None if f is None else vars(f) | {"flat": f.flat},
            }
            if f is None:
                print(f"{name:<12} {measure:<7} (too few warm samples)")
                continue
            per_kstep = f.growth * 1024 / warm_steps * 1000 if warm_steps else float("nan")
            print(
                f"{name:<12} {measure:<7} {warm[0][1]:>9.1f} {warm[-1][1]:>9.1f} {f.slope:>8.3f} "
                f"{f.stderr:>7.3f} {f.noise:>9.2f} {f.growth:>8.2f} {per_kstep:>8.1f}  {f.verdict}"
            )
    run = run | {"warmup_minutes": warmup, "floor_mb_per_hour": floor_mb_per_hour, "steps": len(steps)}
    return {"run": run | {"warm_steps": warm_steps, "step_minutes": steps}, "processes": processes}


def refit(path: Path, warmup: float | None, floor_mb_per_hour: float) -> int:
    """Print the table again from an --out JSON with another warm-up or floor (also
    reads the older JSON, a bare {process: {measure: {points}}}, without run figures)."""
    saved = json.loads(path.read_text())
    run = {"minutes": None, "interval": 5.0} | saved.get("run", {})
    processes = saved.get("processes", saved)
    points = {
        name: {m: [tuple(p) for p in series[m]["points"]] for m in MEASURES} for name, series in processes.items()
    }
    if run["minutes"] is None:
        run["minutes"] = max(p[-1][0] for series in points.values() for p in series.values() if p)
    minutes = run["minutes"]
    print_report(points, run.get("step_minutes", []), run, minutes / 2 if warmup is None else warmup, floor_mb_per_hour)
    print_gateway_gauges(saved.get("gateway_gauges", {}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the mesh runs")
    ap.add_argument(
        "--warmup-minutes", type=float, default=None, help="samples ignored at the start (default: half the run)"
    )
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument(
        "--floor-mb-per-hour", type=float, default=0.5, help="slopes below this count as flat (shown as flat<floor)"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="write the samples and fits here as JSON")
    ap.add_argument("--refit", type=Path, default=None, help="run nothing: print the table of an --out JSON again")
    args = ap.parse_args()
    if args.refit is not None:
        return refit(args.refit, args.warmup_minutes, args.floor_mb_per_hour)
    warmup = args.minutes / 2 if args.warmup_minutes is None else args.warmup_minutes
    load_start = os.getloadavg()

    http_port = free_port()
    gauges: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in GATEWAY_GAUGES}
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
            "--http-port",
            str(http_port),
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
                for name, mb in gateway_gauges(http_port).items():
                    gauges[name].append((now, mb))
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
        steps = step_times(Path(data_dir) / "steps.jsonl")
    load_end = os.getloadavg()
    points = {s.name: s.points for s in series.values()}
    run = {"minutes": args.minutes, "interval": args.interval, "load_start": load_start, "load_end": load_end}
    report = print_report(points, steps, run, warmup, args.floor_mb_per_hour)
    print_gateway_gauges(gauges)
    report["gateway_gauges"] = gauges
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
