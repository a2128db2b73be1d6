"""Labeled training curves for measuring the detectors: real published runs and seeded synthetic ones.

A curve is a dict: name, origin ("real" or "synthetic"), source (where it came from: the repository for a real
run), rows [(step, metrics)], logging_steps, cap (the run's response-length limit, when known) and a label per
event of EVENTS, {"present": bool, "onset": step or None} (for the hockey stick also "recovery"). A hockey stick
is a sustained fall of the reward, recovered or not (the corpus README's rule; the recovery is recorded).
The onset is the first
log point at which the event has reached the size that makes it one: length below about 60 % of where it was, the
first point of a reward drop, entropy below about 30 %, KL several times its level; recovery is the first point
back at the reward's level before the drop.

- real_curves(root): every `<root>/<run>/` with provenance.json (where the run came from, its file and format)
  and label.json (what the curve does, by the rule in tests/data/curves/README.md; its source, noise class, batch
  and generation cap, which each curve carries as "source", "noise_class", "batch", "max_response_length").
- synthetic_curves(seed): what real runs do and the real corpus lacks: the paper's Figure 2 and 3 shapes,
  entropy collapse, KL blow-up, a drop from the truncation cap, and healthy regimes that trip naive detectors
  (length rising to the cap, a slow decline under a length penalty, small-batch binomial rewards, rewards
  starting at zero, an early length dip that comes back, sparse logging, a run resumed at step 500, NaN steps).
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

from openrlhf_bai.diagnostics.detectors import DETECTORS, SIGNAL_KEYS, first_value, name_signals
from openrlhf_bai.diagnostics.readers import read_rows

LENGTH, REWARD, ENTROPY, KL, TRUNCATED = (
    "rollout/response_length_mean", "rollout/reward_mean", "entropy_loss", "kl", "rollout/truncated_rate")
EVENTS = DETECTORS  # what a label can hold
SIGNAL_OF = {"length_collapse": "length", "truncation_drop": "length", "hockey_stick": "reward",
             "entropy_collapse": "entropy", "kl_blowup": "kl"}
CAP_KEYS = ("max_response_length", "generate_max_len", "max_new_tokens")  # provenance.json: the run's length limit


def _label(**events) -> dict:
    """{detector: {"present", "onset"[, "recovery"]}} with every detector absent unless given as onset step."""
    label = {name: {"present": False, "onset": None} for name in EVENTS}
    for name, onset in events.items():
        if name == "hockey_stick":
            onset, recovery = onset
            label[name] = {"present": True, "onset": onset, "recovery": recovery}
        else:
            label[name] = {"present": True, "onset": onset}
    return label


def real_curves(root: str | Path) -> list[dict]:
    """The published runs under `root`, read with the same readers `diagnose` uses."""
    curves = []
    for run in sorted(p for p in Path(root).iterdir() if (p / "label.json").is_file()):
        provenance = json.loads((run / "provenance.json").read_text())
        raw = json.loads((run / "label.json").read_text())
        logging_steps = int(provenance.get("logging_steps") or 1)
        kind, rows = read_rows(run / provenance["file"], logging_steps=logging_steps)
        # The metrics the run logs under its own names, read as a user would: diagnose --<signal>-key NAME.
        named = provenance.get("metric_names") or {}
        name_signals(rows, {"length": named.get("length"), "reward": named.get("reward"),
                            "entropy": named.get("entropy"), "kl": named.get("kl"),
                            "truncated": named.get("truncated_rate")})
        label = _label()
        for name, event in raw.items():
            if name in label and isinstance(event, dict) and event.get("undecided_from_step") is not None:
                label[name]["undecided_from"] = event["undecided_from_step"]
            if name in label and isinstance(event, dict) and event.get("present"):
                onset = event.get("onset_step", event.get("drop_step"))
                label[name] = {"present": True, "onset": onset, "borderline": bool(event.get("borderline"))}
                if name == "hockey_stick":
                    label[name]["recovery"] = event.get("recovery_step")
        # Who published the run (leave-one-source-out holds a whole source out) and how noisy it is.
        curves.append({"name": run.name, "origin": "real", "kind": kind, "rows": rows,
                       "logging_steps": logging_steps, "label": label, "provenance": provenance,
                       "source": raw.get("source") or provenance["repository"],
                       "noise_class": raw.get("noise_class", "unknown"), "batch": raw.get("batch"),
                       "held_out": raw.get("held_out"),  # the day it was added, labelled, with no detector run on it
                       "max_response_length": raw.get("max_response_length"),
                       "cap": next((src[k] for src in (raw, provenance) for k in CAP_KEYS if src.get(k)), None)})
    return curves


def synthetic_curves(seed: int = 0) -> list[dict]:
    """The synthetic part of the corpus: the same curves for the same seed."""
    rng = random.Random(seed)
    gauss, curves = rng.gauss, []

    def add(name, steps, metrics_at, label, logging_steps=1, cap=None):
        rows = [(step, metrics_at(step)) for step in steps]
        curves.append({"name": name, "origin": "synthetic", "source": "synthetic", "kind": "synthetic", "rows": rows,
                       "logging_steps": logging_steps, "label": label, "cap": cap})

    def binomial(p, n):  # the mean reward of n responses scored 0/1
        return sum(rng.random() < p for _ in range(n)) / n

    # The paper's Figure 2: length falls within ~10 steps from step 20 and does not come back; reward keeps rising.
    add("fig2-length-collapse", range(1, 201), lambda s: {
        LENGTH: (4000 if s < 20 else max(1200, 4000 - 280 * (s - 19))) * (1 + gauss(0, 0.04)),
        REWARD: 0.3 + 0.001 * s + gauss(0, 0.02)}, _label(length_collapse=25))
    # The paper's Figure 3: reward drops hard from step 5, bottoms out, climbs back to its start by step 80.
    add("fig3-hockey-stick", range(1, 201), lambda s: {
        LENGTH: 3000 * (1 + 0.001 * s) * (1 + gauss(0, 0.04)),
        REWARD: (0.45 if s < 5 else 0.15 if s < 15 else min(0.45 + 0.001 * (s - 80), 0.15 + 0.3 * (s - 15) / 65))
        + gauss(0, 0.015)}, _label(hockey_stick=(5, 80)))
    # The real case, logged every 10 steps: length 95 % down between the first and second log points.
    add("collapse-at-second-log-point", range(10, 401, 10), lambda s: {
        LENGTH: (2400 if s == 10 else 120) * (1 + gauss(0, 0.05)), REWARD: 0.2 + gauss(0, 0.02)},
        _label(length_collapse=20), logging_steps=10)
    # Reward model scores around -1 dropping to -4 (negative scale), slow recovery.
    add("hockey-stick-negative-rm-scores", range(1, 151), lambda s: {
        LENGTH: 1500 * (1 + gauss(0, 0.05)),
        REWARD: (-1.0 if s < 30 else -4.0 + 3.0 * min(1.0, (s - 30) / 90)) + gauss(0, 0.1)},
        _label(hockey_stick=(30, 120)))
    add("entropy-collapse", range(1, 151), lambda s: {
        LENGTH: 2000 * (1 + gauss(0, 0.04)), REWARD: 0.4 + 0.001 * s + gauss(0, 0.02),
        ENTROPY: (1.0 if s < 40 else max(0.05, 1.0 - 0.095 * (s - 40))) * (1 + gauss(0, 0.03))},
        _label(entropy_collapse=48))
    add("kl-blowup", range(1, 151), lambda s: {
        LENGTH: 2000 * (1 + gauss(0, 0.04)), REWARD: 0.4 + gauss(0, 0.02),
        KL: (0.002 + 0.0002 * s if s < 90 else 1.5 + 0.1 * (s - 90)) * (1 + gauss(0, 0.1))},
        _label(kl_blowup=90))
    # Hitting the 8192-token cap half of the time, then learning to stop: the truncated share falls with the length,
    # and the responses that were not truncated keep their ~3000 tokens.
    def capped(share, untruncated, cap=8192):
        share = min(1.0, max(0.0, share + gauss(0, 0.01)))
        return {LENGTH: share * cap + (1 - share) * untruncated * (1 + gauss(0, 0.03)), TRUNCATED: share}

    add("length-drop-from-truncation-cap", range(1, 151), lambda s: {
        **capped(0.5 if s < 50 else 0.02, 3000), REWARD: 0.3 + 0.002 * s + gauss(0, 0.02)},
        _label(truncation_drop=50), cap=8192)
    # The PPO run: the policy settles on a template far below its 4096 cap; the truncated share falls from
    # over a third to 0 while the responses that were not truncated shrink fourfold: a collapse, not the cap. The
    # cap is known only from the log's max-length metric (verl's response_length/max).
    add("collapse-below-cap-truncated-share-falls", range(1, 151), lambda s: {
        **capped(0.36 if s < 60 else 0.0, 2000 if s < 60 else 500, cap=4096), REWARD: 0.4 + gauss(0, 0.02),
        "response_length/max": 4096.0 if s < 60 else 900.0}, _label(length_collapse=60))
    # GRPO as TRL / Unsloth notebooks run it: 1 prompt x 4 completions a step, so the mean length jumps 2-3x from
    # step to step with the prompt, and the reward moves in quarters.
    def small_batch(length, p, samples=4):
        prompt = length * math.exp(gauss(0, 0.45))
        mean = sum(prompt * math.exp(gauss(0, 0.3)) for _ in range(samples)) / samples
        return {"completions/mean_length": mean, "reward": binomial(p, samples)}

    add("healthy-noisy-small-batch-grpo", range(1, 301), lambda s: small_batch(300, 0.2 + 0.4 * s / 300), _label())
    add("healthy-noisy-small-batch-grpo-length-drifts-down", range(1, 251),
        lambda s: small_batch(400 * (1 - 0.3 * s / 250), 0.3 + 0.2 * s / 250), _label())
    add("noisy-small-batch-grpo-later-collapse", range(1, 301),
        lambda s: small_batch(350 if s < 180 else 60, 0.4), _label(length_collapse=180))
    # Reward whose 10-step mean rises steadily, with one log point that dips hard: no hockey stick.
    add("healthy-reward-rising-with-one-dip", range(1, 201), lambda s: {
        LENGTH: 1000 * (1 + gauss(0, 0.04)), REWARD: (0.05 if s == 90 else 0.3 + 0.002 * s) + gauss(0, 0.03)},
        _label())
    # 8 completions a step (rewards in eighths): the reward's level falls by half at step 100 and stays down.
    add("reward-halves-and-stays-batch-8", range(1, 251), lambda s: {
        LENGTH: 700 * (1 + gauss(0, 0.05)), REWARD: binomial(0.6 if s < 100 else 0.3, 8)},
        _label(hockey_stick=(100, None)))
    # KL already thousands of nats at the first log point (a broken reference model): a blow-up from the start.
    add("kl-thousands-of-nats-from-the-start", range(1, 61), lambda s: {
        LENGTH: 800 * (1 + gauss(0, 0.04)), REWARD: 0.3 + gauss(0, 0.02), KL: 2500 * (1 + gauss(0, 0.2))},
        _label(kl_blowup=1))
    # GRPO with little or no KL penalty: KL rises smoothly to 0.1-0.4 nats in its first tens of steps.
    add("healthy-kl-rising-smoothly-to-0.3-nats", range(1, 201), lambda s: {
        LENGTH: 900 * (1 + gauss(0, 0.04)), REWARD: 0.3 + 0.001 * s + gauss(0, 0.02),
        KL: 0.3 * (1 - math.exp(-s / 15)) * (1 + gauss(0, 0.15))}, _label())

    # Healthy regimes.
    add("healthy-length-rising-to-cap", range(1, 301), lambda s: {
        LENGTH: min(8192, 1000 + 40 * s) * (1 + gauss(0, 0.03)), REWARD: 0.2 + 0.4 * (1 - math.exp(-s / 80))
        + gauss(0, 0.02), TRUNCATED: min(0.5, max(0.0, (1000 + 40 * s - 6000) / 6000)) + abs(gauss(0, 0.01))},
        _label())
    add("healthy-length-penalty-decline", range(1, 501), lambda s: {
        LENGTH: 3000 * (1 - s / 1000) * (1 + gauss(0, 0.04)), REWARD: 0.5 + 0.0002 * s + gauss(0, 0.02)}, _label())
    add("healthy-binomial-rewards-batch-16", range(1, 301), lambda s: {
        LENGTH: 1500 * (1 + 0.001 * s) * (1 + gauss(0, 0.06)), REWARD: binomial(0.2 + 0.4 * s / 300, 16)}, _label())
    add("healthy-rewards-starting-at-zero", range(1, 201), lambda s: {
        LENGTH: 800 * (1 + gauss(0, 0.05)), REWARD: binomial(0.0 if s < 30 else min(0.7, 0.01 * (s - 30)), 64)},
        _label())
    # Qwen-style zero-RL: length first dips (the model drops rambling) to 70 %, then grows past its start.
    add("healthy-early-dip-then-growth", range(1, 301), lambda s: {
        LENGTH: (1000 - 10 * s if s < 30 else 700 + 8 * (s - 30)) * (1 + gauss(0, 0.04)),
        REWARD: 0.3 + 0.3 * (1 - math.exp(-s / 60)) + gauss(0, 0.02)}, _label())
    add("healthy-logged-every-10-steps", range(10, 1001, 10), lambda s: {
        LENGTH: 1200 * (1 + s / 1000) * (1 + gauss(0, 0.05)), REWARD: 0.3 + 0.0003 * s + gauss(0, 0.02),
        ENTROPY: 0.8 * math.exp(-s / 1500) * (1 + gauss(0, 0.05)), KL: 0.0001 * s * (1 + gauss(0, 0.1))},
        _label(), logging_steps=10)
    add("healthy-resumed-at-step-500", range(500, 701), lambda s: {
        LENGTH: 2500 * (1 + gauss(0, 0.05)), REWARD: 0.6 + 0.0002 * (s - 500) + gauss(0, 0.02)}, _label())
    add("healthy-with-nan-steps", range(1, 201), lambda s: {
        LENGTH: float("nan") if rng.random() < 0.1 else 1800 * (1 + gauss(0, 0.05)),
        REWARD: float("nan") if rng.random() < 0.1 else 0.4 + 0.001 * s + gauss(0, 0.02)}, _label())
    add("healthy-noisy-entropy-and-kl", range(1, 401), lambda s: {
        LENGTH: 1500 * (1 + gauss(0, 0.05)), REWARD: 0.4 + 0.0005 * s + gauss(0, 0.02),
        ENTROPY: (0.6 - 0.0008 * s) * (1 + gauss(0, 0.1)), KL: 0.0003 * s * (1 + gauss(0, 0.3))}, _label())
    return curves


def score(curve: dict, detections: dict, patience: int) -> dict:
    """Per event of EVENTS: "hit" (raised within patience + 1 log points of the labeled onset, before or after; with
    the delay in steps and log points, negative when before), "late" / "early" (raised, but further from the
    onset), "miss", "false alarm" (raised where the label has no event), "quiet" (rightly nothing), "too short"
    (an event the log ends fewer than `patience` points after: no detector that waits can raise it), and two that
    the labels themselves leave open, counted neither way: "borderline quiet" (an event labelled borderline and not
    raised: by the corpus rule, staying quiet there is not clearly wrong) and "undecided" (raised where the log ends
    before the rule can decide: from the label's undecided_from step on, or up to patience + 1 log points before it,
    as a hit may come before its onset).
    `detections` maps event -> step or None; an event absent from it is not scored."""
    steps = [step for step, _ in curve["rows"]]
    result = {}
    for name in EVENTS:
        if name not in detections:
            continue
        label, step = curve["label"][name], detections[name]
        if step is None and label["present"] and sum(s >= label["onset"] for s in steps) < patience:
            result[name] = {"outcome": "too short"}
        elif step is None and label["present"] and label.get("borderline"):
            result[name] = {"outcome": "borderline quiet"}
        elif step is None:
            result[name] = {"outcome": "miss" if label["present"] else "quiet"}
        elif (not label["present"] and "undecided_from" in label
              and sum(1 for s in steps if step < s <= label["undecided_from"]) <= patience + 1):
            result[name] = {"outcome": "undecided", "step": step}
        elif not label["present"]:
            result[name] = {"outcome": "false alarm", "step": step}
        else:
            points = (sum(1 for s in steps if label["onset"] < s <= step)
                      - sum(1 for s in steps if step < s <= label["onset"]))
            outcome = "hit" if abs(points) <= patience + 1 else "late" if points > 0 else "early"
            result[name] = {"outcome": outcome, "step": step, "delay_steps": step - label["onset"],
                            "delay_points": points}
    return result


def detections(verdict: dict) -> dict:
    """What a verdict (detectors.verdict) raised, per event of EVENTS, as the step it was raised at (or None): a
    hockey stick is raised at its drop, recovered or not."""
    return {"length_collapse": verdict["length_collapse"]["step"],
            "truncation_drop": verdict["truncation_drop"]["step"],
            "hockey_stick": verdict["hockey_stick"]["drop_step"],
            "entropy_collapse": verdict["entropy_collapse"]["step"],
            "kl_blowup": verdict["kl_blowup"]["step"]}


def oracle_units(curve: dict, event: str, patience: int, before: int = 20) -> float | None:
    """How far the labelled event's signal has fallen, in noise units, by the last log point a hit may be raised at
    (the onset + patience + 1 log points), for an oracle that knows a change happened there and splits the points
    where that fall is largest: the mean of up to `before` points before the split against the mean of the points
    from it to that deadline (at least `patience` of them), over the standard error of that difference, with the
    step-to-step standard deviation from the median absolute difference of the points up to the deadline (a spike
    or the fall itself does not widen it). Lengths and entropy on logs, as the detectors judge them. An event under
    the detectors' noise_units here cannot be raised in time by any test that holds a false-alarm rate; the bar's
    "every event within patience + 1 log points" is judged on the others. None: no such event, a KL blow-up (an
    absolute level, not a fall), or too few points."""
    label = curve["label"][event]
    if not label["present"] or label["onset"] is None or event == "kl_blowup":
        return None
    signal = SIGNAL_OF[event]
    points = [(step, first_value(metrics, SIGNAL_KEYS[signal])) for step, metrics in curve["rows"]]
    log = signal != "reward"
    values = [math.log(max(v, 1e-9)) if log else v for _, v in points if v is not None]
    steps = [step for step, v in points if v is not None]
    onset = next((i for i, step in enumerate(steps) if step >= label["onset"]), None)
    if onset is None or onset == 0:
        return None
    deadline = min(len(values) - 1, onset + patience + 1)
    diffs = [abs(b - a) for a, b in zip(values[:deadline], values[1:deadline + 1]) if b != a]
    if len(diffs) < 3:
        return None
    sigma = max(1.4826 * statistics.median(diffs) / math.sqrt(2), 1e-12)
    best = -math.inf
    for split in range(max(1, onset - before), deadline - patience + 2):
        left, right = values[max(0, split - before):split], values[split:deadline + 1]
        error = sigma * math.sqrt(1 / len(left) + 1 / len(right))
        best = max(best, (statistics.fmean(left) - statistics.fmean(right)) / error)
    return best if math.isfinite(best) else None
