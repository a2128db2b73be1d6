"""Detectors for the failures of RLHF on a distilled reasoning model (arXiv 2509.00309) and their neighbours.

Pure functions over plain, JSON-serializable state, so that the live monitor (one step at a time, its state
saved in OpenRLHF's client_states) and the offline `diagnose` (a whole series) run the same code: one table of
detectors (DETECTORS_TABLE, a row each) over one state object (new_state).

Every signal is judged by robust statistics over windows, and by its own noise:
- the **short level**: the median of the last 2 x `patience` - 1 log points, so a fall counts once it covers a
  majority of them: a one-point dip or spike moves it not at all;
- the **long level**: a trimmed mean (a tenth cut at each end) over the last `level_steps` steps (at least the
  short level's points); the noise test is judged on it, so the unit is the level's noise, not a single step's;
- the **reference**: the median of the values of the last `reference_steps` steps (counted in steps, so it means
  the same at any --logger.logging_steps and after a resume), leaving out the last `patience` points, which may
  already belong to the fall; for entropy the highest short level since the first step, counted only up to
  SPIKE_FACTOR x the median of twice as many points (a 3-point spike is not the entropy's level). From the moment a
  fall passes its ratio (before it clears the noise) until it ends, the reference is frozen with the number of points
  it was taken over, so a fall never pulls its own reference down and a collapse that does not come back stays one;
- the **noise unit**: the step-to-step standard deviation of the values (1.4826 x the median absolute consecutive
  difference / sqrt 2, repeated values left out, widened while there are few), scaled to each statistic
  (1.2533 / sqrt n for a median, 1.1 / sqrt n for the trimmed mean) and combined with the reference's.
  Lengths and entropy are judged on their logarithms (their noise is relative: a batch of 4 samples and one of
  1,024 then mean the same thing). Rewards use trimmed means and the root mean square of the differences (less
  the largest tenth): a small group's rewards are bimodal, and a median would jump between the two modes.

A detection's **strength** is how far past its threshold it is, in noise units (the smallest margin over its
conditions); a condition holds at a log point when its strength is > 0. It is raised at the first point it holds
at least `raise_units` past its threshold, else once it has held at `patience` points in a row (KL: always once
held at `patience` points in a row), and it is **sustained** (what --bai.on_collapse save/stop acts
on) once it has held at `patience` consecutive log points, each at least `action_strength` noise units past.

A detection **ends** once its signal is back on the healthy side at `patience` log points in a row: a length or
entropy level at least halfway back (in logs) from its threshold to the reference it was raised against, a reward
within one noise unit of its reference (the hockey stick's recovery); a KL blow-up does not end. An ended detection is
reported (an informational event, the verdict's `episodes`) and the detector is armed again, so a collapse that
came back and then returns for good is raised again. The verdict's `unrecovered_step` is a collapse that stayed: the
raise still open at the end of the log with its level still below its threshold there (a level back above the
threshold but not yet halfway back has not ended, yet by the corpus rule, "never back above 60 %", it is no collapse);
a truncation drop that became a length collapse is one fall there, the collapse.

- length_collapse: short level < `collapse_ratio` x reference by `ratio_units` of its own noise (a median of 5
  points of a 2-completion run that merely touches the ratio is noise), and the long level `noise_units` below the
  reference; or the same fall below `start_ratio` x the **start level** (the median of the values of the run's first
  `reference_steps` steps, kept for good): a slow decline, which the trailing reference follows down; unless the
  truncated share explains it (then truncation_drop). The length is judged only from `warmup_steps` after its first
  log point: a base model learning the output format moves it 2-6x in its first steps.
- truncation_drop: the same fall, explained by the truncation cap: the mean length of the responses that were NOT
  truncated, estimated from the cap C, the truncated share r and the mean m as (m - r C) / (1 - r), stayed at or
  above `collapse_ratio` x its own reference. The cap is the run's (--rollout.max_new_tokens; diagnose
  --max-response-length) when known, else the largest value of the log's max-length metric; without one every
  fall is a collapse. Once a fall is called a collapse it is not called a cap drop afterwards.
- hockey_stick: the reward's short level fallen by `reward_drop` x what it gained over its lowest long level (the
  reference less that level; at least one step's noise), and the long level `noise_units`
  below it (a reward that falls by half and stays down is raised: the drop of a hockey stick that has not
  recovered), or the reward stuck at one value below the reference for a run of points as unlikely by chance as
  `noise_units` (its share of the points before the run, to the run's length); recovered once the short level is
  back within one noise unit of the reference at `patience` points in a row, recovery_steps after the drop.
- entropy_collapse: entropy below `entropy_ratio` x its highest level (by `entropy_ratio_units`) and below
  `entropy_nats`, the long level `noise_units` below its highest level.
- length_collapse, truncation_drop and entropy_collapse, in a run whose level reached a new high after its first
  2 x patience - 1 values (it rose after it began): also the short level `noise_units` below their median (the
  opening level). A fall back to where the run began is not a collapse.
- kl_blowup: the KL level above `kl_limit_nats` (absolute: a run already thousands of nats at its first points is
  raised), and, while the run's reference is below that limit, above `kl_factor` x the reference (its own
  trajectory), held at `patience` points in a row (KL estimates spike on single steps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from statistics import NormalDist
from typing import Any, Callable, Iterable, Mapping

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
KL_KEYS = ("kl",  # OpenRLHF and TRL: to the reference
           # verl: in the reward (PPO; newer, older), logged only when it is used; then as a loss (GRPO), which some
           # verl versions print as 0.0 while the KL is in the reward
           "actor/reward_kl_penalty", "critic/kl", "actor/kl_loss",
           "objective/kl",  # TRL's PPO
           "ppo_kl", "actor/ppo_kl")  # OpenRLHF, verl: old -> new policy of one update; last resort
TRUNCATED_KEYS = ("rollout/truncated_rate", "response_clip_ratio",  # OpenRLHF 0.11, 0.9
                  "response_length/clip_ratio",  # verl
                  "completions/clipped_ratio")  # TRL
MAX_LENGTH_KEYS = ("rollout/response_length_max", "response_length/max",  # verl
                   "completions/max_length")  # TRL
SIGNAL_KEYS = {"length": LENGTH_KEYS, "reward": REWARD_KEYS, "entropy": ENTROPY_KEYS, "kl": KL_KEYS,
               "truncated": TRUNCATED_KEYS}
STATE_VERSION = 4  # 3: one raise per detector, no episodes; 2: EMA-smoothed windows (0.2); upgraded by upgrade_state
NOISE_DIFFS = 64  # consecutive differences kept for a signal's noise estimate
# Entropy's highest level counts a short level only up to this factor x the median of twice as many points: a spike
# of a few points holds a majority of the short window, not of the wider one; a rise that stays is the same in both.
SPIKE_FACTOR = 1.5


@dataclass(frozen=True)
class Thresholds:
    patience: int = 3  # a fall must cover `patience` of the last 2 x patience - 1 log points
    reference_steps: int = 100  # steps over which the reference (median of the raw values) is taken
    level_steps: int = 20  # steps over which the long level (a trimmed mean) is taken, for the noise test
    noise_units: float = 3.0  # every fall must also be this many noise units of the level
    ratio_units: float = 2.0  # the short level must be past its ratio by this many of its own noise units
    collapse_ratio: float = 0.6  # length level / reference below this is a length collapse
    start_ratio: float = 0.5  # length level / its start level below this is a length collapse too (a slow one)
    warmup_steps: int = 10  # the length is judged only from this many steps after its first log point
    reward_drop: float = 0.5  # the reward level losing this share of what it gained over its lowest level: a drop
    entropy_ratio: float = 0.2  # entropy level / its highest level since the start below this is a collapse
    entropy_nats: float = 0.1  # nats: ... and the entropy level below this
    entropy_ratio_units: float = 1.0  # ... and past entropy_ratio by this many noise units (ratio_units: the length's)
    kl_limit_nats: float = 1.0  # nats: a KL level above this (and above kl_factor x its reference) is a blow-up
    kl_factor: float = 1.25  # ... and KL level / its reference above this, while the reference is below the limit
    raise_units: float = 0.5  # noise units past the threshold at its first point to raise; else patience points
    action_strength: float = 1.0  # noise units past the threshold at each of `patience` points: save/stop acts


# name: (what it must be, check); shared by the monitor's --bai.* flags and diagnose's options.
LIMITS = {
    "patience": ("an integer >= 1", lambda v: v == int(v) and v >= 1),
    "reference_steps": ("an integer >= 1", lambda v: v == int(v) and v >= 1),
    "level_steps": ("an integer >= 1", lambda v: v == int(v) and v >= 1),
    "noise_units": (">= 0", lambda v: v >= 0),
    "ratio_units": (">= 0", lambda v: v >= 0),
    "collapse_ratio": ("in (0, 1)", lambda v: 0 < v < 1),
    "start_ratio": ("in (0, 1)", lambda v: 0 < v < 1),
    "warmup_steps": ("an integer >= 0", lambda v: v == int(v) and v >= 0),
    "reward_drop": ("in (0, 1]", lambda v: 0 < v <= 1),
    "entropy_ratio": ("in (0, 1)", lambda v: 0 < v < 1),
    "entropy_nats": ("> 0", lambda v: v > 0),
    "entropy_ratio_units": (">= 0", lambda v: v >= 0),
    "kl_limit_nats": ("> 0", lambda v: v > 0),
    "kl_factor": ("> 1", lambda v: v > 1),
    "raise_units": (">= 0", lambda v: v >= 0),
    "action_strength": (">= 0", lambda v: v >= 0),
}
HELP = {
    "patience": "a fall must cover this many of the last 2 x patience - 1 log points (the level is their median)",
    "reference_steps": "steps over which each signal's reference (the median of its values) is taken",
    "level_steps": "steps over which the level the noise test judges (a trimmed mean) is taken",
    "noise_units": "noise units of the level every fall must also exceed",
    "ratio_units": "noise units of the short level by which a length level must be past its ratio "
                   "(collapse_ratio, start_ratio): a level that merely touches the ratio within its own noise "
                   "is not a collapse",
    "entropy_ratio_units": "noise units of the short level by which an entropy level must be past entropy_ratio "
                           "(fewer than the length's ratio_units: the entropy must also be below entropy_nats)",
    "collapse_ratio": "response length level / reference below this is a length collapse",
    "start_ratio": "response length level / its start level (the median over the run's first reference_steps "
                   "steps) below this is a length collapse too: a slow decline that the trailing reference follows",
    "warmup_steps": "steps after the first logged length before the length is judged: a base model learning the "
                    "output format moves its length 2-6x in its first steps (0: judged from the first steps)",
    "reward_drop": "the reward level losing this share of what it had gained over its lowest level (the reference "
                   "less that level; at least one step's noise) is a reward drop (a hockey stick's)",
    "entropy_ratio": "entropy level / its highest level since the start below this is an entropy collapse",
    "entropy_nats": "nats: an entropy collapse also needs the entropy level below this",
    "kl_limit_nats": "nats: a KL level above this (and above kl_factor x its reference, once it has one) is a "
                     "KL blow-up; a run already above it at its first points has no reference and is raised",
    "kl_factor": "a KL blow-up also needs the KL level above this x its reference (while that is below kl_limit_nats)",
    "raise_units": "noise units past its threshold a detection must be to be raised at its first point; one "
                   "closer to the threshold is raised once it has held at patience log points in a row",
    "action_strength": "noise units past the threshold a detection keeps for patience log points before "
                       "--bai.on_collapse save/stop acts",
}
# Thresholds of 0.2 that no longer exist: name -> (what replaces it, how). Refused by name, never silently ignored.
RENAMED = {
    "smoothing": ("patience", "the level is the median of the last 2 x patience - 1 log points; there is no EMA"),
    "hockey_drawdown": ("noise_units", "with reward_drop, the share of its gain the reward level must lose"),
    "kl_floor": ("kl_limit_nats", "the KL level in nats a blow-up must exceed"),
}


def renamed_message(name: str, flag=lambda key: f"--bai.{key}") -> str | None:
    """The one-line refusal of a renamed or removed threshold `name`, or None when it is no such name."""
    if name not in RENAMED:
        return None
    replacement, how = RENAMED[name]
    return f"{flag(name)} was removed in 0.3: use {flag(replacement)} ({how})"


def make_thresholds(values: Mapping[str, Any], flag=lambda key: f"--bai.{key}") -> Thresholds:
    """Thresholds from a mapping (missing keys: defaults); BAIError naming the flag (`flag(key)`) for a value out
    of range or a renamed threshold."""
    for key in values:
        if key in RENAMED and values[key] is not None:
            raise BAIError(renamed_message(key, flag))
    defaults = asdict(Thresholds())
    chosen = {key: values.get(key, default) for key, default in defaults.items()}
    for key, value in chosen.items():
        expected, ok = LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise BAIError(f"{flag(key)} must be {expected}, got {value!r}")
    return Thresholds(**chosen)


def name_signals(rows: Iterable[tuple[int, dict]], names: Mapping[str, str | None]) -> None:
    """Read the metric a log names `names[signal]` (diagnose's --<signal>-key: a custom loop's "token_entropy") as
    that signal: copied, in place, under the signal's first known name, which the detectors read first."""
    for _, metrics in rows:
        for signal, key in names.items():
            if key and key in metrics:
                metrics[SIGNAL_KEYS[signal][0]] = metrics[key]


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


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


