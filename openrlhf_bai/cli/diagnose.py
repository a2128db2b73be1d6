"""`openrlhf-bai diagnose RUN [RUN ...]`: did a run suffer Sequence Length Collapse or a Reward Hockey Stick?

Each RUN (OpenRLHF, verl or TRL console logs, trainer_state.json, TensorBoard, CSV or JSONL) is read
into (step, metrics) rows and fed to the same detectors the live stability monitor runs
(`openrlhf_bai.diagnostics.detectors.analyze`). Exit status 0, or 3 when a phenomenon named in --fail-on is
found in any RUN, so a scheduler or CI can gate on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

from openrlhf_bai.atomic import check_output_file, same_file, write_text_atomic
from openrlhf_bai.diagnostics.detectors import (HELP, RENAMED, SIGNAL_KEYS, Thresholds, analyze, first_value,
                                                make_thresholds, name_signals, renamed_message)
from openrlhf_bai.diagnostics.plot import FIGURE_FORMATS, figure_format
from openrlhf_bai.diagnostics.readers import KINDS, LINE_KINDS, read_rows
from openrlhf_bai.errors import BAIError

FOUND_EXIT_STATUS = 3
PHENOMENA = {"collapse": "length_collapse", "hockey": "hockey_stick", "entropy": "entropy_collapse",
             "kl": "kl_blowup"}
# signal: the phenomenon judged from it. A run without length or reward gets a warning; most runs log no entropy and
# many no KL, so those warn only where the log holds a metric named like them.
ASSESSES = {"length": "length collapse", "reward": "hockey stick", "entropy": "entropy collapse", "kl": "KL blow-up"}
ALWAYS_WARN = ("length", "reward")
# Words of a signal's name in hand-written loops (`KL`, `mean_reward`, `avg_len`, `token_entropy`): a name holding one
# is suggested for --<signal>-key, never read unasked (a loop's `reward_std` would be taken for its reward).
SIGNAL_WORDS = {"length": ("length", "len", "tokens"), "reward": ("reward", "score", "accuracy", "correct"),
                "entropy": ("entropy",), "kl": ("kl",)}
ASIDE = {"eval", "val", "test", "std", "min", "max"}


def names_like(rows, signal: str) -> str:
    """The logged numeric metrics whose name holds a word of `signal` (at most five, as first logged), or ""."""
    known = {key for keys in SIGNAL_KEYS.values() for key in keys}
    parts = lambda key: set(re.split(r"[^a-z0-9]+", key.lower()))  # noqa: E731
    names = {key: None for _, metrics in rows for key in metrics if key not in known
             and any(part == word or len(word) > 4 and part.startswith(word)  # rewards, tokens_per_turn
                     for part in parts(key) for word in SIGNAL_WORDS[signal])}
    numeric = [key for key in names if any(first_value(metrics, (key,)) is not None for _, metrics in rows)]
    # The training level first: an evaluation's or a spread's name (eval_reward, reward_std) is rarely the one wanted.
    numeric.sort(key=lambda key: bool(ASIDE & parts(key)))
    return ", ".join(numeric[:5])


def parse_args(argv):
    default = Thresholds()
    parser = argparse.ArgumentParser(
        prog="openrlhf-bai diagnose",
        description="Find Sequence Length Collapse, Reward Hockey Sticks, entropy collapse and KL blow-ups in RL "
                    "training logs of OpenRLHF, verl and TRL.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="OpenRLHF / verl / TRL console log, trainer_state.json, TensorBoard directory, "
                             "or a CSV / JSONL file with a step column")
    parser.add_argument("--kind", choices=KINDS, help="read every RUN as this kind instead of detecting it")
    parser.add_argument("--json", metavar="FILE",
                        help="write the verdicts as JSON (a list when there are several RUNs)")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="write every signal of all RUNs in one figure, in the format of the suffix "
                             f"({', '.join(FIGURE_FORMATS)})")
    parser.add_argument("--fail-on", default="", metavar=",".join(PHENOMENA),
                        help=f"exit {FOUND_EXIT_STATUS} when one of these is found in any RUN")
    parser.add_argument("--step-key", metavar="NAME", help="the step column of a CSV / JSONL file")
    for signal in SIGNAL_KEYS:
        if signal != "truncated":
            parser.add_argument(f"--{signal}-key", metavar="NAME",
                                help=f"the metric holding the {signal}, where it is not a known name")
    parser.add_argument("--logging-steps", type=int, default=1, metavar="K",
                        help="TRL console logs: the n-th logged dict is step n x K (default 1)")
    parser.add_argument("--max-response-length", type=int, default=None, metavar="TOKENS",
                        help="the run's response-length cap (verl's max_response_length, OpenRLHF's "
                             "--rollout.max_new_tokens), to tell a length drop from the cap letting go (default: the "
                             "largest max-length metric the log holds, else none: every length fall is a collapse)")
    for name, value in asdict(default).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                            help=f"{HELP[name]} (default %(default)s)")
    for name in RENAMED:  # refused with their replacement, not as unknown options
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"renamed_{name}", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in RENAMED:
        if getattr(args, f"renamed_{name}") is not None:
            # One line, no usage: the option exists no more, and the line says what replaced it.
            message = renamed_message(name, flag=lambda key: "--" + key.replace("_", "-"))
            parser.exit(2, f"{parser.prog}: error: {message}\n")
    if args.max_response_length is not None and args.max_response_length < 1:
        parser.error("--max-response-length must be >= 1")
    args.fail_on = [name.strip() for name in args.fail_on.split(",") if name.strip()]
    unknown = [name for name in args.fail_on if name not in PHENOMENA]
    if unknown:
        parser.error(f"--fail-on: unknown {', '.join(unknown)}; choose from {', '.join(PHENOMENA)}")
    if args.logging_steps < 1:
        parser.error("--logging-steps must be >= 1")
    try:
        args.thresholds = make_thresholds({name: getattr(args, name) for name in asdict(default)},
                                          flag=lambda key: f"--{key.replace('_', '-')}")
    except BAIError as e:
        parser.error(str(e))
    check_outputs(args)
    return args


def check_outputs(args) -> None:
    """--json and --plot, before any RUN is read: a writable file, never a RUN (through links too) nor inside a
    TensorBoard RUN's directory, never each other; the plot in a figure format. Logs are never written."""
    outputs = [(flag, path) for flag, path in (("--json", args.json), ("--plot", args.plot)) if path]
    if args.json and args.plot:
        if same_file(args.json, args.plot) or os.path.abspath(args.json) == os.path.abspath(args.plot):
            raise BAIError(f"--json and --plot name the same file {args.plot}; give two paths")
    for flag, path in outputs:
        check_output_file(path, args.runs, flag)
    if args.plot:
        figure_format(args.plot)


