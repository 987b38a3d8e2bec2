"""The picture `clotho up` leaves beside its summary: mean score per step (overall and
per environment) above weight-sync time per step, as one PNG.

matplotlib draws with its Agg backend (no display needed) and is imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_plot(steps: Sequence[dict[str, Any]], path: Path, title: str = "clotho up") -> Path:
    """Draw the trainer's step records (`{"event": "step", ...}` lines) into `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [int(s.get("step", i + 1)) for i, s in enumerate(steps)]
    scores = [float(s.get("mean_score", 0.0)) for s in steps]
    sync_ms = [float(s.get("sync_seconds") or 0.0) * 1e3 for s in steps]
    envs: dict[str, list[tuple[int, float]]] = {}
    for x, s in zip(xs, steps):
        for env, score in (s.get("env_mean_scores") or {}).items():
            envs.setdefault(str(env), []).append((x, float(score)))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=(3, 2))
    try:
        window = max(1, min(10, len(scores) // 5))
        # Short runs: every step as a marked point; longer ones: faint steps under a moving average.
        marker = "o" if len(scores) <= 30 else None
        top.plot(
            xs,
            scores,
            color="#1f77b4",
            linewidth=1.0,
            alpha=0.35 if window > 1 else 1.0,
            marker=marker,
            label="mean score",
        )
        if window > 1:
            smooth = []
            for i in range(len(scores)):
                recent = scores[max(0, i - window + 1) : i + 1]
                smooth.append(sum(recent) / len(recent))
            top.plot(xs, smooth, color="#1f77b4", linewidth=2.0, label=f"mean score ({window}-step average)")
        if len(envs) > 1:
            for env, points in sorted(envs.items()):
                top.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.0, label=env)
        top.set_ylabel("mean score")
        top.set_title(title)
        top.grid(alpha=0.3)
        top.legend(loc="best", fontsize="small")

        bottom.bar(xs, sync_ms, color="#ff7f0e", width=0.8)
        bottom.set_ylabel("weight sync (ms)")
        bottom.set_xlabel("trainer step")
        bottom.grid(alpha=0.3, axis="y")
        if sync_ms and any(sync_ms):
            mean = sum(sync_ms) / len(sync_ms)
            bottom.axhline(mean, color="#555555", linestyle="--", linewidth=1.0, label=f"mean {mean:.1f} ms")
            bottom.legend(loc="upper right", fontsize="small", framealpha=0.9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


__all__ = ["PNG_SIGNATURE", "write_plot"]
