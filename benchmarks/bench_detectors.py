"""The detectors as classifiers, scored leave-one-source-out on real runs, against the best simple rules.

Corpus (openrlhf_bai.diagnostics.corpus): the real published runs under tests/data/curves (provenance and labels
beside each; a run's *source* is its label's "source", else its repository) and, reported apart, the seeded
synthetic shapes (--seeds times over). Contenders, on the same curves:
- openrlhf-bai (defaults): detectors.analyze with the default Thresholds, fixed a priori (see docs: chosen on the
  runs the corpus held when they were set), what the monitor and `diagnose` run;
- openrlhf-bai, save/stop (sustained): the same run, scored where --bai.on_collapse save/stop act (a detection held
  at patience points in a row, each action_strength noise units past its threshold);
- openrlhf-bai, whole log (did not come back): the same run, as `diagnose` reads a finished log: a length or entropy
  collapse counts only where it had not ended by the end of the log (its verdict's unrecovered_step), as the corpus
  rule's collapse never comes back; a hockey stick is its drop, recovered or not, and a KL blow-up its first raise;
- openrlhf-bai (LOSO): for each source, the thresholds of GRID that do best (fewest misses + false alarms + late,
  ties to the defaults) on the real runs of every OTHER source, then scored on that source;
- rolling median: the ten-line rule of issue 15, a median of the last 20 steps against the median of the first
  20 steps for 3 log points in a row: length below 0.6; reward fallen by half of |first| (a hockey stick's drop);
  entropy below 0.2; KL above max(10 x first, 0.5 nats) or 1 nat;
- CUSUM (Page, h = 5): the textbook online change detector, optimal for a known shift from a known level: the
  level and spread of the first 20 steps (lengths, entropy and KL on logs), a shift to the rolling median's limits
  (KL: up to its limit), alarm once the summed log-likelihood ratio reaches 5;
- plain threshold: the same limits on the raw values against the first logged value, no window, no patience;
- PELT (ruptures 1.1.10, offline: it sees the whole curve): the first change point after which the segment mean
  is past the same limits against the segment before it;
- rlwatch 0.5.1 (its EntropyCollapseDetector and KLExplosionDetector with their defaults; it has no length or
  reward detector), a critical alert counting as the detection;
- the corpus rule, read live (tests/data/curves/label_rule.py, the rule the labels come from): at each log point,
  the rule run on the log up to that point, raised at the first point it calls the event; and the same with the
  start and level windows of the whole log (its row count: on the five runs that log a metric on fewer rows, that
  metric's own count gives the same detections), so that it differs from the labels only by the points still to
  come. Not a contender to beat: it measures how much of the labels no reader of the log so far can know
  (a fall that comes back later is healthy by the rule, a collapse by the rule on the points before).
The real runs are also split by the model the RL actor started from (actor_kind): a base model learning the output
format, or a post-trained one (instruct, SFT, distilled, thinking: the paper's setting and BAI's merged actor).
Each real event is also split by what an oracle sees of it by the last log point a hit may be raised at
(corpus.oracle_units): events under noise_units there are noise-limited, no contender can raise them in time.
Only the events a contender covers are scored for it (truncation_drop: ours only). ruptures and rlwatch are
benchmark-only: installed (pinned) into a cache folder on first use, never into the project's environment.

    python benchmarks/bench_detectors.py [--seeds 10] [--json FILE] [--skip-references]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from unittest import mock

from openrlhf_bai.diagnostics.corpus import (EVENTS, SIGNAL_OF, detections, oracle_units, real_curves, score,
                                             synthetic_curves)
from openrlhf_bai.diagnostics.detectors import SIGNAL_KEYS, Thresholds, analyze, first_value, new_state, observe

REPO = Path(__file__).resolve().parents[1]
DEPS = Path(os.environ.get("OPENRLHF_BAI_ENV_CACHE", Path.home() / ".cache" / "openrlhf-bai")) / "bench-detectors-deps"
PINS = ("ruptures==1.1.10", "rlwatch==0.5.1", "scipy==1.16.3")
SIMPLE = ("length_collapse", "hockey_stick", "entropy_collapse", "kl_blowup")
GRID = {"noise_units": (2.0, 3.0, 4.0), "collapse_ratio": (0.5, 0.6, 0.7), "entropy_ratio": (0.15, 0.2, 0.25),
        "reward_drop": (0.3, 0.5), "ratio_units": (1.0, 2.0, 3.0), "entropy_ratio_units": (1.0, 2.0),
        "raise_units": (0.0, 0.5)}


def ensure_deps() -> None:
    if not (DEPS / ".complete").exists():
        print(f"installing {' '.join(PINS)} into {DEPS} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(DEPS), *PINS],
                       check=True)
        (DEPS / ".complete").touch()
    sys.path.insert(0, str(DEPS))


def series(curve: dict, signal: str) -> list[tuple[int, float]]:
    points = [(step, first_value(metrics, SIGNAL_KEYS[signal])) for step, metrics in curve["rows"]]
    return [(step, value) for step, value in points if value is not None]


def ours(curve: dict, th: Thresholds) -> dict:
    return detections(analyze(curve["rows"], th, cap=curve.get("cap"))[0])


def ours_whole_log(curve: dict, th: Thresholds) -> dict:
    """A finished log, read as `diagnose` reports it: the collapses still holding at its end."""
    verdict = analyze(curve["rows"], th, cap=curve.get("cap"))[0]
    return {**detections(verdict), **{name: verdict[name]["unrecovered_step"]
                                      for name in ("length_collapse", "truncation_drop", "entropy_collapse")}}


def ours_sustained(curve: dict, th: Thresholds) -> dict:
    """Where --bai.on_collapse save/stop would act: each detection's sustained step."""
    verdict = analyze(curve["rows"], th, cap=curve.get("cap"))[0]
    return {name: verdict[name]["sustained_step"] for name in detections(verdict)}


