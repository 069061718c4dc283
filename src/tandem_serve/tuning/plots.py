"""PNG plots of a profile and of a tuning run (matplotlib, optional: skipped with a warning when absent)."""

from __future__ import annotations

import logging
from pathlib import Path

from tandem_serve.tuning.profile import Profile

logger = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written (pip install 'tandem-serve[plots]')")
        return None
    return plt


def plot_profile(profile: Profile, path: Path) -> bool:
    """Throughput and latency against batch size, one column per stage, one line per device/precision/size."""
    plt = _pyplot()
    if plt is None:
        return False
    stages = list(dict.fromkeys(t.stage for t in profile.stages))
    figure, axes = plt.subplots(2, len(stages), figsize=(3.2 * len(stages), 6), squeeze=False)
    for column, stage in enumerate(stages):
        rows = [t for t in profile.stages if t.stage == stage]
        for key in dict.fromkeys((t.device, t.precision, t.size) for t in rows):
            line = sorted((t for t in rows if (t.device, t.precision, t.size) == key), key=lambda t: t.batch)
            label = f"{key[0]} {key[1]} @{key[2]}".replace(" -", "")
            axes[0][column].plot([t.batch for t in line], [t.items_per_s for t in line], marker="o", label=label)
            axes[1][column].plot([t.batch for t in line], [t.seconds * 1e3 for t in line], marker="o", label=label)
        axes[0][column].set_title(stage)
        for row, unit in ((0, "items/s"), (1, "ms per call")):
            axes[row][column].set_xscale("log", base=2)
            axes[row][column].set_yscale("log")
            axes[row][column].set_xlabel("batch")
            axes[row][column].set_ylabel(unit)
        axes[0][column].legend(fontsize=6)
    figure.suptitle(f"tandem profile: {profile.machine.get('gpus') or 'CPU only'}, {profile.machine.get('cpus')} cores")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: Path, title: str) -> bool:
    """Latency (p99 ms) against throughput, one line per labelled curve (e.g. before / after tuning)."""
    plt = _pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axis.set_xlabel("throughput (items/s)")
    axis.set_ylabel("p99 latency (ms)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