# ------------------------------------------------------------------------------------------------- signals


LOG_SIGNALS = ("length", "entropy")  # positive and multiplicative: judged on logs (ratios, relative noise)
MEAN_SIGNALS = ("reward",)  # trimmed means and root-mean-square noise (bimodal small-group rewards); else medians


@dataclass
class Level:
    """One signal at one log point, in the units it is judged in (log for LOG_SIGNALS): the short level (median of
    the last 2 x patience - 1 points), the long level (trimmed mean over level_steps steps), the reference, and
    the noise units of short - reference and long - reference. `value` / `reference`: short level and reference
    in the signal's own units."""
    short: float
    long: float
    ref: float | None
    sigma: float  # step-to-step standard deviation of the judged values
    points: int  # points the short level is over
    n_long: int  # points the long level is over
    n_ref: int  # points the reference is the median of
    log: bool
    low: float | None = None  # rewards: the lowest long level (over 2 x patience - 1 points or more) so far
    start: list | None = None  # [median of the first reference_steps steps (signal units), points], once complete
    # The median of the first 2 x patience - 1 values (judged units), once the short level has reached a new high
    # after them: where a run that rose began (None until then).
    opening: float | None = None
    from_start: bool = False  # ref is the start level (a slow decline is judged against it), not the reference

    # Standard deviations of a median (1.2533 sigma / sqrt n) and of a trimmed mean (about 1.1 sigma / sqrt n).
    @property
    def level_noise(self) -> float:  # the short level alone
        return 1.2533 * self.sigma / math.sqrt(self.points)

    @property
    def ref_noise(self) -> float:
        return 1.2533 * self.sigma / math.sqrt(self.n_ref) if self.n_ref else 0.0

    @property
    def noise_short(self) -> float:  # of short - ref
        return math.hypot(self.level_noise, self.ref_noise)

    @property
    def noise_long(self) -> float:  # of long - ref
        return math.hypot(1.1 * self.sigma / math.sqrt(self.n_long), self.ref_noise)

    @property
    def value(self) -> float:
        return math.exp(self.short) if self.log else self.short

    @property
    def reference(self) -> float | None:
        return None if self.ref is None else math.exp(self.ref) if self.log else self.ref


