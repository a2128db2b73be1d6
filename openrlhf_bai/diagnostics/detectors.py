"""Detectors for the two early failures of RLHF on a distilled reasoning model (arXiv 2509.00309).

Pure functions over plain, JSON-serializable state, so that the live monitor (one step at a time, its state
saved in OpenRLHF's client_states) and the offline `diagnose` (a whole series) run the same code.

- Sequence Length Collapse: the smoothed response length falls below `collapse_ratio` of its baseline
  (the mean over the first `baseline_steps` steps) and stays there for `patience` steps.
- Reward Hockey Stick: the smoothed reward falls more than `hockey_drawdown` baseline spreads (standard
  deviations of the baseline window) below the baseline mean for `patience` steps; measuring in spreads
  keeps it independent of the reward model's scale. Recovery: the smoothed reward back at the baseline mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# Newest name first; older OpenRLHF releases logged the plain names.
LENGTH_KEYS = ("rollout/response_length_mean", "response_length_mean", "response_length")
REWARD_KEYS = ("rollout/reward_mean", "reward_mean", "reward")


@dataclass(frozen=True)
class Thresholds:
    baseline_steps: int = 5  # steps averaged into the baseline
    smoothing: float = 0.5  # EMA weight of the newest step (1 = no smoothing)
    collapse_ratio: float = 0.6  # smoothed length / baseline length below this counts as collapsed
    hockey_drawdown: float = 3.0  # baseline spreads the smoothed reward must fall below its baseline
    patience: int = 3  # consecutive steps a condition must hold before it is raised


def first_value(metrics: Mapping[str, Any], keys: Iterable[str]) -> float | None:
    """The first finite number among `keys` in `metrics`, or None (missing, None, NaN or Inf)."""
    for key in keys:
        value = metrics.get(key)
        if value is None:
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
    def track(**extra) -> dict:  # a fresh window list per track: a shared one mixes lengths and rewards
        return {"window": [], "base_mean": None, "base_std": None, "ema": None, "run": 0, **extra}

    return {
        "steps": 0,
        "length": track(detected_step=None, min_ratio=None),
        "reward": track(drop_step=None, depth=0.0, recovery_steps=None),
        # What fired, in order: {"detector", "step", "message", "values", "alarm"}; the monitor acts on new entries.
        "events": [],
    }


def _smooth(track: dict, value: float, th: Thresholds) -> bool:
    """Feed one value; True once the baseline exists and `ema` holds the smoothed value."""
    if track["base_mean"] is None:
        track["window"].append(value)
        if len(track["window"]) < th.baseline_steps:
            return False
        window = track["window"]
        mean = sum(window) / len(window)
        track["base_mean"] = mean
        track["base_std"] = math.sqrt(sum((x - mean) ** 2 for x in window) / max(len(window) - 1, 1))
        track["ema"] = mean
        return True
    track["ema"] += th.smoothing * (value - track["ema"])
    return True


def _event(state: dict, detector: str, step: int, message: str, values: dict, alarm: bool = True) -> None:
    state["events"].append({"detector": detector, "step": step, "message": message, "values": values, "alarm": alarm})


def observe(state: dict, step: int, metrics: Mapping[str, Any], th: Thresholds = Thresholds()) -> dict:
    """Update `state` with one logged step; return that step's bai/* diagnostics (only the ones defined yet)."""
    state["steps"] += 1
    state.setdefault("events", [])
    out: dict[str, float] = {}

    length = state["length"]
    value = first_value(metrics, LENGTH_KEYS)
    if value is not None and _smooth(length, value, th) and length["base_mean"] > 0:
        ratio = length["ema"] / length["base_mean"]
        length["min_ratio"] = ratio if length["min_ratio"] is None else min(length["min_ratio"], ratio)
        length["run"] = length["run"] + 1 if ratio < th.collapse_ratio else 0
        if length["run"] >= th.patience and length["detected_step"] is None:
            length["detected_step"] = step
            _event(state, "length_collapse", step,
                   f"sequence length collapse: smoothed response length at {ratio:.0%} of its baseline "
                   f"({length['base_mean']:.0f} tokens) for {th.patience} steps (--bai.collapse_ratio {th.collapse_ratio:g})",
                   {"response_length_ratio": ratio, "baseline_length": length["base_mean"]})
        out["bai/response_length_ratio"] = ratio
        out["bai/length_collapse"] = float(length["run"] >= th.patience)
    if length["detected_step"] is not None:
        out["bai/length_collapse_step"] = float(length["detected_step"])

    reward = state["reward"]
    value = first_value(metrics, REWARD_KEYS)
    if value is not None and _smooth(reward, value, th):
        # A flat baseline (all rewards equal) has no spread; a small floor keeps the unit finite.
        spread = max(reward["base_std"], 1e-3 * (abs(reward["base_mean"]) + 1.0))
        drawdown = (reward["base_mean"] - reward["ema"]) / spread
        reward["run"] = reward["run"] + 1 if drawdown > th.hockey_drawdown else 0
        if reward["drop_step"] is None:
            if reward["run"] >= th.patience:
                reward["drop_step"] = step
                _event(state, "hockey_stick", step,
                       f"reward hockey stick: smoothed reward {drawdown:.1f} baseline spreads below its baseline "
                       f"{reward['base_mean']:.4g} for {th.patience} steps (--bai.hockey_drawdown {th.hockey_drawdown:g})",
                       {"reward_drawdown": drawdown, "baseline_reward": reward["base_mean"]})
        if reward["drop_step"] is not None:
            reward["depth"] = max(reward["depth"], drawdown)
            if reward["recovery_steps"] is None and drawdown <= 0:
                reward["recovery_steps"] = step - reward["drop_step"]
                _event(state, "reward_recovered", step,
                       f"reward back at its baseline {reward['recovery_steps']} steps after the drop",
                       {"recovery_steps": reward["recovery_steps"]}, alarm=False)
        out["bai/reward_drawdown"] = drawdown
        out["bai/hockey_stick"] = float(reward["run"] >= th.patience)
    if reward["recovery_steps"] is not None:
        out["bai/reward_recovery_steps"] = float(reward["recovery_steps"])
    return out


def verdict(state: dict) -> dict:
    """The run's summary, in the shape `diagnose --json` writes."""
    length, reward = state["length"], state["reward"]
    return {
        "length_collapse": {
            "detected": length["detected_step"] is not None,
            "step": length["detected_step"],
            "min_ratio": length["min_ratio"],
        },
        "hockey_stick": {
            "detected": reward["drop_step"] is not None,
            "drop_step": reward["drop_step"],
            "depth": reward["depth"],
            "recovery_steps": reward["recovery_steps"],
        },
        "steps": state["steps"],
        "baseline_length": length["base_mean"],
        "baseline_reward": reward["base_mean"],
    }


def analyze(rows: Iterable[tuple[int, Mapping[str, Any]]], th: Thresholds = Thresholds()) -> tuple[dict, list[dict]]:
    """Run the detectors over a whole series of (step, metrics); return the verdict and each step's output."""
    state = new_state()
    per_step = [dict(observe(state, step, metrics, th), step=step) for step, metrics in rows]
    return verdict(state), per_step
