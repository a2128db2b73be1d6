"""Detectors for the failures of RLHF on a distilled reasoning model (arXiv 2509.00309) and their neighbours.

Pure functions over plain, JSON-serializable state, so that the live monitor (one step at a time, its state
saved in OpenRLHF's client_states) and the offline `diagnose` (a whole series) run the same code.

Every signal is smoothed (EMA over log points, `smoothing`) and compared with a **reference**: the smoothed
series' peak (for KL: its median) over the last `reference_steps` steps, counted in steps, not log points, so
it means the same at any --logger.logging_steps and after a resume. A fall inside the first log points lowers
later values, never the peak, so it cannot contaminate the reference; a slow drift (a length penalty, entropy
that declines over hundreds of steps) moves the reference with it and raises nothing. While a condition holds
the reference is frozen, so a collapse that does not come back stays a collapse.

- Sequence Length Collapse: smoothed length below `collapse_ratio` x reference for `patience` log points.
- Length drop from the truncation cap: the same fall, but the truncated share of responses fell with it (from at
  least 0.1 to at most half of that): the model stopped hitting the cap, it did not stop reasoning.
- Reward Hockey Stick: smoothed reward more than `hockey_drawdown` noise units below the reference for
  `patience` log points. The noise unit is the reward's own step-to-step noise (a robust estimate from the median
  absolute difference of consecutive values), so it means the same for any reward scale and batch size.
  Recovered: smoothed reward back within one noise unit of the reference.
- Entropy collapse: smoothed policy entropy below `entropy_ratio` x its peak since the first step (not over a
  window: entropy that falls to a fifth is collapsed however slowly it got there) for `patience` log points.
- KL blow-up: smoothed KL above `kl_factor` x max(reference, `kl_floor`) for `patience` log points.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from openrlhf_bai.errors import BAIError

# The names each framework logs, newest OpenRLHF first; readers strip `train/`-style prefixes of their own.
LENGTH_KEYS = ("rollout/response_length_mean", "response_length_mean", "response_length",  # OpenRLHF 0.11, 0.9
               "response_length/mean",  # verl
               "completions/mean_length", "completion_length")  # TRL (newer, older)
REWARD_KEYS = ("rollout/reward_mean", "reward_mean", "reward",  # OpenRLHF 0.11, 0.9; TRL's is "reward" too
               "critic/score/mean", "critic/rewards/mean")  # verl: the score, then the KL-penalized reward
ENTROPY_KEYS = ("entropy_loss",  # OpenRLHF 0.11 logs the mean token entropy under this name (--actor.entropy_coef)
                "actor/entropy", "actor/entropy_loss",  # verl (newer, older)
                "entropy")  # TRL
KL_KEYS = ("kl", "ppo_kl",  # OpenRLHF (to the reference; old -> new policy); TRL's is "kl"
           "actor/kl_loss", "actor/ppo_kl", "objective/kl")  # verl; TRL's PPO
TRUNCATED_KEYS = ("rollout/truncated_rate", "response_clip_ratio",  # OpenRLHF 0.11, 0.9
                  "response_length/clip_ratio",  # verl
                  "completions/clipped_ratio")  # TRL
SIGNAL_KEYS = {"length": LENGTH_KEYS, "reward": REWARD_KEYS, "entropy": ENTROPY_KEYS, "kl": KL_KEYS,
               "truncated": TRUNCATED_KEYS}
# What can fire, in the order they are checked; each is an alarm for the monitor's --bai.on_collapse.
DETECTORS = ("length_collapse", "truncation_drop", "hockey_stick", "entropy_collapse", "kl_blowup")
STATE_VERSION = 2
NOISE_DIFFS = 64  # consecutive differences kept for the reward's noise estimate


@dataclass(frozen=True)
class Thresholds:
    smoothing: float = 0.5  # EMA weight of the newest log point (1 = no smoothing)
    patience: int = 3  # consecutive log points a condition must hold before it is raised
    reference_steps: int = 100  # steps over which the reference (peak of the smoothed series) is taken
    collapse_ratio: float = 0.6  # smoothed length / reference below this counts as collapsed
    hockey_drawdown: float = 4.5  # noise units the smoothed reward must fall below its reference
    entropy_ratio: float = 0.2  # smoothed entropy / its peak since the start below this counts as collapsed
    kl_factor: float = 5.0  # smoothed KL / max(reference, kl_floor) above this is a blow-up
    kl_floor: float = 0.01  # nats: the reference of a KL that starts at 0


# name: (what it must be, check); shared by the monitor's --bai.* flags and diagnose's options.
LIMITS = {
    "smoothing": ("in (0, 1]", lambda v: 0 < v <= 1),
    "patience": ("an integer >= 1", lambda v: v == int(v) and v >= 1),
    "reference_steps": ("an integer >= 1", lambda v: v == int(v) and v >= 1),
    "collapse_ratio": ("in (0, 1)", lambda v: 0 < v < 1),
    "hockey_drawdown": ("> 0", lambda v: v > 0),
    "entropy_ratio": ("in (0, 1)", lambda v: 0 < v < 1),
    "kl_factor": ("> 1", lambda v: v > 1),
    "kl_floor": ("> 0", lambda v: v > 0),
}
HELP = {
    "smoothing": "EMA weight of the newest log point, 1 = no smoothing",
    "patience": "consecutive log points a condition must hold before it is raised",
    "reference_steps": "steps over which each signal's reference (its smoothed peak) is taken",
    "collapse_ratio": "smoothed response length / reference below this is a length collapse",
    "hockey_drawdown": "noise units the smoothed reward must fall below its reference: a hockey stick",
    "entropy_ratio": "smoothed entropy / its peak since the start below this is an entropy collapse",
    "kl_factor": "smoothed KL / max(reference, kl_floor) above this is a KL blow-up",
    "kl_floor": "smallest KL reference in nats (KL starts at 0)",
}


def make_thresholds(values: Mapping[str, Any], flag=lambda key: f"--bai.{key}") -> Thresholds:
    """Thresholds from a mapping (missing keys: defaults); BAIError naming the flag (`flag(key)`) for a value out
    of range."""
    defaults = asdict(Thresholds())
    chosen = {key: values.get(key, default) for key, default in defaults.items()}
    for key, value in chosen.items():
        expected, ok = LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise BAIError(f"{flag(key)} must be {expected}, got {value!r}")
    return Thresholds(**chosen)


def first_value(metrics: Mapping[str, Any], keys: Iterable[str]) -> float | None:
    """The first finite number among `keys` in `metrics`, or None (missing, None, NaN or Inf)."""
    for key in keys:
        value = metrics.get(key)
        if value is None or isinstance(value, (bool, str)):
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            return value
    return None


def new_state() -> dict:
    """Detector state: plain numbers and lists only, so it fits in client_states and JSON."""
    def track() -> dict:
        # ema: smoothed value; window: [step, smoothed] within reference_steps; frozen: the reference while a
        # condition holds; run: log points it has held; last: the last raw value; diffs: |raw differences| (repeats
        # left out); count: values seen.
        return {"ema": None, "window": [], "frozen": None, "run": 0, "last": None, "diffs": [], "count": 0}

    return {
        "version": STATE_VERSION,
        "steps": 0,
        "signals": {name: track() for name in SIGNAL_KEYS},
        "length_collapse": {"step": None, "min_ratio": None, "baseline": None},
        "truncation_drop": {"step": None, "before": None, "after": None},
        "hockey_stick": {"step": None, "depth": 0.0, "recovery_steps": None, "baseline": None},
        "entropy_collapse": {"step": None, "min_ratio": None, "baseline": None},
        "kl_blowup": {"step": None, "max_ratio": None, "baseline": None},
        # What fired, in order: {"detector", "step", "message", "values", "alarm"}; the monitor acts on new entries.
        "events": [],
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _smooth(track: dict, step: int, value: float, th: Thresholds, statistic, whole_run: bool = False):
    """Feed one raw value; (smoothed value, reference). The reference is frozen while track["frozen"] is set;
    `whole_run`: the peak since the first step (only that point is kept) instead of the last reference_steps."""
    if track["last"] is not None and value != track["last"]:  # a repeated value (a reward stuck at 0) tells no noise
        track["diffs"] = (track["diffs"] + [abs(value - track["last"])])[-NOISE_DIFFS:]
    track["last"] = value
    track["count"] += 1
    track["ema"] = value if track["ema"] is None else track["ema"] + th.smoothing * (value - track["ema"])
    if track["frozen"] is not None:
        return track["ema"], track["frozen"]
    # The window is counted in steps; it keeps at least patience + 2 log points so that sparse logging
    # (--logger.logging_steps close to reference_steps) still has a reference from before the fall.
    window = track["window"] + [[step, track["ema"]]]
    if whole_run:
        track["window"] = [max(window, key=lambda point: point[1])]
        return track["ema"], track["window"][0][1]
    keep = [point for point in window if point[0] > step - th.reference_steps]
    track["window"] = window[-(th.patience + 2):] if len(keep) < th.patience + 2 else keep
    return track["ema"], statistic(value for _, value in track["window"])


def _hold(track: dict, condition: bool, reference: float) -> int:
    """Count the log points a condition has held; freeze the reference while it does."""
    track["run"] = track["run"] + 1 if condition else 0
    track["frozen"] = reference if condition else None
    return track["run"]


def _event(state: dict, detector: str, step: int, message: str, values: dict, alarm: bool = True) -> None:
    state["events"].append({"detector": detector, "step": step, "message": message, "values": values, "alarm": alarm})


def observe(state: dict, step: int, metrics: Mapping[str, Any], th: Thresholds = Thresholds()) -> dict:
    """Update `state` with one logged step; return that step's bai/* diagnostics (those it could compute)."""
    state["steps"] += 1
    signals = state["signals"]
    values = {name: first_value(metrics, keys) for name, keys in SIGNAL_KEYS.items()}
    out: dict[str, float] = {}

    truncated = None
    if values["truncated"] is not None:
        truncated = _smooth(signals["truncated"], step, values["truncated"], th, max)

    if values["length"] is not None:
        track, found = signals["length"], state["length_collapse"]
        smoothed, reference = _smooth(track, step, values["length"], th, max)
        if reference > 0:
            ratio = smoothed / reference
            if found["min_ratio"] is None or ratio < found["min_ratio"]:
                found["min_ratio"], found["baseline"] = ratio, reference
            run = _hold(track, ratio < th.collapse_ratio, reference)
            if run >= th.patience and found["step"] is None and state["truncation_drop"]["step"] is None:
                _length_fell(state, step, ratio, reference, truncated, th)
            out["bai/response_length_ratio"] = ratio
            out["bai/length_collapse"] = float(run >= th.patience and found["step"] is not None)
            out["bai/truncation_drop"] = float(run >= th.patience and state["truncation_drop"]["step"] is not None)
    if state["length_collapse"]["step"] is not None:
        out["bai/length_collapse_step"] = float(state["length_collapse"]["step"])

    if values["reward"] is not None:
        track, found = signals["reward"], state["hockey_stick"]
        smoothed, reference = _smooth(track, step, values["reward"], th, max)
        # Step-to-step noise of the raw reward (MAD of differences / sqrt 2, as a standard deviation); a floor
        # keeps a flat reward finite.
        # A median of few differences is itself noisy: widen it while there are few (x2 at 4, x1.25 at 16); with
        # fewer than 3 the reward has not moved: judged only once it has repeated itself 2 x patience times (flat).
        diffs = track["diffs"]
        if len(diffs) >= 3:
            noise = 1.4826 * _median(diffs) / math.sqrt(2) * (1 + 4 / len(diffs))
        else:  # too few moves to say yet, unless the reward has stayed flat a while
            repeats = track["count"] - 1 - len(diffs)
            noise = 0.0 if repeats >= 2 * th.patience else math.inf
        noise = max(noise, 1e-3 * (abs(reference) + 1.0))
        drawdown = (reference - smoothed) / noise
        run = _hold(track, drawdown > th.hockey_drawdown, reference)
        if run >= th.patience and found["step"] is None:
            found["step"], found["baseline"] = step, reference
            _event(state, "hockey_stick", step,
                   f"reward hockey stick: smoothed reward {smoothed:.4g} is {drawdown:.1f} noise units below its "
                   f"reference {reference:.4g} for {th.patience} log points (--bai.hockey_drawdown "
                   f"{th.hockey_drawdown:g})",
                   {"reward": smoothed, "reference": reference, "drawdown": drawdown})
        if found["step"] is not None:
            found["depth"] = max(found["depth"], (found["baseline"] - smoothed) / noise)
            if found["recovery_steps"] is None and smoothed >= found["baseline"] - noise:
                found["recovery_steps"] = step - found["step"]
                _event(state, "reward_recovered", step,
                       f"reward back at its reference {found['recovery_steps']} steps after the drop",
                       {"recovery_steps": found["recovery_steps"]}, alarm=False)
        out["bai/reward_drawdown"] = drawdown
        out["bai/hockey_stick"] = float(run >= th.patience and found["step"] is not None)
    if state["hockey_stick"]["recovery_steps"] is not None:
        out["bai/reward_recovery_steps"] = float(state["hockey_stick"]["recovery_steps"])

    if values["entropy"] is not None:
        track, found = signals["entropy"], state["entropy_collapse"]
        # Entropy is measured against its peak since the start: falling to a fifth is a collapse at any speed, and
        # the corpus' healthy runs lose at most three quarters of it.
        smoothed, reference = _smooth(track, step, values["entropy"], th, max, whole_run=True)
        if reference > 0:
            ratio = smoothed / reference
            if found["min_ratio"] is None or ratio < found["min_ratio"]:
                found["min_ratio"], found["baseline"] = ratio, reference
            run = _hold(track, ratio < th.entropy_ratio, reference)
            if run >= th.patience and found["step"] is None:
                found["step"], found["baseline"] = step, reference
                _event(state, "entropy_collapse", step,
                       f"entropy collapse: smoothed policy entropy {smoothed:.3g} at {ratio:.0%} of its reference "
                       f"{reference:.3g} for {th.patience} log points (--bai.entropy_ratio {th.entropy_ratio:g})",
                       {"entropy": smoothed, "reference": reference, "ratio": ratio})
            out["bai/entropy_ratio"] = ratio
            out["bai/entropy_collapse"] = float(run >= th.patience)

    if values["kl"] is not None:
        track, found = signals["kl"], state["kl_blowup"]
        smoothed, reference = _smooth(track, step, values["kl"], th, _median)
        ratio = smoothed / max(reference, th.kl_floor)
        if found["max_ratio"] is None or ratio > found["max_ratio"]:
            found["max_ratio"] = ratio
        run = _hold(track, ratio > th.kl_factor, reference)
        if run >= th.patience and found["step"] is None:
            found["step"], found["baseline"] = step, reference
            _event(state, "kl_blowup", step,
                   f"KL blow-up: smoothed KL {smoothed:.3g} is {ratio:.1f}x its reference "
                   f"{max(reference, th.kl_floor):.3g} for {th.patience} log points (--bai.kl_factor {th.kl_factor:g})",
                   {"kl": smoothed, "reference": reference, "ratio": ratio})
        out["bai/kl_ratio"] = ratio
        out["bai/kl_blowup"] = float(run >= th.patience)
    return out