def _to(log: bool, value: float) -> float:
    return math.log(max(value, 1e-9)) if log else value


def _new_track() -> dict:
    # points: [step, raw value] within reference_steps (and the level's points); diffs: |differences| of the judged
    # (log) values, repeats left out; repeats: repeated values; peak: highest short level so far (judged units);
    # frozen: {detector: reference in the signal's units} while its condition holds.
    # low: the lowest long level of a reward, which a fall's size is measured from.
    # start: [median of the values of the first reference_steps steps, points], kept for good once those are complete;
    # first: the step of the first value; opening: the first 2 x patience - 1 values (absent from a state saved
    # before 0.3, where they are not known); top: the highest short level so far; risen: a new top after the opening
    # values (the run rose after it began).
    return {"points": [], "diffs": [], "repeats": 0, "peak": None, "frozen": {}, "low": None, "start": None,
            "first": None, "opening": [], "top": None, "risen": False}


def _feed(track: dict, step: int, value: float, th: Thresholds, log: bool) -> None:
    points = track["points"]
    if points:
        last = points[-1][1]
        if value != last:  # a repeated value (a reward stuck at 0) tells no noise
            track["diffs"] = (track["diffs"] + [abs(_to(log, value) - _to(log, last))])[-NOISE_DIFFS:]
        else:
            track["repeats"] += 1
    if track.get("first") is None and not points:
        track["first"] = step
    if "opening" in track and len(track["opening"]) < 2 * th.patience - 1:
        track["opening"].append(value)
    if track.get("start") is None and points and points[0][0] <= step - th.reference_steps:
        track["start"] = [_median([v for _, v in points]), len(points)]  # the first reference_steps steps are in
    points.append([step, value])
    # Keep the reference window (in steps), but never fewer than 2 x patience points, so that sparse logging
    # (--logger.logging_steps close to reference_steps) still has a reference from before the last patience points.
    while len(points) > 2 * th.patience and points[0][0] <= step - th.reference_steps:
        points.pop(0)


