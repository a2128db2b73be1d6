"""The corpus's labelling rule (README.md, "How labels were decided"), as a standalone script.

Reads one run directory (provenance.json + its data file, with openrlhf_bai.diagnostics.readers.read_rows) and
prints the rule's verdict per event and the numbers behind it, to paste into label.json's `notes`. It does not
use the project's detectors (openrlhf_bai.diagnostics.detectors): labels come from the rule only.

    PYTHONPATH=$PWD .venv/bin/python tests/data/curves/label_rule.py tests/data/curves/<run>   # one run
    PYTHONPATH=$PWD .venv/bin/python tests/data/curves/label_rule.py --compare tests/data/curves  # vs label.json

The rule is counted in log points. With n log points of a metric: start = median of the first
k = max(1, min(10, n // 10)) points; level at a point = median of the last w = max(1, min(5, n // 10)) points
(undefined before w points exist, except for KL, where the first points use what there is).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from openrlhf_bai.diagnostics.readers import read_rows

EVENTS = ("length_collapse", "truncation_drop", "hockey_stick", "entropy_collapse", "kl_blowup")
# Fallback metric names where provenance.json's metric_names does not name one present in the log.
FALLBACK = {
    "length": ("completions/mean_length", "completion_length", "response_length/mean", "rollout/response_length_mean"),
    "reward": ("reward", "critic/score/mean", "rollout/reward_mean"),
    "entropy": ("entropy", "actor/entropy", "actor/entropy_loss", "entropy_loss"),
    "kl": ("kl", "actor/kl_loss", "critic/kl", "rollout/kl"),
    "truncated_rate": ("completions/clipped_ratio", "response_length/clip_ratio", "rollout/truncated_rate"),
    "non_truncated_length": ("completions/mean_terminated_length",),
}


def g(x: float) -> str:
    return f"{x:.4g}"


def ratio(x: float, start: float) -> float:
    """x / start for the notes; NaN where the start is 0 (an entropy logged as 0 at first, every response truncated)."""
    return x / start if start else math.nan


def windows(n: int) -> tuple[int, int]:
    return max(1, min(10, n // 10)), max(1, min(5, n // 10))


def levels(values: list[float], w: int, partial: bool = False) -> list[float | None]:
    """Trailing median of w points at each point (None before w points exist unless `partial`)."""
    out = []
    for i in range(len(values)):
        if i + 1 < w and not partial:
            out.append(None)
        else:
            out.append(statistics.median(values[max(0, i + 1 - w): i + 1]))
    return out


def series(rows, name):
    pts = [(s, m[name]) for s, m in rows if name in m and m[name] is not None and math.isfinite(m[name])]
    return [s for s, _ in pts], [v for _, v in pts]


def logged(rows, provenance, role):
    """(name, steps, values) of the metric playing `role`, or (None, [], []) when the log has none."""
    name = pick(rows, provenance, role)
    return (name, *series(rows, name)) if name else (None, [], [])


def pick(rows, provenance, role):
    # a column with no finite value (a KL logged as nan on every row) is not logged
    present = {k for _, m in rows for k, v in m.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    named = (provenance.get("metric_names") or {}).get(role)
    for name in ((named,) if named else ()) + FALLBACK[role]:
        if name and name in present:
            return name
    return None


def length_rule(steps, values):
    """(onset index or None, start, levels). Level below 50 % of start, never back above 60 % afterwards."""
    k, w = windows(len(values))
    start = statistics.median(values[:k])
    lv = levels(values, w)
    onset = None
    for i, x in enumerate(lv):
        if x is None or x >= 0.5 * start:
            continue
        if all(y is None or y <= 0.6 * start for y in lv[i:]):
            onset = i
            break
    return onset, start, lv


def length_collapse(rows, provenance, cap):
    out, notes = {"length_collapse": {"present": False, "onset_step": None},
                  "truncation_drop": {"present": False, "onset_step": None}}, []
    name = pick(rows, provenance, "length")
    if name is None:
        notes.append("Length is not logged -> length_collapse/truncation_drop false")
        for e in out.values():
            e["present"] = None
        return out, notes
    steps, values = series(rows, name)
    onset, start, lv = length_rule(steps, values)
    k, w = windows(len(values))
    valid = [x for x in lv if x is not None]
    notes.append(f"length {name}: start(median first {k} pts)={g(start)}, {w}-pt level min={g(min(valid))} "
                 f"({ratio(min(valid), start):.2f}), last={g(valid[-1])} ({ratio(valid[-1], start):.2f}); "
                 f"raw min/max {g(min(values))}/{g(max(values))}")
    if onset is None:
        return out, notes
    step = steps[onset]
    # Truncation: the untruncated responses' length, logged or estimated from the truncated share and the cap.
    nt_name, tr_name = pick(rows, provenance, "non_truncated_length"), pick(rows, provenance, "truncated_rate")
    nt = None
    if nt_name:
        nt_steps, nt_values = series(rows, nt_name)
        nt_src = nt_name
    elif tr_name and cap:
        nt_steps, nt_values = [], []
        for s, m in rows:
            if name in m and tr_name in m and m[tr_name] < 1:
                r = m[tr_name]
                nt_steps.append(s)
                nt_values.append((m[name] - r * cap) / (1 - r))
        nt_src = f"(mean - r*cap)/(1 - r), r={tr_name}, cap={cap}"
    else:
        nt_steps = None
    if nt_steps:
        nk, nw = windows(len(nt_values))
        nt_start = statistics.median(nt_values[:nk])
        nt_lv = levels(nt_values, nw)
        after = [x for s, x in zip(nt_steps, nt_lv) if s >= step and x is not None]
        nt_valid = [x for x in nt_lv if x is not None]
        held = bool(after) and min(after) >= 0.6 * nt_start
        nt_onset, _, _ = length_rule(nt_steps, nt_values)
        notes.append(f"non-truncated length {nt_src}: start={g(nt_start)}, level min {g(min(nt_valid))} "
                     f"({ratio(min(nt_valid), nt_start):.2f}), min from the onset on {g(min(after)) if after else '-'} "
                     f"({ratio(min(after), nt_start) if after else float('nan'):.2f}), last {g(nt_valid[-1])} "
                     f"({ratio(nt_valid[-1], nt_start):.2f}); collapse by itself at "
                     f"{nt_steps[nt_onset] if nt_onset is not None else 'none'}")
        nt = held
    event = "truncation_drop" if nt else "length_collapse"
    out[event] = {"present": True, "onset_step": step}
    notes.append(f"length level below 50 % of the start from step {step} (level {g(lv[onset])}, "
                 f"{ratio(lv[onset], start):.2f}) and never back above 60 %: {event}"
                 + ("" if nt_steps else " (no truncated share / untruncated length logged)"))
    return out, notes


def hockey_stick(rows, provenance):
    name, steps, values = logged(rows, provenance, "reward")
    ev = {"present": False, "drop_step": None, "recovery_step": None}
    if name is None:
        return dict(ev, present=None), ["Reward is not logged -> hockey_stick false"]
    n = len(values)
    if n < 30:
        return ev, [f"reward {name}: {n} points (< 30): the hockey-stick rule does not apply"]
    W = 20 if n >= 60 else 10
    lv = [sum(values[i + 1 - W: i + 1]) / W if i + 1 >= W else None for i in range(n)]
    diffs = [b - a for a, b in zip(values, values[1:])]
    sigma = statistics.pstdev(diffs) / math.sqrt(2)
    valid = [x for x in lv if x is not None]
    need = max(0.5 * (max(valid) - min(valid)), 4 * sigma / math.sqrt(W))
    note = (f"reward {name}: {W}-pt trailing mean first/min/max/last {g(valid[0])}/{g(min(valid))}/{g(max(valid))}/"
            f"{g(valid[-1])}, point noise sigma={g(sigma)}, fall needed={g(need)}")
    peak = -math.inf
    for i in range(n):
        if lv[i] is None:
            continue
        peak = max(peak, lv[i])
        if peak - lv[i] < need:
            continue
        follow = lv[i + 1: i + 11]
        stays = all(peak - x >= need / 2 for x in follow)
        if not stays:
            continue
        if len(follow) < 10:
            ev["undecided_from_step"] = steps[i]
            note += (f"; the level is {g(peak - lv[i])} below its peak {g(peak)} at step {steps[i]} and stays down "
                     f"to the end, but only {len(follow)} points follow (the rule needs 10): undecided from "
                     f"step {steps[i]}")
            return ev, [note]
        # The fall: recovery = first point after the trough back within 20 % of the depth of the peak.
        trough_i, recovery = i, None
        for j in range(i, n):
            if lv[j] < lv[trough_i]:
                trough_i = j
            if j > trough_i and lv[j] >= peak - 0.2 * (peak - lv[trough_i]):
                recovery = j
                break
        ev = {"present": True, "drop_step": steps[i], "recovery_step": steps[recovery] if recovery else None,
              "recovered": recovery is not None}
        note += (f"; reward fall from level {g(peak)} to {g(lv[trough_i])} at step {steps[i]} (trough "
                 f"{steps[trough_i]}), recovery {steps[recovery] if recovery else 'none'}")
        return ev, [note]
    return ev, [note]


def entropy_collapse(rows, provenance):
    name, steps, values = logged(rows, provenance, "entropy")
    ev = {"present": False, "onset_step": None}
    if name is None:
        return dict(ev, present=None), ["Entropy is not logged -> entropy_collapse false"]
    k, w = windows(len(values))
    start = statistics.median(values[:k])
    lv = levels(values, w)

    def low(x):
        return x is not None and x <= 0.2 * start and x <= 0.1

    valid = [x for x in lv if x is not None]
    note = (f"entropy {name}: start {g(start)}, level min {g(min(valid))} ({ratio(min(valid), start):.2f}), "
            f"last {g(valid[-1])} ({ratio(valid[-1], start):.2f})")
    if low(valid[-1]):
        for i, x in enumerate(lv):
            if low(x) and all(y <= 0.3 * start for y in lv[i:]):
                ev = {"present": True, "onset_step": steps[i]}
                note += (f"; at or below 20 % of the start and 0.1 from step {steps[i]} (level {g(x)}), never back "
                         f"above 30 % of the start")
                break
    return ev, [note]


def kl_blowup(rows, provenance):
    name, steps, values = logged(rows, provenance, "kl")
    ev = {"present": False, "onset_step": None}
    if name is None:
        return dict(ev, present=None), ["KL is not logged -> kl_blowup false"]
    k, w = windows(len(values))
    lv = levels(values, w, partial=True)
    imax = max(range(len(values)), key=lambda i: values[i])
    note = (f"kl {name}: first {g(values[0])}, {w}-pt level max {g(max(lv))}, last {g(lv[-1])}, "
            f"raw max {g(values[imax])} at step {steps[imax]}")
    run = 0
    for i, x in enumerate(lv):
        run = run + 1 if x > 1.0 else 0
        if run == 3:
            ev = {"present": True, "onset_step": steps[i - 2]}
            note += f"; level above 1 nat on 3+ consecutive points from step {steps[i - 2]}"
            return ev, [note]
    if run:
        ev["undecided_from_step"] = steps[len(lv) - run]
        note += (f"; level above 1 nat at the last {run} point(s) only (the rule needs 3): undecided from step "
                 f"{steps[len(lv) - run]}")
    return ev, [note]


def label(run: Path) -> tuple[dict, str]:
    provenance = json.loads((run / "provenance.json").read_text())
    raw = json.loads((run / "label.json").read_text()) if (run / "label.json").is_file() else {}
    cap = raw.get("max_response_length") or provenance.get("max_response_length")
    _, rows = read_rows(run / provenance["file"], logging_steps=int(provenance.get("logging_steps") or 1))
    verdict, notes = length_collapse(rows, provenance, cap)
    for event, fn in (("hockey_stick", hockey_stick), ("entropy_collapse", entropy_collapse),
                      ("kl_blowup", kl_blowup)):
        verdict[event], more = fn(rows, provenance)
        notes += more
    for ev in verdict.values():  # not logged -> false (the notes say so)
        if ev["present"] is None:
            ev["present"] = False
    return verdict, "By the corpus rule: " + "; ".join(notes)


def summary(verdict: dict) -> str:
    parts = []
    for name in EVENTS:
        ev = verdict.get(name) or {}
        if ev.get("present"):
            onset = ev.get("onset_step", ev.get("drop_step"))
            parts.append(f"{name}@{onset}" + (f"(rec {ev.get('recovery_step')})" if name == "hockey_stick" else ""))
        if ev.get("undecided_from_step") is not None:
            parts.append(f"{name} undecided from {ev['undecided_from_step']}")
    return ", ".join(parts) or "healthy"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a run directory, or with --compare the corpus directory")
    parser.add_argument("--compare", action="store_true", help="compare the rule with every run's label.json")
    parser.add_argument("--json", action="store_true", help="print the verdict as label.json fields")
    args = parser.parse_args()
    if not args.compare:
        verdict, notes = label(Path(args.path))
        print(json.dumps(verdict, indent=2) if args.json else summary(verdict))
        print(notes)
        return 0
    differ = 0
    for run in sorted(p for p in Path(args.path).iterdir() if (p / "label.json").is_file()):
        verdict, _ = label(run)
        stored = json.loads((run / "label.json").read_text())
        stored_s, rule_s = summary(stored), summary(verdict)
        same = stored_s == rule_s
        differ += not same
        print(f"{'same' if same else 'DIFF'}  {run.name}: label {stored_s} | rule {rule_s}")
    print(f"{differ} run(s) differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