def diagnose_run(run: str, args) -> dict:
    """Verdict of one RUN plus what the table, JSON and plot need."""
    kind, rows = read_rows(run, args.kind, step_key=args.step_key, logging_steps=args.logging_steps)
    if kind in LINE_KINDS:
        with open(run, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 65536))
            tail = log.read()
        if tail[tail.rfind(b"\n") + 1:].strip():  # 8 of 134 published logs end so: their last step would go unseen
            print(f"openrlhf-bai: warning: {run}: its last line has no newline and is not read (a log being written "
                  "ends in half a line); if the run has finished, that line is its last step: end the file with one",
                  file=sys.stderr)
    if getattr(rows, "restarts", 0):
        print(f"openrlhf-bai: warning: {run}: its steps go back {rows.restarts} time(s) (a resumed run, or several "
              "runs in one file): the later rows replace the earlier from the step they restart at", file=sys.stderr)
    name_signals(rows, {signal: getattr(args, f"{signal}_key", None) for signal in SIGNAL_KEYS})
    # A step that logged none of the signals (verl's step 0 holds only validation scores) is no training step.
    trained = [row for row in rows if any(first_value(row[1], keys) is not None for keys in SIGNAL_KEYS.values())]
    if not trained:
        looked_for = ", ".join(SIGNAL_KEYS["length"] + SIGNAL_KEYS["reward"])
        named = "; ".join(f"--{signal}-key: {names}" for signal in SIGNAL_WORDS if (names := names_like(rows, signal)))
        raise BAIError(f"{run}: {len(rows)} steps but no response length, reward, entropy or KL in any (looked for "
                       f"{looked_for}, ...; name yours with --length-key / --reward-key"
                       + (f"; it logs, for {named})" if named else ")"))
    rows = trained
    missing_steps = {
        signal: sum(first_value(metrics, keys) is None for _, metrics in rows) for signal, keys in SIGNAL_KEYS.items()
    }
    for signal, phenomenon in ASSESSES.items():
        count = missing_steps[signal]
        named = names_like(rows, signal) if count == len(rows) else ""
        if count == len(rows) and (signal in ALWAYS_WARN or named):
            hint = f"; it logs {named}: pass --{signal}-key NAME to read one as the {signal}" if named else ""
            print(f"openrlhf-bai: warning: {run}: no {signal} metric (looked for {', '.join(SIGNAL_KEYS[signal])}); "
                  f"{phenomenon} not assessed{hint}", file=sys.stderr)
        elif count and signal in ALWAYS_WARN:
            print(f"openrlhf-bai: warning: {run}: {signal} missing at {count} of {len(rows)} steps; read the rest",
                  file=sys.stderr)
    verdict, per_step = analyze(rows, args.thresholds, cap=args.max_response_length)
    # Older names: response_length and reward were the two signals of 0.1's JSON.
    verdict.update(source=str(run), kind=kind,
                   missing_steps={("response_length" if k == "length" else k): v for k, v in missing_steps.items()})
    path = Path(run)
    label = path.parent.name if "tfevents" in path.name else path.name  # an event file: its run's folder
    return {"label": label or str(run), "rows": rows, "verdict": verdict, "per_step": per_step}


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _strength(found: dict) -> str:
    """How strong a detection is, and whether --bai.on_collapse save/stop would have acted on it."""
    sustained = found.get("sustained_step")
    return (f"strength {_number(found.get('max_strength'), '.1f')} noise units, "
            + ("not sustained" if sustained is None else f"sustained at step {sustained}"))


