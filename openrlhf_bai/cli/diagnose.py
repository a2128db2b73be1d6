"""`openrlhf-bai diagnose RUN [RUN ...]`: did a run suffer Sequence Length Collapse or a Reward Hockey Stick?

Each RUN (an OpenRLHF stdout log, a TensorBoard directory, a wandb CSV export or the plugin's JSONL) is read
into (step, metrics) rows and fed to the same detectors the live stability monitor runs
(`openrlhf_bai.diagnostics.detectors.analyze`). Exit status 0, or 3 when a phenomenon named in --fail-on is
found in any RUN, so a scheduler or CI can gate on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from openrlhf_bai.diagnostics.detectors import LENGTH_KEYS, REWARD_KEYS, Thresholds, analyze, first_value
from openrlhf_bai.diagnostics.readers import KINDS, read_rows
from openrlhf_bai.errors import BAIError

FOUND_EXIT_STATUS = 3
PHENOMENA = {"collapse": "length_collapse", "hockey": "hockey_stick"}
# metric: (names it is logged under, the phenomenon judged from it)
METRICS = {"response_length": (LENGTH_KEYS, "length collapse"), "reward": (REWARD_KEYS, "hockey stick")}


def parse_args(argv):
    default = Thresholds()
    parser = argparse.ArgumentParser(
        prog="openrlhf-bai diagnose",
        description="Find Sequence Length Collapse and Reward Hockey Sticks in OpenRLHF training runs.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="stdout log, TensorBoard directory, wandb CSV export or the plugin's JSONL")
    parser.add_argument("--kind", choices=KINDS, help="read every RUN as this kind instead of detecting it")
    parser.add_argument("--json", metavar="FILE",
                        help="write the verdicts as JSON (a list when there are several RUNs)")
    parser.add_argument("--plot", metavar="FILE.png", help="write length and reward of all RUNs in one PNG")
    parser.add_argument("--fail-on", default="", metavar="collapse,hockey",
                        help=f"exit {FOUND_EXIT_STATUS} when one of these is found in any RUN")
    parser.add_argument("--baseline-steps", type=int, default=default.baseline_steps,
                        help="first steps averaged into the baseline (default %(default)s)")
    parser.add_argument("--smoothing", type=float, default=default.smoothing,
                        help="EMA weight of the newest step, 1 = none (default %(default)s)")
    parser.add_argument("--collapse-ratio", type=float, default=default.collapse_ratio,
                        help="smoothed length / baseline below this is collapsed (default %(default)s)")
    parser.add_argument("--hockey-drawdown", type=float, default=default.hockey_drawdown,
                        help="baseline spreads the smoothed reward must fall (default %(default)s)")
    parser.add_argument("--patience", type=int, default=default.patience,
                        help="steps a condition must hold before it is raised (default %(default)s)")
    args = parser.parse_args(argv)
    args.fail_on = [name.strip() for name in args.fail_on.split(",") if name.strip()]
    unknown = [name for name in args.fail_on if name not in PHENOMENA]
    if unknown:
        parser.error(f"--fail-on: unknown {', '.join(unknown)}; choose from {', '.join(PHENOMENA)}")
    if args.baseline_steps < 1 or args.patience < 1 or not 0 < args.smoothing <= 1:
        parser.error("--baseline-steps and --patience must be >= 1, --smoothing in (0, 1]")
    for output in (args.json, args.plot):
        if output and not Path(output).resolve().parent.is_dir():
            parser.error(f"{output}: its directory does not exist")
    return args


def diagnose_run(run: str, kind: str | None, th: Thresholds) -> dict:
    """Verdict of one RUN plus what the table, JSON and plot need."""
    kind, rows = read_rows(run, kind)
    missing_steps = {
        name: sum(first_value(metrics, keys) is None for _, metrics in rows) for name, (keys, _) in METRICS.items()
    }
    if all(count == len(rows) for count in missing_steps.values()):
        looked_for = ", ".join(LENGTH_KEYS + REWARD_KEYS)
        raise BAIError(f"{run}: {len(rows)} steps but no response length or reward in any (looked for {looked_for})")
    for name, count in missing_steps.items():
        keys, phenomenon = METRICS[name]
        if count == len(rows):
            print(f"openrlhf-bai: warning: {run}: no {name} metric (looked for {', '.join(keys)}); "
                  f"{phenomenon} not assessed", file=sys.stderr)
        elif count:
            print(f"openrlhf-bai: warning: {run}: {name} missing at {count} of {len(rows)} steps; read the rest",
                  file=sys.stderr)
    verdict, per_step = analyze(rows, th)
    verdict.update(source=str(run), kind=kind, missing_steps=missing_steps)
    return {"label": Path(run).name or str(run), "rows": rows, "verdict": verdict, "per_step": per_step}


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def verdict_table(verdicts: list[dict]) -> str:
    header = ("run", "steps", "baseline length", "baseline reward", "length collapse", "reward hockey stick")
    lines = []
    for v in verdicts:
        collapse, hockey, missing = v["length_collapse"], v["hockey_stick"], v["missing_steps"]
        if missing["response_length"] == v["steps"]:
            collapse_text = "not assessed (no length)"
        elif collapse["detected"]:
            collapse_text = f"YES at step {collapse['step']} (lowest ratio {collapse['min_ratio']:.2f})"
        else:
            collapse_text = f"no (lowest ratio {_number(collapse['min_ratio'], '.2f')})"
        if missing["reward"] == v["steps"]:
            hockey_text = "not assessed (no reward)"
        elif hockey["detected"]:
            recovery = hockey["recovery_steps"]
            recovered = "not recovered" if recovery is None else f"recovered after {recovery} steps"
            hockey_text = f"YES drop at step {hockey['drop_step']}, depth {hockey['depth']:.1f} spreads, {recovered}"
        else:
            hockey_text = "no"
        lines.append((v["source"], str(v["steps"]), _number(v["baseline_length"], ".1f"),
                      _number(v["baseline_reward"], ".4g"), collapse_text, hockey_text))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *lines])


def write_json(path: str, payload) -> None:
    path = Path(path)
    # Temp file and rename: a reader never sees half a verdict.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(payload, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    th = Thresholds(baseline_steps=args.baseline_steps, smoothing=args.smoothing, collapse_ratio=args.collapse_ratio,
                    hockey_drawdown=args.hockey_drawdown, patience=args.patience)
    runs = [diagnose_run(run, args.kind, th) for run in args.runs]
    verdicts = [run["verdict"] for run in runs]
    if len({run["label"] for run in runs}) < len(runs):  # e.g. bai/tensorboard and no-bai/tensorboard
        for run in runs:
            run["label"] = run["verdict"]["source"]

    print(verdict_table(verdicts))
    if args.json:
        write_json(args.json, verdicts[0] if len(verdicts) == 1 else verdicts)
    if args.plot:
        from openrlhf_bai.diagnostics.plot import plot_runs

        plot_runs(args.plot, runs, th)

    found = [name for name in args.fail_on if any(v[PHENOMENA[name]]["detected"] for v in verdicts)]
    return FOUND_EXIT_STATUS if found else 0


if __name__ == "__main__":
    from openrlhf_bai.cli.main import run

    sys.exit(run(main, sys.argv[1:]))