def actor_kind(curve: dict) -> str:
    """The model the run's actor started from, read from its provenance's "model": "base" where it names a base
    model (an id ending -Base, "(base", "base model", gpt2) and no SFT stage before the RL, "post-trained" for any
    other recorded model (instruct, -it, SFT, distilled, thinking), "not recorded" where the run does not say (or
    says only that the model was pre-trained from scratch)."""
    model = (curve["provenance"].get("model") or "").lower()
    if not model or model.startswith(("unknown", "unresolved")) or "from scratch" in model:
        return "not recorded"
    if "sft" in model:  # a base model after a format SFT starts its RL post-trained
        return "post-trained"
    named_base = re.search(r"-base\b|\(base\b|\bbase model\b", model) or re.match(r"\S+ base\b", model)
    if named_base or model.startswith("gpt2"):
        return "base"
    return "post-trained"


# ------------------------------------------------------------------------------------------- the references


def limit(name: str, first: float) -> float:
    """The level each simple rule calls an event, from the level the signal started at (`first`): a length under 0.6
    of it, an entropy under 0.2, a reward fallen by half of |first|, a KL over max(10 x first, 0.5 nat) or 1 nat."""
    return {"length_collapse": 0.6 * first, "entropy_collapse": 0.2 * first,
            "hockey_stick": first - 0.5 * abs(first)}.get(name, min(1.0, max(10 * first, 0.5)))


def past(name: str, value: float, first: float, spread: float = 0.0) -> bool:
    """A level (`value`) past its simple rule's limit; a reward's fall must also be 3 x `spread`."""
    if name == "kl_blowup":
        return value > limit(name, first)
    if name == "hockey_stick":
        return value < min(limit(name, first), first - 3 * spread)
    return first > 0 and value < limit(name, first)