def _noise(track: dict, th: Thresholds, scale: float, robust: bool) -> float:
    """Step-to-step standard deviation of the judged values; inf while too few moves to say (unless flat).
    `robust`: from the median absolute difference (a spike does not widen it); else from the root mean square
    (less the largest tenth), for rewards: a small group's rewards are bimodal, most differences are small and
    the jumps between the two modes are the noise that matters."""
    diffs = track["diffs"]
    if len(diffs) >= 3:
        if robust:
            spread = 1.4826 * _median(diffs)
        else:  # root mean square without the largest tenth (the fall being judged is one of the differences)
            kept = sorted(diffs)[:len(diffs) - max(1, len(diffs) // 10)]
            spread = math.sqrt(sum(d * d for d in kept) / len(kept))
        # An estimate from few differences is itself noisy: widen it while there are few (x2 at 4, x1.25 at 16).
        sigma = spread / math.sqrt(2) * (1 + 4 / len(diffs))
    elif robust and len(diffs) <= 1 and track["repeats"] >= th.patience - 1:
        sigma = 0.0  # flat (patience equal values), one move at most: a length that fell once and stays there
    else:  # too few moves to say yet
        sigma = math.inf
    return max(sigma, 1e-3 * scale, 1e-12)


def _trimmed_mean(values: list[float]) -> float:
    """Mean without the highest and lowest tenth (none of fewer than 10 values). A tenth, not more: in a fall the
    low values are the ones cut, so each point cut is a point of delay."""
    ordered, cut = sorted(values), len(values) // 10
    middle = ordered[cut:len(ordered) - cut]
    return sum(middle) / len(middle)


def _level(track: dict, th: Thresholds, log: bool, peak: bool, robust: bool = True) -> Level:
    points = track["points"]
    values = [_to(log, v) for _, v in points]
    last_step = points[-1][0]
    # Medians for lengths, entropy and KL; trimmed means for rewards, which a small group makes bimodal (a median
    # would jump between the two modes).
    center = _median if robust else _trimmed_mean
    n_short = min(len(values), 2 * th.patience - 1)
    short = center(values[-n_short:])
    n_long = max(n_short, sum(1 for s, _ in points if s > last_step - th.level_steps))
    long = _trimmed_mean(values[-n_long:])
    if peak:  # the highest short level since the start (over at least patience points once there are that many),
        # a spike left out: at most SPIKE_FACTOR x the median of the last 2 x (2 x patience - 1) - 1 points (log units)
        level = min(short, center(values[-(4 * th.patience - 3):]) + math.log(SPIKE_FACTOR))
        if track["peak"] is None or n_short < th.patience:
            track["peak"] = level
        track["peak"] = max(track["peak"], level)
        ref, n_ref = (track["peak"], n_short) if len(values) > th.patience else (None, 0)
    else:
        before = values[:-th.patience]
        # A reward's reference needs as many points as its short level: the mean of a few points of a skewed reward
        # (mostly failures, an occasional success) moves by a whole success, and a fall freezes it where it is.
        enough = 1 if robust else 2 * th.patience - 1
        ref, n_ref = (center(before), len(before)) if len(before) >= enough else (None, 0)
    sigma = _noise(track, th, 1.0 if log else abs(short) + abs(ref or 0.0), robust)
    opening = track.get("opening")  # absent from a state saved before 0.3
    if opening is not None:
        top = track.get("top")
        if len(opening) == 2 * th.patience - 1 and top is not None and short > top:
            track["risen"] = True
        track["top"] = short if top is None else max(top, short)
    if not robust and n_long >= 2 * th.patience - 1:
        track["low"] = long if track.get("low") is None else min(track["low"], long)
    return Level(short, long, ref, sigma, n_short, n_long, n_ref, log, None if robust else track.get("low"),
                 track.get("start"), _to(log, _median(opening)) if track.get("risen") else None)


def _from_start(lv: Level) -> Level | None:
    """The level against its start level instead of its reference (None until the first reference_steps are in)."""
    return None if lv.start is None else replace(lv, ref=_to(lv.log, lv.start[0]), n_ref=lv.start[1], from_start=True)


def _with_reference(lv: Level, frozen: list) -> Level:
    """The level against a frozen [reference, points it was the median of, lowest level then]: its noise is that of
    its own points."""
    return replace(lv, ref=_to(lv.log, frozen[0]), n_ref=frozen[1], low=frozen[2] if len(frozen) > 2 else lv.low)


# ----------------------------------------------------------------------------------------------- detectors
# judge(level, th, state, levels) -> (strength, measure, candidate): strength > 0 while the condition holds; measure
# is the per-step metric (ratio, drawdown); candidate: past the ratio (size) part alone, which freezes the reference
# (a fall that has not yet cleared the noise must not pull its own reference down while it does). The ratio part
# is judged on the short level (fast: a majority of the last 2 x patience - 1 points), the noise part on the long
# level (a trimmed mean over level_steps steps: the level's noise, not a single step's, is the unit).
# `levels` holds this step's Level of each signal (and what the length judges found about truncation).


def _fall(ratio_limit: float, ratio_units: float, lv: Level, th: Thresholds) -> tuple[float, float, bool]:
    """A positive signal (judged on logs) falling below ratio_limit x its reference: the short level past the ratio
    by ratio_units of its own noise (a 5-point median of a 2-completion run that touches the ratio is noise, not a
    fall), and the long level noise_units below the reference. The reference freezes on the ratio alone."""
    if lv.ref is None:
        return -math.inf, math.nan, False
    log_limit = math.log(ratio_limit)
    strength = min((log_limit - (lv.short - lv.ref)) / lv.noise_short - ratio_units,
                   (lv.ref - lv.long) / lv.noise_long - th.noise_units)
    return strength, math.exp(lv.short - lv.ref), lv.short - lv.ref < log_limit


def _truncation(state: dict, lv: Level, levels: dict) -> dict | None:
    """How far the mean length of the responses that were NOT truncated fell ("untruncated_ratio": now / reference,
    or / start when `lv` is judged against its start), with the truncated shares and the cap it was estimated from;
    None when it cannot be told (no cap known, or no truncated share logged at this step)."""
    cap = state["cap"] or state["max_length"]
    tl = levels.get("truncated")
    if not cap or tl is None or lv.ref is None:
        return None
    if lv.from_start:  # the truncated share at the start
        tl = _from_start(tl) or tl
    before = tl.reference if tl.reference is not None else tl.value
    now, before = min(max(tl.value, 0.0), 0.99), min(max(before, 0.0), 0.99)
    untruncated_before = (lv.reference - before * cap) / (1 - before)
    untruncated_now = (lv.value - now * cap) / (1 - now)
    if untruncated_before <= 0:  # a cap below the mean: the cap we were given is not this run's
        return None
    return {"truncated_before": before, "truncated_after": now, "length_cap": cap,
            "untruncated_ratio": untruncated_now / untruncated_before}


def _below_opening(lv: Level, th: Thresholds) -> float:
    """How far the short level is below the opening level, less noise_units, in noise units; inf for a run that has
    not risen above its opening. A fall from a level the run rose to must also take it below where it began: answers
    of 7 tokens that grow to 30 during a reward crash and go back to 7, an entropy that starts near-deterministic, rises
    tenfold during an instability and settles back, have not collapsed. (A run that fell within its opening values
    never rose above them, so a fall there is judged as any other.)"""
    if lv.opening is None:
        return math.inf
    noise = math.hypot(lv.level_noise, 1.2533 * lv.sigma / math.sqrt(2 * th.patience - 1))
    return (lv.opening - lv.short) / noise - th.noise_units


def _length_fall(lv: Level, th: Thresholds, state: dict, levels: dict, name: str,
                 by_cap: bool) -> tuple[float, float, bool]:
    """The stronger of two falls: below collapse_ratio x the reference (the trailing median: a sharp collapse), and
    below start_ratio x the start level (a slow decline, which the trailing reference follows down). Each is a
    collapse unless the truncated share explains it (`by_cap`: the truncation drop's judge wants the opposite). The
    level judged against (its reference) and the truncation it was told from are left in levels["judged"][name]
    for the raise's message."""
    best = (-math.inf, math.nan, False)
    track = state["signals"]["length"]
    # A base model's first steps are not its level: learning the output format (R1-Zero-style runs) moves the length
    # 2-6x within ~10 steps and it grows back, while the corpus rule's start is the median of the first 10 points.
    first = track.get("first")  # None in a state saved before warmup_steps: long warmed up
    if first is not None and track["points"][-1][0] - first < th.warmup_steps:
        return best
    for ratio_limit, judged in ((th.collapse_ratio, lv), (th.start_ratio, _from_start(lv))):
        if judged is None:
            continue
        strength, ratio, candidate = _fall(ratio_limit, th.ratio_units, judged, th)
        truncation = _truncation(state, judged, levels) if candidate else None
        # explained by the cap: it let go, and the responses that were not truncated kept collapse_ratio of their length
        # (for a fall from the start level too: start_ratio measures how far the level fell, not what explains it)
        if candidate and (truncation is not None and truncation["untruncated_ratio"] >= th.collapse_ratio) != by_cap:
            strength, candidate = -math.inf, False
        if judged is lv or strength > max(best[0], 0):  # the ratio reported: the reference's unless the start's holds
            best = (strength, ratio, candidate or best[2])
            levels.setdefault("judged", {})[name] = (judged, truncation or {})
    below = _below_opening(lv, th)
    return min(best[0], below), best[1], best[2] and below > 0


def _length_collapse(lv: Level, th: Thresholds, state: dict, levels: dict) -> tuple[float, float, bool]:
    return _length_fall(lv, th, state, levels, "length_collapse", by_cap=False)


def _truncation_drop(lv: Level, th: Thresholds, state: dict, levels: dict) -> tuple[float, float, bool]:
    if state["detectors"]["length_collapse"]["step"] is not None:  # already called a collapse: not the cap
        return -math.inf, _fall(th.collapse_ratio, th.ratio_units, lv, th)[1], False
    return _length_fall(lv, th, state, levels, "truncation_drop", by_cap=True)


def _reward_drop(lv: Level, th: Thresholds, state: dict, levels: dict) -> tuple[float, float, bool]:
    if lv.ref is None:
        return -math.inf, math.nan, False
    # The size of a fall: a share of what the reward gained over its lowest level (not of |reference|: a reward whose
    # failures score 8.4, or a reward model's scores around -1, mean the same as a 0/1 success rate), and at least one
    # step's noise (a fall of the level smaller than that is no fall however many points confirm it).
    gain = abs(lv.ref) if lv.low is None else max(lv.ref - lv.low, 0.0)
    size = max(th.reward_drop * gain, lv.sigma)
    drawdown = (lv.ref - lv.long) / lv.noise_long
    # A reward stuck at one value below its reference (a policy that only fails: 0 at every step) tells more than
    # its 20-step level, which still holds the points before: a run of n equal values, where that value was a share
    # q of the points before it, comes by chance with probability q^n (q with one success and one failure added).
    points = state["signals"]["reward"]["points"]
    stuck = next((n for n, (_, value) in enumerate(reversed(points)) if value != points[-1][1]), len(points))
    if stuck >= th.patience and points[-1][1] < lv.ref:
        before = [value for _, value in points[:-stuck]]
        chance = ((sum(value == points[-1][1] for value in before) + 1) / (len(before) + 2)) ** stuck
        drawdown = max(drawdown, NormalDist().inv_cdf(1 - max(min(chance, 0.5), 1e-12)))
    strength = min((lv.ref - lv.short - size) / lv.noise_short, drawdown - th.noise_units)
    return strength, drawdown, lv.ref - lv.short > size


def _entropy_collapse(lv: Level, th: Thresholds, state: dict, levels: dict) -> tuple[float, float, bool]:
    """Below entropy_ratio x the highest level, and below entropy_nats: near-deterministic, not merely lower. The
    absolute floor is a second test the length has no counterpart of, so the ratio needs entropy_ratio_units only."""
    strength, ratio, candidate = _fall(th.entropy_ratio, th.entropy_ratio_units, lv, th)
    below = min((math.log(th.entropy_nats) - lv.short) / lv.level_noise, _below_opening(lv, th))
    return min(strength, below), ratio, candidate and below > 0


def _kl_blowup(lv: Level, th: Thresholds, state: dict, levels: dict) -> tuple[float, float, bool]:
    """The level above kl_limit_nats; and where the run's reference is still below that, above kl_factor x it (a run
    already above the limit at its first points is raised on the limit alone). The limit is in nats, the noise
    test is the limit's: a KL that rises to 1 nat over 20 steps is no less a blow-up for having risen slowly."""
    past = lv.short - th.kl_limit_nats
    # Before its noise is known (fewer than 3 moves), how far past the limit is counted in limits.
    strength = past / lv.level_noise if math.isfinite(lv.level_noise) else past / th.kl_limit_nats
    candidate = past > 0
    if lv.ref is not None and lv.ref < th.kl_limit_nats:
        rise = lv.short - th.kl_factor * lv.ref
        strength = min(strength, rise / lv.noise_short)
        candidate = candidate and rise > 0
    return strength, lv.short / max(lv.ref if lv.ref is not None else 0.0, 0.01), candidate


@dataclass(frozen=True)
class Detector:
    name: str
    signal: str
    judge: Callable[[Level, Thresholds, dict, dict], tuple[float, float, bool]]
    measure: str  # the per-step bai/* metric of `measure`
    peak: bool = False  # reference: the highest level since the start instead of the windowed median
    # hold: raised once held at patience consecutive log points, its level counted from the first point (KL: a
    # single-step spike lifts a 5-point median for a point or two; a run in the thousands from its first point is
    # raised at its patience-th); else raised at the first point held raise_units past the threshold (or at the
    # patience-th held in a row), once the level spans patience points.
    hold: bool = False
    describe: Callable[[Level, float, Thresholds], str] = None  # (level, measure, th) -> the message when raised
    # threshold(reference at the raise, th): the level (signal units) a fall raised against that reference went
    # below. The fall has ended once the short level is halfway back from it to the reference (_halfway_back) at
    # patience log points in a row; a raise still open at the end of a log is a collapse that did not come back only
    # while the level is below it (verdict's unrecovered_step).
    threshold: Callable[[float, Thresholds], float] = None
    # back(level, reference at the raise, th), for a detector without a threshold: the signal is on the healthy side
    # again (same patience rule). A detector with neither (KL) does not end.
    back: Callable[[Level, float, Thresholds], bool] = None


def _pct(lv: Level) -> str:
    return f"{lv.value / lv.reference:.0%}" if lv.reference else "-"


def _halfway_back(lv: Level, threshold: float, reference: float) -> bool:
    """The short level at least halfway back from the threshold to the reference (in logs: the geometric mean), so
    that a level wavering around the threshold does not end and raise the detection again and again."""
    return lv.value >= math.sqrt(threshold * reference)


def _length_threshold(reference: float, th: Thresholds) -> float:
    # collapse_ratio also for a raise against the start level: a slow collapse must come back as far to have ended
    return th.collapse_ratio * reference


DETECTORS_TABLE = (
    Detector("length_collapse", "length", _length_collapse, "bai/response_length_ratio",
             describe=lambda lv, m, th: f"sequence length collapse: response length level {lv.value:.0f} at "
             f"{_pct(lv)} of its " + (
                 f"start level {lv.reference:.0f} tokens (--bai.start_ratio {th.start_ratio:g})" if lv.from_start
                 else f"reference {lv.reference:.0f} tokens (--bai.collapse_ratio {th.collapse_ratio:g})"),
             threshold=_length_threshold),
    Detector("truncation_drop", "length", _truncation_drop, "bai/response_length_ratio",
             describe=lambda lv, m, th: f"length drop from the truncation cap: response length level "
             f"{lv.value:.0f} at {_pct(lv)} of its {'start level' if lv.from_start else 'reference'} "
             f"{lv.reference:.0f} tokens, but the responses that were "
             "not truncated kept their length: the model stopped hitting the length limit, it did not stop reasoning",
             threshold=_length_threshold),
    # Recovered only when back at its old level (within one noise unit): the slow climb is the hockey stick's blade.
    Detector("hockey_stick", "reward", _reward_drop, "bai/reward_drawdown",
             describe=lambda lv, m, th: f"reward hockey stick: reward level {lv.value:.4g} fell from its reference "
             f"{lv.reference:.4g} by {m:.1f} noise units "
             f"(--bai.reward_drop {th.reward_drop:g}, --bai.noise_units {th.noise_units:g})",
             back=lambda lv, reference, th: lv.short >= reference - lv.noise_short),
    Detector("entropy_collapse", "entropy", _entropy_collapse, "bai/entropy_ratio", peak=True,
             describe=lambda lv, m, th: f"entropy collapse: policy entropy level {lv.value:.3g} at {_pct(lv)} of "
             f"its highest level {lv.reference:.3g} (--bai.entropy_ratio {th.entropy_ratio:g})",
             threshold=lambda reference, th: min(th.entropy_ratio * reference, th.entropy_nats)),
    Detector("kl_blowup", "kl", _kl_blowup, "bai/kl_ratio", hold=True,
             describe=lambda lv, m, th: f"KL blow-up: KL level {lv.value:.3g} nats against its reference "
             f"{'-' if lv.reference is None else format(lv.reference, '.3g')} (--bai.kl_limit_nats "
             f"{th.kl_limit_nats:g}, --bai.kl_factor {th.kl_factor:g})"),
)
DETECTORS = tuple(d.name for d in DETECTORS_TABLE)  # what can fire, in the order checked; each is an alarm


def new_state(cap: float | None = None) -> dict:
    """Detector state: plain numbers and lists only, so it fits in client_states and JSON. `cap`: the run's
    response-length limit in tokens, when known."""
    return {
        "version": STATE_VERSION,
        "steps": 0,
        "cap": cap,  # the run's length limit; else max_length, the largest max-length metric logged
        "max_length": None,
        "signals": {name: _new_track() for name in SIGNAL_KEYS},
        # step: first raised at; run: consecutive log points held; weakest: the strengths of its last patience;
        # sustained: the step it first became strong and sustained (on_collapse acts); strength / max_strength: at the
        # first raise and the highest; extreme: lowest ratio (highest for KL, deepest drawdown for the reward) while
        # judged; reference: what it was measured against at the first raise (else at the extreme); recovery_steps:
        # from the first raise to its recovery; back / back_step: log points in a row back on the healthy side, and
        # the first of them; episodes: every raise, {"step", "reference", "sustained", "recovery_step"}, the last
        # one open (the detection holds) until it recovers.
        "detectors": {d.name: {"step": None, "run": 0, "weakest": None, "sustained": None, "strength": None,
                               "max_strength": None, "extreme": None, "reference": None, "recovery_steps": None,
                               "depth": 0.0, "back": 0, "back_step": None, "episodes": []}
                      for d in DETECTORS_TABLE},
        # What fired, in order: {"detector", "step", "message", "values", "alarm"}; the monitor acts on new entries.
        "events": [],
    }


def upgrade_state(old: dict, th: Thresholds = Thresholds()) -> dict | None:
    """A state saved by an older version, carried over where it can be: 0.2's (version 2) smoothed windows become
    the points the references are taken from, and what it had raised stays raised (not raised again). None for
    anything else (start afresh)."""
    if not isinstance(old, dict):
        return None
    if old.get("version") == STATE_VERSION:
        return old
    if old.get("version") == 3:  # one raise each: it becomes the first episode (open unless the reward recovered)
        for found in old["detectors"].values():
            recovery = found["recovery_steps"]
            found["episodes"] = [] if found["step"] is None else [
                {"step": found["step"], "reference": found["reference"], "sustained": found["sustained"],
                 "recovery_step": None if recovery is None else found["step"] + recovery}]
        old["version"] = STATE_VERSION
        return old
    if old.get("version") != 2:
        return None
    state = new_state()
    state["steps"] = old.get("steps", 0)
    for name, track in (old.get("signals") or {}).items():
        if name in state["signals"]:
            points = [[int(s), float(v)] for s, v in track.get("window", [])]
            log = name in LOG_SIGNALS  # the differences again, in the units now judged (0.2 kept raw ones)
            diffs = [abs(_to(log, b[1]) - _to(log, a[1])) for a, b in zip(points, points[1:]) if a[1] != b[1]]
            state["signals"][name].update(points=points, diffs=diffs[-NOISE_DIFFS:])
    for name in DETECTORS:
        step = (old.get(name) or {}).get("step")
        if step is not None:
            state["detectors"][name].update(step=step, sustained=step, episodes=[
                {"step": step, "reference": None, "sustained": step, "recovery_step": None}])
    return state


def _event(state: dict, detector: str, step: int, message: str, values: dict, alarm: bool = True,
           sustained: bool = False) -> None:
    """alarm: a detection raised (warn and alert); sustained: one that became strong and sustained (save/stop act)."""
    state["events"].append({"detector": detector, "step": step, "message": message, "values": values, "alarm": alarm,
                            "sustained": sustained})


def observe(state: dict, step: int, metrics: Mapping[str, Any], th: Thresholds = Thresholds()) -> dict:
    """Update `state` with one logged step; return that step's bai/* diagnostics (those it could compute)."""
    state["steps"] += 1
    biggest = first_value(metrics, MAX_LENGTH_KEYS)
    if biggest is not None and biggest > (state["max_length"] or 0):
        state["max_length"] = biggest
    levels = {}  # this step's Level of each signal logged at it (one median per signal and step)
    for name, keys in SIGNAL_KEYS.items():
        value = first_value(metrics, keys)
        if value is not None:
            _feed(state["signals"][name], step, value, th, name in LOG_SIGNALS)
            levels[name] = _level(state["signals"][name], th, name in LOG_SIGNALS, name == "entropy",
                                  name not in MEAN_SIGNALS)
    out: dict[str, float] = {}
    for detector in DETECTORS_TABLE:
        if detector.signal not in levels:
            continue
        track, found = state["signals"][detector.signal], state["detectors"][detector.name]
        frozen = track["frozen"].get(detector.name)
        lv = levels[detector.signal] if frozen is None else _with_reference(levels[detector.signal], frozen)
        strength, measure, candidate = detector.judge(lv, th, state, levels)
        held = strength > 0 and lv.points >= (1 if detector.hold else th.patience)
        _track_extreme(detector, found, lv, measure)
        if (candidate or held) and lv.ref is not None:
            track["frozen"].setdefault(detector.name, [lv.reference, lv.n_ref, lv.low])
        elif not (candidate or held):
            track["frozen"].pop(detector.name, None)
        if held:  # weakest: the strengths of the last patience points held
            found["run"] += 1
            found["weakest"] = ([] if found["run"] == 1 else found["weakest"])[-(th.patience - 1):] + [strength]
        else:
            found["run"], found["weakest"] = 0, None
        episodes = found["episodes"]
        episode = episodes[-1] if episodes and episodes[-1]["recovery_step"] is None else None  # raised, not ended
        # A point a hair past the threshold is as likely noise as a fall: raised at once only raise_units past it.
        if (held and episode is None and found["run"] >= (th.patience if detector.hold else 1)
                and (strength >= th.raise_units or found["run"] >= th.patience)):
            # the level as judged: a length against its reference or its start, and the truncation told from it
            judged, truncation = levels.get("judged", {}).get(detector.name, (lv, {}))
            episode = {"step": step, "reference": judged.reference, "sustained": None, "recovery_step": None}
            episodes.append(episode)
            values = {"level": judged.value, "reference": judged.reference, "strength": strength,
                      detector.measure.removeprefix("bai/"): measure, **truncation}
            if found["step"] is None:  # the verdict's fields describe the first raise
                found.update(step=step, strength=strength, reference=judged.reference, **truncation)
            again = f" (again: the last one ended at step {episodes[-2]['recovery_step']})" if episodes[:-1] else ""
            _event(state, detector.name, step, f"{detector.describe(judged, measure, th)}; {strength:.1f} noise "
                   f"units past the threshold{again}", values)
        if held:
            found["max_strength"] = max(found["max_strength"] or strength, strength)
        if (episode is not None and episode["sustained"] is None and found["run"] >= th.patience
                and min(found["weakest"]) >= th.action_strength):
            episode["sustained"] = step
            found["sustained"] = found["sustained"] or step
            _event(state, detector.name, step, f"{detector.name.replace('_', ' ')} (raised at step {episode['step']}) "
                   f"sustained: held {found['run']} log points, each at least {th.action_strength:g} noise units past "
                   "the threshold (--bai.action_strength)",
                   {"strength": min(found["weakest"]), "raised_step": episode["step"]},
                   alarm=False, sustained=True)
        _recovery(state, detector, found, episode, lv, step, th)
        if math.isfinite(measure) and (held or candidate or detector.measure not in out):
            out[detector.measure] = measure  # two rows share the length ratio: the one holding (frozen) reports it
        out[f"bai/{detector.name}"] = float(held and episode is not None)
        out[f"bai/{detector.name}_strength"] = max(strength, -99.0) if math.isfinite(strength) else -99.0
    found = state["detectors"]
    if found["length_collapse"]["step"] is not None:
        out["bai/length_collapse_step"] = float(found["length_collapse"]["step"])
    if found["hockey_stick"]["recovery_steps"] is not None:
        out["bai/reward_recovery_steps"] = float(found["hockey_stick"]["recovery_steps"])
    return out


def _track_extreme(detector: Detector, found: dict, lv: Level, measure: float) -> None:
    """The lowest ratio (KL: highest; reward: deepest drawdown) seen, and the reference it was measured against."""
    if not math.isfinite(measure):
        return
    worse = max if detector.name in ("kl_blowup", "hockey_stick") else min
    if found["extreme"] is None or worse(measure, found["extreme"]) == measure:
        found["extreme"] = measure
        if found["step"] is None:
            found["reference"] = lv.reference
    if detector.name == "hockey_stick" and found["step"] is not None:
        found["depth"] = max(found["depth"], measure)


def _recovery(state: dict, detector: Detector, found: dict, episode: dict | None, lv: Level, step: int,
              th: Thresholds) -> None:
    """After a raise: the signal back on the healthy side of its threshold (detector.back; the reward: within one
    noise unit of the reference it fell from) at patience log points in a row ends the episode, from the first of
    them, and arms the detector again. A collapse that comes back was a dip: the corpus rule's collapse never does."""
    # A raise carried over from 0.2's state has no reference to come back to; KL blow-ups do not end.
    if episode is None or episode["reference"] is None or (detector.back is None and detector.threshold is None):
        return
    if detector.threshold is not None:
        threshold = detector.threshold(episode["reference"], th)
        episode["below"] = lv.value < threshold  # at the last point seen: read by verdict's unrecovered_step
        healthy = _halfway_back(lv, threshold, episode["reference"])
    else:
        healthy = detector.back(lv, episode["reference"], th)
    # Back for patience points in a row (a point that holds the condition again breaks the row): a noisy signal
    # touching its old level once has not recovered.
    back = found["run"] == 0 and healthy
    found["back"] = found["back"] + 1 if back else 0
    if found["back"] == 1:
        found["back_step"] = step
    if found["back"] < th.patience:
        return
    episode["recovery_step"], found["back"] = found["back_step"], 0
    steps = episode["recovery_step"] - episode["step"]
    if found["recovery_steps"] is None:
        found["recovery_steps"] = steps
    if detector.name == "hockey_stick":
        _event(state, "reward_recovered", step, f"reward back at its reference {steps} steps after the drop at "
               f"step {episode['step']}: a hockey stick", {"recovery_steps": steps}, alarm=False)
    else:
        _event(state, f"{detector.name}_recovered", step, f"{detector.name.replace('_', ' ')} raised at step "
               f"{episode['step']} has ended: back on the healthy side of its threshold since step "
               f"{episode['recovery_step']} ({steps} steps after the raise)", {"recovery_steps": steps}, alarm=False)


def verdict(state: dict) -> dict:
    """The run's summary, in the shape `diagnose --json` writes (fields are only ever added, never renamed)."""
    d = state["detectors"]
    length, hockey, entropy, kl, truncation = (d[name] for name in (
        "length_collapse", "hockey_stick", "entropy_collapse", "kl_blowup", "truncation_drop"))

    def common(found):  # added in 0.3: how strong, when --bai.on_collapse save/stop would have acted, and each
        # raise and whether it ended; unrecovered_step: the raise still open at the end of the log with its level
        # still below its threshold there (a collapse that did not come back), else None. A level back above the
        # threshold but not yet halfway back to the reference has not ended (the monitor does not raise it again),
        # yet it is not a collapse that stayed, as the corpus rule's collapse is one never back above 60 %.
        last = found["episodes"][-1] if found["episodes"] else None
        unrecovered = last is not None and last["recovery_step"] is None and last.get("below", True)
        episodes = [{key: e[key] for key in ("step", "sustained", "recovery_step")} for e in found["episodes"]]
        return {"strength": found["strength"], "max_strength": found["max_strength"],
                "sustained_step": found["sustained"], "reference": found["reference"],
                "recovery_steps": found["recovery_steps"], "recovered": found["recovery_steps"] is not None,
                "episodes": episodes, "unrecovered_step": last["step"] if unrecovered else None}

    lowest_length = min((x for x in (length["extreme"], truncation["extreme"]) if x is not None), default=None)
    collapse, cap_drop = common(length), common(truncation)
    if collapse["unrecovered_step"] is not None:  # one fall at the log's end: the collapse it became, not a cap drop
        cap_drop["unrecovered_step"] = None
    return {
        "length_collapse": {"detected": length["step"] is not None, "step": length["step"],
                            "min_ratio": lowest_length, "untruncated_ratio": length.get("untruncated_ratio"),
                            **collapse},
        "hockey_stick": {"detected": hockey["step"] is not None, "drop_step": hockey["step"],
                         "depth": hockey["depth"], **common(hockey)},
        "entropy_collapse": {"detected": entropy["step"] is not None, "step": entropy["step"],
                             "min_ratio": entropy["extreme"], **common(entropy)},
        "kl_blowup": {"detected": kl["step"] is not None, "step": kl["step"], "max_ratio": kl["extreme"],
                      **common(kl)},
        "truncation_drop": {"detected": truncation["step"] is not None, "step": truncation["step"],
                            "truncated_rate_before": truncation.get("truncated_before"),
                            "truncated_rate_after": truncation.get("truncated_after"),
                            "untruncated_ratio": truncation.get("untruncated_ratio"),
                            "length_cap": state["cap"] or state["max_length"], **cap_drop},
        "steps": state["steps"],
        # The references the verdicts are measured against: at the detection, else at the lowest point.
        "baseline_length": length["reference"] if length["step"] is not None else
        (truncation["reference"] if truncation["step"] is not None else length["reference"]),
        "baseline_reward": hockey["reference"],
        "baseline_entropy": entropy["reference"],
    }


def analyze(rows: Iterable[tuple[int, Mapping[str, Any]]], th: Thresholds = Thresholds(),
            cap: float | None = None) -> tuple[dict, list[dict]]:
    """Run the detectors over a whole series of (step, metrics); return the verdict and each step's output."""
    state = new_state(cap)
    per_step = [dict(observe(state, step, metrics, th), step=step) for step, metrics in rows]
    return verdict(state), per_step