def _length_fell(state: dict, step: int, ratio: float, reference: float, truncated, th: Thresholds) -> None:
    """The length held below collapse_ratio for patience log points: a collapse, or the truncation cap let go."""
    if truncated is not None:
        # The truncated share before the fall: the peak of its own window, which still holds the steps before it.
        now, before = truncated
        if before >= 0.1 and now <= 0.5 * before:
            state["truncation_drop"].update(step=step, before=before, after=now)
            _event(state, "truncation_drop", step,
                   f"length drop from the truncation cap: smoothed response length at {ratio:.0%} of its reference "
                   f"({reference:.0f} tokens) while the truncated share fell from {before:.0%} to {now:.0%}: the "
                   "model stopped hitting the length limit, it did not stop reasoning",
                   {"response_length_ratio": ratio, "reference": reference, "truncated_before": before,
                    "truncated_after": now})
            return
    state["length_collapse"].update(step=step, baseline=reference)
    _event(state, "length_collapse", step,
           f"sequence length collapse: smoothed response length at {ratio:.0%} of its reference ({reference:.0f} "
           f"tokens) for {th.patience} log points (--bai.collapse_ratio {th.collapse_ratio:g})",
           {"response_length_ratio": ratio, "reference": reference})


def verdict(state: dict) -> dict:
    """The run's summary, in the shape `diagnose --json` writes (fields are only ever added, never renamed)."""
    length, hockey = state["length_collapse"], state["hockey_stick"]
    entropy, kl, truncation = state["entropy_collapse"], state["kl_blowup"], state["truncation_drop"]
    return {
        "length_collapse": {"detected": length["step"] is not None, "step": length["step"],
                            "min_ratio": length["min_ratio"]},
        "hockey_stick": {"detected": hockey["step"] is not None, "drop_step": hockey["step"],
                         "depth": hockey["depth"], "recovery_steps": hockey["recovery_steps"]},
        "entropy_collapse": {"detected": entropy["step"] is not None, "step": entropy["step"],
                             "min_ratio": entropy["min_ratio"]},
        "kl_blowup": {"detected": kl["step"] is not None, "step": kl["step"], "max_ratio": kl["max_ratio"]},
        "truncation_drop": {"detected": truncation["step"] is not None, "step": truncation["step"],
                            "truncated_rate_before": truncation["before"], "truncated_rate_after": truncation["after"]},
        "steps": state["steps"],
        # The references the verdicts are measured against: at the detection, else at the lowest point.
        "baseline_length": length["baseline"],
        "baseline_reward": hockey["baseline"] if hockey["baseline"] is not None else _peak(state, "reward"),
        "baseline_entropy": entropy["baseline"],
    }


def _peak(state: dict, name: str) -> float | None:
    window = state["signals"][name]["window"]
    return max(value for _, value in window) if window else None


def analyze(rows: Iterable[tuple[int, Mapping[str, Any]]], th: Thresholds = Thresholds()) -> tuple[dict, list[dict]]:
    """Run the detectors over a whole series of (step, metrics); return the verdict and each step's output."""
    state = new_state()
    per_step = [dict(observe(state, step, metrics, th), step=step) for step, metrics in rows]
    return verdict(state), per_step