def rolling_median(curve: dict, th: Thresholds) -> dict:
    found = {}
    for name in SIMPLE:
        points, found[name] = series(curve, SIGNAL_OF[name]), None
        if not points:
            continue
        first = statistics.median(v for s, v in points if s < points[0][0] + 20)
        run = 0
        for i, (step, _) in enumerate(points):
            last = statistics.median(v for s, v in points[: i + 1] if s > step - 20)
            run = run + 1 if past(name, last, first) else 0
            if run >= 3:
                found[name] = step
                break
    return found


def cusum(curve: dict, th: Thresholds) -> dict:
    """Page's CUSUM: the optimal online test for a known shift from a known level. Level and spread from the first
    20 steps (as the rolling median's start); the shift is to the same limit(); h = 5, the textbook threshold."""
    found = {}
    for name in SIMPLE:
        points, found[name] = series(curve, SIGNAL_OF[name]), None
        log = name != "hockey_stick"  # lengths, entropy and KL as ratios, the reward as a difference
        values = [(step, math.log(max(v, 1e-9)) if log else v) for step, v in points]
        head = [x for step, x in values if step < points[0][0] + 20] if points else []
        if len(head) < 3:
            continue
        start, spread = statistics.median(head), statistics.stdev(head)
        bound = limit(name, math.exp(start) if log else start)
        shift = (math.log(bound) if log else bound) - start
        spread = max(spread, 1e-3 * abs(shift), 1e-12)
        total = 0.0
        for step, x in values:  # the log-likelihood ratio of "shifted" to "not", summed from its last zero
            total = max(0.0, total + shift / spread ** 2 * (x - start - shift / 2))
            if total >= 5.0:
                found[name] = step
                break
    return found


def plain_threshold(curve: dict, th: Thresholds) -> dict:
    found = {}
    for name in SIMPLE:
        points = series(curve, SIGNAL_OF[name])
        first = points[0][1] if points else 0.0
        head = [v for _, v in points[:5]]
        spread = statistics.stdev(head) if len(head) > 1 else 0.0
        found[name] = next((s for s, v in points if past(name, v, first, spread)), None)
    return found


def pelt(curve: dict, th: Thresholds) -> dict:
    import numpy as np
    import ruptures

    found = {}
    for name in SIMPLE:
        points, found[name] = series(curve, SIGNAL_OF[name]), None
        if len(points) < 4:
            continue
        steps = [s for s, _ in points]
        signal = np.array([v for _, v in points])
        noise = np.median(np.abs(np.diff(signal))) * 1.4826 / math.sqrt(2) or 1e-3 * (abs(signal[0]) + 1)
        # BIC-style penalty on the series' own noise: a change must pay for itself.
        penalty = 3 * math.log(len(signal)) * noise ** 2
        breaks = ruptures.Pelt(model="l2", min_size=2, jump=1).fit(signal).predict(pen=penalty)
        bounds = [0, *breaks]
        for before, start, end in zip(bounds, bounds[1:], bounds[2:]):
            level, after = signal[before:start].mean(), signal[start:end].mean()
            if past(name, after, level, noise):
                found[name] = steps[start]
                break
    return found


def rlwatch(curve: dict, th: Thresholds) -> dict:
    from rlwatch.config import EntropyCollapseConfig, KLExplosionConfig
    from rlwatch.detectors import EntropyCollapseDetector, KLExplosionDetector

    found = {}
    for name, detector in (("entropy_collapse", EntropyCollapseDetector(EntropyCollapseConfig())),
                           ("kl_blowup", KLExplosionDetector(KLExplosionConfig()))):
        found[name] = None
        for step, value in series(curve, SIGNAL_OF[name]):
            alert = detector.check(step, value)
            if alert is not None and alert.severity == "critical":
                found[name] = step
                break
    return found


