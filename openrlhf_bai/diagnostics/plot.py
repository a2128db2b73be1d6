"""The `diagnose --plot` figure: response length and reward of one or more runs, as in the paper's Figures 2-3.

Top panel: response length (thin: as logged, thick: smoothed as the detector sees it), its baseline (dashed)
and the collapse threshold (dotted). Bottom panel: reward as logged and, on the right axis, its drawdown in
baseline spreads with the hockey-stick threshold. Shaded: steps flagged as collapsed (top) and the hockey
stick from its drop to its recovery (bottom). Each run has one colour.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from openrlhf_bai.diagnostics.detectors import LENGTH_KEYS, REWARD_KEYS, Thresholds, first_value


def _spans(steps_flags: list[tuple[int, bool]]) -> list[tuple[int, int]]:
    """Contiguous (first, last) step ranges where the flag is set."""
    spans: list[list[int]] = []
    previous_flag = False
    for step, flag in steps_flags:
        if flag and previous_flag:
            spans[-1][1] = step
        elif flag:
            spans.append([step, step])
        previous_flag = flag
    return [(first, last) for first, last in spans]


def _series(rows, keys) -> tuple[list[int], list[float]]:
    points = [(step, first_value(metrics, keys)) for step, metrics in rows]
    points = [(step, value) for step, value in points if value is not None]
    return [step for step, _ in points], [value for _, value in points]


def plot_runs(path: str | Path, runs: list[dict], th: Thresholds) -> None:
    """Write the PNG; each run is a dict with label, rows, verdict and per_step (from detectors.analyze)."""
    # No pyplot: a bare Figure on the Agg canvas needs no display and leaves no global state behind.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = Figure(figsize=(10, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_length, ax_reward = fig.subplots(2, 1, sharex=True)
    ax_drawdown = ax_reward.twinx()
    colors = [f"C{i % 10}" for i in range(len(runs))]

    for run, color in zip(runs, colors):
        verdict, per_step = run["verdict"], run["per_step"]
        last_step = run["rows"][-1][0]

        steps, lengths = _series(run["rows"], LENGTH_KEYS)
        ax_length.plot(steps, lengths, color=color, lw=0.8, alpha=0.45)
        baseline = verdict["baseline_length"]
        if baseline is not None:
            smoothed = [(p["step"], p["bai/response_length_ratio"] * baseline) for p in per_step
                        if "bai/response_length_ratio" in p]
            ax_length.plot([s for s, _ in smoothed], [v for _, v in smoothed], color=color, lw=2, label=run["label"])
            ax_length.axhline(baseline, color=color, ls="--", lw=0.9)
            ax_length.axhline(th.collapse_ratio * baseline, color=color, ls=":", lw=1.2)
        for first, last in _spans([(p["step"], p.get("bai/length_collapse") == 1.0) for p in per_step]):
            ax_length.axvspan(first, last, color=color, alpha=0.15, lw=0)

        steps, rewards = _series(run["rows"], REWARD_KEYS)
        ax_reward.plot(steps, rewards, color=color, lw=1.4, label=run["label"])
        drawdown = [(p["step"], p["bai/reward_drawdown"]) for p in per_step if "bai/reward_drawdown" in p]
        ax_drawdown.plot([s for s, _ in drawdown], [v for _, v in drawdown], color=color, ls="--", lw=0.9)
        hockey = verdict["hockey_stick"]
        if hockey["detected"]:
            end = last_step if hockey["recovery_steps"] is None else hockey["drop_step"] + hockey["recovery_steps"]
            ax_reward.axvspan(hockey["drop_step"], end, color=color, alpha=0.15, lw=0, hatch="//")

    ax_drawdown.axhline(th.hockey_drawdown, color="grey", ls=":", lw=1.2)
    ax_drawdown.set_ylabel("reward drawdown (baseline spreads)")
    ax_length.set_title("Response length")
    ax_length.set_ylabel("mean response length (tokens)")
    ax_reward.set_title("Reward")
    ax_reward.set_ylabel("mean reward")
    ax_reward.set_xlabel("global step")

    grey = "dimgrey"
    ax_length.legend(
        handles=ax_length.get_legend_handles_labels()[0]
        + [
            Line2D([], [], color=grey, lw=0.8, alpha=0.45, label="as logged"),
            Line2D([], [], color=grey, ls="--", lw=0.9, label="baseline"),
            Line2D([], [], color=grey, ls=":", lw=1.2, label=f"collapse threshold ({th.collapse_ratio:g} x baseline)"),
            Patch(color=grey, alpha=0.25, label="length collapse"),
        ],
        fontsize="small",
    )
    ax_reward.legend(
        handles=ax_reward.get_legend_handles_labels()[0]
        + [
            Line2D([], [], color=grey, ls="--", lw=0.9, label="drawdown (right axis)"),
            Line2D([], [], color=grey, ls=":", lw=1.2,
                   label=f"hockey-stick threshold ({th.hockey_drawdown:g} spreads)"),
            Patch(facecolor=grey, alpha=0.25, hatch="//", label="hockey stick: drop to recovery"),
        ],
        fontsize="small",
    )

    path = Path(path)
    # Written next to the target and renamed, so an interrupted run leaves no half-written PNG.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            fig.savefig(out, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
