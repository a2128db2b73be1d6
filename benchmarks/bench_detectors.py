"""The detectors as classifiers: every labeled curve of the corpus through them, against two references.

Corpus (openrlhf_bai.diagnostics.corpus): the real published runs under tests/data/curves (provenance and labels
beside each) and the seeded synthetic curves, --seeds times over. Contenders, on the same curves:
- openrlhf-bai: detectors.analyze with the default Thresholds (what the monitor and `diagnose` run);
- plain threshold: the same limits on the raw values against the first logged value, no smoothing, no patience
  (length < collapse_ratio x first; reward < first - hockey_drawdown x the std of the first 5 points; entropy <
  entropy_ratio x first; KL > kl_factor x max(first, kl_floor));
- PELT (ruptures 1.1.10, offline: it sees the whole curve): the first change point after which the segment mean
  has fallen (risen, for KL) past the same limits against the segment before it;
- rlwatch 0.5.1 (its EntropyCollapseDetector and KLExplosionDetector with their defaults; it has no length or
  reward-drop detector), a critical alert counting as the detection.
ruptures and rlwatch are benchmark-only: installed (pinned) into a cache folder on first use.

    python benchmarks/bench_detectors.py [--seeds 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import pickle
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from openrlhf_bai.diagnostics.corpus import real_curves, score, synthetic_curves
from openrlhf_bai.diagnostics.detectors import DETECTORS, SIGNAL_KEYS, Thresholds, analyze, first_value, new_state, observe

REPO = Path(__file__).resolve().parents[1]
DEPS = Path(os.environ.get("OPENRLHF_BAI_ENV_CACHE", Path.home() / ".cache" / "openrlhf-bai")) / "bench-detectors-deps"
PINS = ("ruptures==1.1.10", "rlwatch==0.5.1", "scipy==1.16.3")
SIGNAL_OF = {"length_collapse": "length", "truncation_drop": "length", "hockey_stick": "reward",
             "entropy_collapse": "entropy", "kl_blowup": "kl"}


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
    v, _ = analyze(curve["rows"], th)
    return {"length_collapse": v["length_collapse"]["step"], "truncation_drop": v["truncation_drop"]["step"],
            "hockey_stick": v["hockey_stick"]["drop_step"], "entropy_collapse": v["entropy_collapse"]["step"],
            "kl_blowup": v["kl_blowup"]["step"]}


def crossed(name: str, value: float, first: float, spread: float, th: Thresholds) -> bool:
    """The limit of each detector against a plain level (`first`), for both references."""
    if name == "length_collapse":
        return first > 0 and value < th.collapse_ratio * first
    if name == "hockey_stick":
        return value < first - th.hockey_drawdown * spread
    if name == "entropy_collapse":
        return first > 0 and value < th.entropy_ratio * first
    return value > th.kl_factor * max(first, th.kl_floor)


def plain_threshold(curve: dict, th: Thresholds) -> dict:
    found = {}
    for name in ("length_collapse", "hockey_stick", "entropy_collapse", "kl_blowup"):
        points = series(curve, SIGNAL_OF[name])
        first = points[0][1] if points else 0.0
        head = [v for _, v in points[:5]]
        spread = max(statistics.stdev(head) if len(head) > 1 else 0.0, 1e-3 * (abs(first) + 1))
        found[name] = next((s for s, v in points if crossed(name, v, first, spread, th)), None)
    return found


def pelt(curve: dict, th: Thresholds) -> dict:
    import numpy as np
    import ruptures

    found = {}
    for name in ("length_collapse", "hockey_stick", "entropy_collapse", "kl_blowup"):
        points = series(curve, SIGNAL_OF[name])
        found[name] = None
        if len(points) < 4:
            continue
        steps = [s for s, _ in points]
        signal = np.array([v for _, v in points])
        noise = np.median(np.abs(np.diff(signal))) * 1.4826 / math.sqrt(2) or 1e-3 * (abs(signal[0]) + 1)
        # BIC-style penalty on the series' own noise: a change must pay for itself.
        breaks = ruptures.Pelt(model="l2", min_size=2, jump=1).fit(signal).predict(pen=3 * math.log(len(signal)) * noise ** 2)
        bounds = [0, *breaks]
        for before, start, end in zip(bounds, bounds[1:], bounds[2:]):
            level, after = signal[before:start].mean(), signal[start:end].mean()
            if crossed(name, after, level, noise, th):
                found[name] = steps[start]
                break
    return found


def rlwatch(curve: dict, th: Thresholds) -> dict:
    from rlwatch.config import EntropyCollapseConfig, KLExplosionConfig
    from rlwatch.detectors import EntropyCollapseDetector, KLExplosionDetector

    found = {"length_collapse": None, "hockey_stick": None}
    for name, detector in (("entropy_collapse", EntropyCollapseDetector(EntropyCollapseConfig())),
                           ("kl_blowup", KLExplosionDetector(KLExplosionConfig()))):
        found[name] = None
        for step, value in series(curve, SIGNAL_OF[name]):
            alert = detector.check(step, value)
            if alert is not None and alert.severity == "critical":
                found[name] = step
                break
    return found


def summarize(outcomes: list[dict], detectors) -> dict:
    rows = [o for o in outcomes if o["detector"] in detectors]
    hits = [o for o in rows if o["outcome"] == "hit"]
    return {
        "events": sum(o["outcome"] in ("hit", "miss", "early", "too short") for o in rows),
        "hits": len(hits),
        "misses": sum(o["outcome"] == "miss" for o in rows),
        "too_short": sum(o["outcome"] == "too short" for o in rows),
        "early": sum(o["outcome"] == "early" for o in rows),
        "false_alarms": sum(o["outcome"] == "false alarm" for o in rows),
        "median_delay_steps": statistics.median(o["delay_steps"] for o in hits) if hits else None,
        "worst_delay_steps": max(o["delay_steps"] for o in hits) if hits else None,
        "median_delay_points": statistics.median(o["delay_points"] for o in hits) if hits else None,
        "worst_delay_points": max(o["delay_points"] for o in hits) if hits else None,
    }


def monitor_cost_us(curves: list[dict], th: Thresholds) -> tuple[float, float]:
    """Median and p99 microseconds per step of what the live monitor adds: observe() and the state copy it keeps in
    client_states (the JSONL line and the loggers are OpenRLHF's own I/O, measured in bench_monitor)."""
    times = []
    for curve in curves:
        state = new_state()
        for step, metrics in curve["rows"]:
            t0 = time.perf_counter()
            observe(state, step, metrics, th)
            pickle.loads(pickle.dumps(state))
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1e6 * statistics.median(times), 1e6 * times[int(0.99 * (len(times) - 1))]


def fmt(value, spec=".0f") -> str:
    return "-" if value is None else format(value, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="synthetic curves are drawn this many times")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--skip-references", action="store_true", help="ours only (no ruptures / rlwatch)")
    args = parser.parse_args(argv)
    th = Thresholds()

    real = real_curves(REPO / "tests" / "data" / "curves")
    synthetic = [curve for seed in range(args.seeds) for curve in synthetic_curves(seed)]
    contenders = {"openrlhf-bai": ours, "plain threshold": plain_threshold}
    if not args.skip_references:
        ensure_deps()
        contenders.update({"PELT (ruptures, offline)": pelt, "rlwatch 0.5.1": rlwatch})

    results = {}
    for method, detect in contenders.items():
        outcomes = []
        for curve in real + synthetic:
            for name, result in score(curve, detect(curve, th), th.patience).items():
                covered = method != "rlwatch 0.5.1" or name in ("entropy_collapse", "kl_blowup")
                if covered and (method == "openrlhf-bai" or name != "truncation_drop"):
                    outcomes.append({"curve": curve["name"], "origin": curve["origin"], "detector": name, **result})
        results[method] = outcomes

    print(f"Corpus: {len(real)} real runs (tests/data/curves), {len(synthetic) // max(args.seeds, 1)} synthetic "
          f"shapes x {args.seeds} seeds. Defaults: {th}\n")
    print("Real runs, per curve (openrlhf-bai): detection step / labeled onset")
    print("| run | format | points | length collapse | hockey stick | entropy collapse | KL blow-up |")
    print("|---|---|---|---|---|---|---|")
    for curve in real:
        found = ours(curve, th)
        cells = []
        for name in ("length_collapse", "hockey_stick", "entropy_collapse", "kl_blowup"):
            label = curve["label"][name]
            if not series(curve, SIGNAL_OF[name]):
                cells.append("not logged")
                continue
            got = found[name] if name != "length_collapse" or found[name] else found["truncation_drop"]
            cells.append(f"{fmt(got)} / {fmt(label['onset']) if label['present'] else 'none'}")
        print(f"| {curve['name']} | {curve['kind']} | {len(curve['rows'])} | " + " | ".join(cells) + " |")

    print("\nAll curves, per contender and detector (delays after the labeled onset)")
    print("| contender | detector | events | hits | early | misses | too short | false alarms "
          "| median / worst delay (steps) | median / worst delay (log points) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for method, outcomes in results.items():
        names = ["all", *dict.fromkeys(o["detector"] for o in outcomes)]
        for name in names:
            s = summarize(outcomes, DETECTORS if name == "all" else (name,))
            summary[f"{method}/{name}"] = s
            print(f"| {method} | {name} | {s['events']} | {s['hits']} | {s['early']} | {s['misses']} | {s['too_short']} | "
                  f"{s['false_alarms']} | "
                  f"{fmt(s['median_delay_steps'], 'g')} / {fmt(s['worst_delay_steps'], 'g')} | "
                  f"{fmt(s['median_delay_points'], 'g')} / {fmt(s['worst_delay_points'], 'g')} |")

    wrong = [o for o in results["openrlhf-bai"] if o["outcome"] in ("miss", "false alarm", "early", "too short")]
    late = [o for o in results["openrlhf-bai"] if o.get("delay_points", 0) > th.patience + 1]
    for o in wrong + late:
        print(f"openrlhf-bai: {o['curve']} ({o['origin']}) {o['detector']}: {o['outcome']}"
              + (f", {o['delay_points']} log points late" if o in late else ""))
    median_us, p99_us = monitor_cost_us(real + synthetic, th)
    print(f"\nLive monitor's detector cost per step (observe + state copy): median {median_us:.0f} us, p99 {p99_us:.0f} us")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "outcomes": results,
                                               "cost_us": {"median": median_us, "p99": p99_us}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