def _episodes(episodes: list[dict], first: bool = True, found: dict | None = None) -> str:
    """Where a detection ended (its signal came back) and was raised again; with the detector's verdict `found`,
    whether a raise still open at the end of the log has its level back above the threshold there."""
    text = ""
    for i, episode in enumerate(episodes):
        if i or not first:
            text += f", again at step {episode['step']}"
        if episode["recovery_step"] is not None:
            text += f", back from step {episode['recovery_step']}"
    if found and episodes and episodes[-1]["recovery_step"] is None and found["unrecovered_step"] is None:
        text += ", above its threshold at the end (not yet halfway back)"
    return text


def verdict_table(verdicts: list[dict]) -> str:
    header = ("run", "steps", "ref length", "ref reward", "length collapse", "reward hockey stick",
              "entropy collapse", "KL blow-up")
    lines = []
    for v in verdicts:
        missing = v["missing_steps"]
        collapse, drop = v["length_collapse"], v["truncation_drop"]
        if missing["response_length"] == v["steps"]:
            collapse_text = "not assessed (no length)"
        elif collapse["detected"]:
            collapse_text = (f"YES at step {collapse['step']} (lowest ratio {collapse['min_ratio']:.2f}, "
                             f"{_strength(collapse)}){_episodes(collapse['episodes'], found=collapse)}")
        elif drop["detected"]:
            collapse_text = (f"no: truncation-cap drop at step {drop['step']} (truncated "
                             f"{_number(drop['truncated_rate_before'], '.0%')} -> "
                             f"{_number(drop['truncated_rate_after'], '.0%')}; the untruncated responses kept "
                             f"{_number(drop['untruncated_ratio'], '.0%')} of their length)")
        else:
            collapse_text = f"no (lowest ratio {_number(collapse['min_ratio'], '.2f')})"
        hockey = v["hockey_stick"]
        if missing["reward"] == v["steps"]:
            hockey_text = "not assessed (no reward)"
        elif hockey["detected"]:
            recovery = hockey["recovery_steps"]
            recovered = "not recovered" if recovery is None else f"recovered after {recovery} steps"
            hockey_text = (f"YES drop at step {hockey['drop_step']}, depth {hockey['depth']:.1f} noise units, "
                           f"{recovered} ({_strength(hockey)}){_episodes(hockey['episodes'][1:], first=False)}")
        else:
            hockey_text = "no"
        ratio_texts = []
        for signal, key, field, word in (("entropy", "entropy_collapse", "min_ratio", "lowest"),
                                         ("kl", "kl_blowup", "max_ratio", "highest")):
            found = v[key]
            if missing[signal] == v["steps"]:
                ratio_texts.append("not assessed")
            elif found["detected"]:
                ratio_texts.append(f"YES at step {found['step']} ({word} ratio {_number(found[field], '.2f')}, "
                                   f"{_strength(found)}){_episodes(found['episodes'], found=found)}")
            else:
                ratio_texts.append(f"no ({word} ratio {_number(found[field], '.2f')})")
        lines.append((v["source"], str(v["steps"]), _number(v["baseline_length"], ".1f"),
                      _number(v["baseline_reward"], ".4g"), collapse_text, hockey_text, *ratio_texts))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *lines])


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = [diagnose_run(run, args) for run in args.runs]
    verdicts = [run["verdict"] for run in runs]
    if len({run["label"] for run in runs}) < len(runs):  # e.g. bai/tensorboard and no-bai/tensorboard
        for run in runs:
            run["label"] = run["verdict"]["source"]

    print(verdict_table(verdicts))
    if args.json:
        write_text_atomic(args.json, json.dumps(verdicts[0] if len(verdicts) == 1 else verdicts, indent=2) + "\n")
    if args.plot:
        from openrlhf_bai.diagnostics.plot import plot_runs

        plot_runs(args.plot, runs, args.thresholds)

    found = [name for name in args.fail_on if any(v[PHENOMENA[name]]["detected"] for v in verdicts)]
    return FOUND_EXIT_STATUS if found else 0


if __name__ == "__main__":
    from openrlhf_bai.cli.main import run

    sys.exit(run(main, sys.argv[1:]))