def _label_rule():
    spec = spec_from_file_location("label_rule", REPO / "tests" / "data" / "curves" / "label_rule.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RULE = _label_rule()


def corpus_rule_live(curve: dict, th: Thresholds, whole_log_windows: bool = False) -> dict:
    """The corpus rule on each prefix of the log; an event is raised at the first point the rule calls it present.
    `whole_log_windows`: the rule's start and level windows as for the whole log (they grow with its length)."""
    provenance = curve.get("provenance") or {}
    cap = curve.get("max_response_length") or provenance.get("max_response_length")  # as label_rule.label reads it
    rules = {"length": lambda rows: RULE.length_collapse(rows, provenance, cap)[0],
             "hockey_stick": lambda rows: {"hockey_stick": RULE.hockey_stick(rows, provenance)[0]},
             "entropy_collapse": lambda rows: {"entropy_collapse": RULE.entropy_collapse(rows, provenance)[0]},
             "kl_blowup": lambda rows: {"kl_blowup": RULE.kl_blowup(rows, provenance)[0]}}
    rows, found = curve["rows"], dict.fromkeys(EVENTS)
    windows = RULE.windows
    with mock.patch.object(RULE, "windows", (lambda n: windows(len(rows))) if whole_log_windows else windows):
        for end in range(1, len(rows) + 1):
            for verdicts in rules.values():
                try:
                    verdicts = verdicts(rows[:end])
                except ValueError:  # a prefix too short for a level: nothing the rule can judge yet
                    continue
                for name, verdict in verdicts.items():
                    if found[name] is None and verdict.get("present"):
                        found[name] = rows[end - 1][0]
    return found


def corpus_rule_live_whole_windows(curve: dict, th: Thresholds) -> dict:
    return corpus_rule_live(curve, th, whole_log_windows=True)


# ------------------------------------------------------------------------------------------------ scoring

WRONG = ("miss", "false alarm", "late", "early")


def outcomes_of(curves: list[dict], found: dict, th: Thresholds) -> list[dict]:
    """Per curve and event its outcome; `found` maps curve name -> detections (events a contender covers)."""
    rows = []
    for curve in curves:
        healthy = not any(event["present"] for event in curve["label"].values())  # no labelled event at all
        for name, result in score(curve, found[curve["name"]], th.patience).items():
            rows.append({"curve": curve["name"], "source": curve["source"], "origin": curve["origin"], "event": name,
                         "healthy": healthy, **result})
    return rows


def summarize(rows: list[dict]) -> dict:
    hits = [o for o in rows if o["outcome"] == "hit"]
    count = lambda outcome: sum(o["outcome"] == outcome for o in rows)  # noqa: E731
    return {
        "runs": len({o["curve"] for o in rows}),
        "events": sum(o["outcome"] in ("hit", "miss", "late", "early", "too short", "borderline quiet") for o in rows),
        "hits": len(hits), "late": count("late"), "early": count("early"), "misses": count("miss"),
        "too_short": count("too short"), "false_alarms": count("false alarm"),
        "borderline_quiet": count("borderline quiet"), "undecided": count("undecided"),
        "healthy_runs_with_false_alarm": len({o["curve"] for o in rows
                                              if o["outcome"] == "false alarm" and o["healthy"]}),
        "median_delay_points": statistics.median(o["delay_points"] for o in hits) if hits else None,
        "worst_delay_points": max(o["delay_points"] for o in hits) if hits else None,
    }


def cost(rows: list[dict]) -> int:
    return sum(o["outcome"] in WRONG for o in rows)


def _ours_on_all(curves: list[dict], th: Thresholds) -> dict:
    return {curve["name"]: ours(curve, th) for curve in curves}


# The GRID thresholds each detection depends on; the others leave it unchanged (loso checks this on sampled combos).
DEPENDS = {"length_collapse": ("noise_units", "collapse_ratio", "ratio_units", "raise_units"),
           "truncation_drop": ("noise_units", "collapse_ratio", "ratio_units", "raise_units"),
           "hockey_stick": ("noise_units", "reward_drop", "raise_units"),
           "entropy_collapse": ("noise_units", "entropy_ratio", "entropy_ratio_units", "raise_units"),
           "kl_blowup": ()}


def loso(real: list[dict], th: Thresholds) -> tuple[dict, dict]:
    """Per source: the GRID thresholds chosen on the other sources' runs; the detections on this source with them."""
    combos = [replace(th, **dict(zip(GRID, values))) for values in itertools.product(*GRID.values())]
    # Every combo's detections, from the few combos that cover, for each detector, every setting of the thresholds it
    # depends on (a greedy set cover: 648 combos need about 60 analyses of every run, not 648).
    key = lambda combo, event: (event, tuple(getattr(combo, k) for k in DEPENDS[event]))  # noqa: E731
    needed, cover = {key(c, event) for c in combos for event in DEPENDS}, []
    while needed:
        cover.append(max(combos, key=lambda c: sum(key(c, event) in needed for event in DEPENDS)))
        needed -= {key(cover[-1], event) for event in DEPENDS}
    with multiprocessing.Pool() as pool:  # the bulk of the benchmark's time
        analysed = dict(zip(cover, pool.starmap(_ours_on_all, [(real, c) for c in cover], chunksize=1)))
    by_key = {key(c, event): analysed[c] for c in cover for event in DEPENDS}
    found = {c: {curve["name"]: {event: by_key[key(c, event)][curve["name"]][event] for event in DEPENDS}
                 for curve in real} for c in combos}
    for c in (combos[len(combos) // 3], combos[-2]):  # a detector that reads another's thresholds breaks DEPENDS
        if _ours_on_all(real, c) != found[c]:
            raise RuntimeError(f"bench_detectors.DEPENDS is out of date: {c} detects differently when analysed whole")
    # Each combo's wrong outcomes per run, so that a source's training cost is the total less its own runs'.
    wrong = {c: {curve["name"]: cost(outcomes_of([curve], found[c], c)) for curve in real} for c in combos}
    chosen, detected = {}, {}
    for source in sorted({curve["source"] for curve in real}):
        own = [curve["name"] for curve in real if curve["source"] == source]
        train_cost = lambda c: sum(wrong[c].values()) - sum(wrong[c][name] for name in own)  # noqa: E731
        distance = lambda c: sum(abs(getattr(c, k) - getattr(th, k)) / getattr(th, k) for k in GRID)  # noqa: E731
        best = min(combos, key=lambda c: (train_cost(c), distance(c)))
        chosen[source] = {k: getattr(best, k) for k in GRID}
        detected.update({name: found[best][name] for name in own})
    return chosen, detected


def monitor_cost_us(curves: list[dict], th: Thresholds) -> tuple[float, float]:
    """Median and p99 microseconds per step of what the live monitor adds: observe() and the state copy it keeps in
    client_states (the JSONL line and the loggers are OpenRLHF's own I/O, measured in bench_monitor)."""
    times = []
    for curve in curves:
        state = new_state(curve.get("cap"))
        for step, metrics in curve["rows"]:
            t0 = time.perf_counter()
            observe(state, step, metrics, th)
            pickle.loads(pickle.dumps(state))
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1e6 * statistics.median(times), 1e6 * times[int(0.99 * (len(times) - 1))]


def fmt(value, spec="g") -> str:
    return "-" if value is None else format(value, spec)


def table(title: str, groups: dict[str, list[dict]]) -> None:
    print(f"\n{title}")
    print("| contender | runs | events | hits | late | early | misses | too short | borderline, not raised "
          "| false alarms | undecided | healthy runs with a false alarm | misses + false alarms + late/early "
          "| median / worst delay (log points) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, rows in groups.items():
        s = summarize(rows)
        print(f"| {label} | {s['runs']} | {s['events']} | {s['hits']} | {s['late']} | {s['early']} | {s['misses']} "
              f"| {s['too_short']} | {s['borderline_quiet']} | {s['false_alarms']} | {s['undecided']} "
              f"| {s['healthy_runs_with_false_alarm']} | {cost(rows)} "
              f"| {fmt(s['median_delay_points'])} / {fmt(s['worst_delay_points'])} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="synthetic curves are drawn this many times")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--skip-references", action="store_true", help="no PELT / rlwatch (no install)")
    args = parser.parse_args(argv)
    th = Thresholds()

    real = real_curves(REPO / "tests" / "data" / "curves")
    synthetic = [dict(curve, name=f"{curve['name']}#{seed}") for seed in range(args.seeds)
                 for curve in synthetic_curves(seed)]
    contenders = {"openrlhf-bai (defaults)": ours, "openrlhf-bai, save/stop (sustained)": ours_sustained,
                  "openrlhf-bai, whole log (did not come back)": ours_whole_log,
                  "rolling median (issue 15)": rolling_median, "CUSUM (Page, h = 5)": cusum,
                  "plain threshold": plain_threshold, "corpus rule, read live": corpus_rule_live,
                  "corpus rule, read live, whole log's windows": corpus_rule_live_whole_windows}
    if not args.skip_references:
        ensure_deps()
        contenders.update({"PELT (ruptures, offline)": pelt, "rlwatch 0.5.1": rlwatch})

    curves = real + synthetic
    with multiprocessing.Pool() as pool:  # the curves of each contender shared among the cores
        found = {method: dict(zip([c["name"] for c in curves], pool.starmap(detect, [(c, th) for c in curves], 16)))
                 for method, detect in contenders.items()}
    chosen, loso_found = loso(real, th)
    results = {method: outcomes_of(real + synthetic, found[method], th) for method in contenders}
    results["openrlhf-bai (LOSO)"] = outcomes_of(real, loso_found, th)
    sources = sorted({curve["source"] for curve in real})

    print(f"{len(real)} real runs from {len(sources)} sources (tests/data/curves); "
          f"{len(synthetic) // max(args.seeds, 1)} synthetic shapes x {args.seeds} seeds")
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"Defaults: {asdict(th)}")
    print("LOSO thresholds chosen per held-out source (on the other sources' real runs): "
          + "; ".join(f"{source}: {values}" for source, values in chosen.items()))

    order = ["openrlhf-bai (defaults)", "openrlhf-bai (LOSO)",
             *[m for m in contenders if m != "openrlhf-bai (defaults)"]]
    table("Real runs, all sources (every event a contender covers)",
          {m: [o for o in results[m] if o["origin"] == "real"] for m in order})
    held_out = {curve["name"] for curve in real if curve.get("held_out")}
    if held_out:
        table(f"Held-out real runs ({len(held_out)}; added after the defaults were set, labelled before any detector "
              "ran on them)", {m: [o for o in results[m] if o["curve"] in held_out] for m in order})
    for batch in sorted({curve["held_out"] for curve in real if curve.get("held_out")}):
        runs = {curve["name"] for curve in real if curve.get("held_out") == batch}
        table(f"Held-out batch {batch!r} ({len(runs)} runs)",
              {m: [o for o in results[m] if o["curve"] in runs] for m in order})
    for kind in ("post-trained", "base", "not recorded"):
        runs = {curve["name"] for curve in real if actor_kind(curve) == kind}
        table(f"Real runs by the model their actor started from: {kind} ({len(runs)} runs; actor_kind)",
              {m: [o for o in results[m] if o["curve"] in runs] for m in order})
    for source in sources:
        table(f"Real runs of {source}", {m: [o for o in results[m] if o["source"] == source] for m in order})
    table(f"Synthetic shapes x {args.seeds} seeds (reported apart: made by us)",
          {m: [o for o in results[m] if o["origin"] == "synthetic"] for m in order if m != "openrlhf-bai (LOSO)"})

    # The bar's "every event within patience + 1 log points", split by what the signal itself tells by then.
    seen = {(curve["name"], event): oracle_units(curve, event, th.patience) for curve in real for event in EVENTS}
    print(f"\nReal events by what an oracle sees by onset + patience + 1 log points (corpus.oracle_units: the largest "
          f"fall of a mean over a split it chooses, in noise units; under {th.noise_units:g} no test that holds a "
          "false-alarm rate raises it in time; KL blow-ups are an absolute level and are left out)")
    print("| contender | seen: events | hits | late | early | misses | under the noise: events | hits | late | early "
          "| misses |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method in order:
        scored = [(o, seen.get((o["curve"], o["event"]))) for o in results[method] if o["origin"] == "real"]
        groups = [[o for o, units in scored if units is not None and (units >= th.noise_units) == clear]
                  for clear in (True, False)]
        print(f"| {method} | " + " | ".join(
            f"{s['events']} | {s['hits']} | {s['late']} | {s['early']} | {s['misses']}" for s in map(summarize, groups))
              + " |")

    # What the labels know from the future: the same wrong outcome by the corpus rule itself, read live.
    rule = {(o["curve"], o["event"]): o["outcome"] for o in results["corpus rule, read live, whole log's windows"]}
    print("\nWrong outcomes of openrlhf-bai (defaults) on the real runs, and how many of them the corpus rule makes "
          "too, read live with the whole log's windows (the labels' own rule, given the log up to each point): "
          "those are wrong only by what the log does afterwards")
    print("| outcome | ours | the rule read live too | ours alone | healthy runs with it: ours / ours alone |")
    print("|---|---|---|---|---|")
    for outcome in WRONG:
        mine = [o for o in results["openrlhf-bai (defaults)"] if o["origin"] == "real" and o["outcome"] == outcome]
        alone = [o for o in mine if rule.get((o["curve"], o["event"])) != outcome]
        healthy = [len({o["curve"] for o in group if o["healthy"]}) for group in (mine, alone)]
        print(f"| {outcome} | {len(mine)} | {len(mine) - len(alone)} | {len(alone)} | {healthy[0]} / {healthy[1]} |")

    print("\nReal runs, per event (openrlhf-bai defaults)")
    print("| event | events | hits | late | early | misses | false alarms | median / worst delay (log points) |")
    print("|---|---|---|---|---|---|---|---|")
    for event in EVENTS:
        s = summarize([o for o in results["openrlhf-bai (defaults)"] if o["origin"] == "real" and o["event"] == event])
        print(f"| {event} | {s['events']} | {s['hits']} | {s['late']} | {s['early']} | {s['misses']} | "
              f"{s['false_alarms']} | {fmt(s['median_delay_points'])} / {fmt(s['worst_delay_points'])} |")

    print()
    for method in ("openrlhf-bai (defaults)", "openrlhf-bai (LOSO)", "rolling median (issue 15)"):
        for o in results[method]:
            if o["outcome"] in WRONG and (o["origin"] == "real" or method == "openrlhf-bai (defaults)"):
                print(f"{method}: {o['curve']} ({o['origin']}) {o['event']}: {o['outcome']}"
                      + (f" at {o['step']}" if o.get("step") is not None else "")
                      + (f", {o['delay_points']} log points from the onset" if "delay_points" in o else "")
                      + (f" (oracle: {seen[o['curve'], o['event']]:.1f} noise units by the deadline)"
                         if seen.get((o["curve"], o["event"])) is not None else ""))
    median_us, p99_us = monitor_cost_us(real + synthetic, th)
    print(f"\nLive monitor's detector cost per step (observe + state copy): median {median_us:.0f} us, "
          f"p99 {p99_us:.0f} us")
    if args.json:
        Path(args.json).write_text(json.dumps({"loso_thresholds": chosen, "outcomes": results,
                                               "oracle_units": {f"{c}/{e}": z for (c, e), z in seen.items()},
                                               "cost_us": {"median": median_us, "p99": p99_us}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
