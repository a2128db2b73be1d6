"""The `diagnose --plot` figure: what the detectors saw, for one run or several of any scale.

One panel per signal any run logged, each run as the detector's own scale-free view of it, so runs of different
lengths, reward models and frameworks share an axis: response length / its reference, reward drawdown in noise
units, entropy / its reference, KL / its reference. The threshold is a dotted line, each detection a marker at
its step (and the collapsed or dropped span shaded). One colour per run; legends sit outside the axes.
"""

from __future__ import annotations

from pathlib import Path

from openrlhf_bai.atomic import write_atomic
from openrlhf_bai.diagnostics.detectors import SIGNAL_KEYS, Thresholds, first_value
from openrlhf_bai.errors import BAIError

# What a figure path may end with: the format is the suffix's (matplotlib writes each without extra packages).
FIGURE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps")

# (per-step metric, verdict key, where the detection step is, panel title, y label, threshold from Thresholds,
#  the logged signal drawn faintly on a right axis when the figure shows one run)
PANELS = (
    ("bai/response_length_ratio", "length_collapse", "step", "Response length", "length level / reference",
     lambda th: th.collapse_ratio, "length"),
    ("bai/reward_drawdown", "hockey_stick", "drop_step", "Reward", "drawdown below reference (noise units)",
     lambda th: th.noise_units, "reward"),
    ("bai/entropy_ratio", "entropy_collapse", "step", "Policy entropy", "entropy level / highest level",
     lambda th: th.entropy_ratio, "entropy"),
    ("bai/kl_ratio", "kl_blowup", "step", "KL", "KL level / reference", lambda th: th.kl_factor, "kl"),
)


def plot_runs(path: str | Path, runs: list[dict], th: Thresholds) -> None:
    """Write the figure (format from the suffix of `path`); each run is a dict with label, verdict and per_step
    (from detectors.analyze)."""
    # No pyplot: a bare Figure on the Agg canvas needs no display and leaves no global state behind.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = [panel for panel in PANELS if any(panel[0] in p for run in runs for p in run["per_step"])]
    panels = panels or list(PANELS[:2])
    fig = Figure(figsize=(11, 2.6 * len(panels) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    colors = [f"C{i % 10}" for i in range(len(runs))]

    for ax, (metric, key, step_key, title, ylabel, threshold, signal) in zip(axes, panels):
        if len(runs) == 1 and runs[0].get("rows"):
            # The numbers as logged, every point: the detector's view starts only once it has a reference.
            logged = [(step, first_value(m, SIGNAL_KEYS[signal])) for step, m in runs[0]["rows"]]
            logged = [(step, v) for step, v in logged if v is not None]
            if logged:
                right = ax.twinx()
                right.plot([s for s, _ in logged], [v for _, v in logged], color="grey", lw=0.9, alpha=0.6)
                right.set_ylabel(f"{signal} as logged", fontsize="small", color="grey")
                right.tick_params(axis="y", labelcolor="grey", labelsize="small")
        for run, color in zip(runs, colors):
            points = [(p["step"], p[metric]) for p in run["per_step"] if metric in p]
            if not points:
                continue
            ax.plot([s for s, _ in points], [v for _, v in points], color=color, lw=1.6, label=run["label"])
            found = run["verdict"][key]
            if found["detected"]:
                step = found[step_key]
                value = dict(points).get(step)
                ax.axvline(step, color=color, lw=0.8, ls="--", alpha=0.7)
                if value is not None:
                    ax.plot([step], [value], marker="X", ms=11, color=color, mec="black", ls="none")
            if key == "length_collapse" and run["verdict"]["truncation_drop"]["detected"]:
                step = run["verdict"]["truncation_drop"]["step"]
                ax.axvline(step, color=color, lw=0.8, ls="-.", alpha=0.7)
        ax.axhline(threshold(th), color="grey", ls=":", lw=1.2)
        ax.set_title(title, loc="left", fontsize="medium")
        ax.set_ylabel(ylabel, fontsize="small")
        if metric == "bai/kl_ratio":
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=0)
    axes[-1].set_xlabel("global step")

    grey = "dimgrey"
    handles = [Line2D([], [], color=c, lw=1.6, label=run["label"]) for run, c in zip(runs, colors)] + [
        Line2D([], [], color=grey, ls=":", lw=1.2, label="threshold"),
        Line2D([], [], color=grey, marker="X", mec="black", ls="--", lw=0.8, label="detected here"),
        Line2D([], [], color=grey, ls="-.", lw=0.8, label="length drop from the truncation cap"),
    ] + ([Line2D([], [], color="grey", lw=0.9, alpha=0.6, label="as logged (right axis)")] if len(runs) == 1 else [])
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")

    save_figure(fig, path)


def figure_format(path: str | Path, flag: str = "--plot") -> str:
    """The format `path` asks for by its suffix; one BAIError line for a suffix that is no figure format."""
    suffix = Path(path).suffix.lower().removeprefix(".")
    if suffix not in FIGURE_FORMATS:
        raise BAIError(f"{flag} {path}: {'.' + suffix if suffix else 'no suffix'} is not a figure format; end the "
                       f"name with one of {', '.join('.' + f for f in FIGURE_FORMATS)}")
    return suffix


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure in the format of its suffix, atomically (an interrupted run leaves no half file)."""
    fmt = figure_format(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=100))
