"""Edge cases of the detectors shared by the live monitor and `diagnose` (openrlhf_bai.diagnostics.detectors)."""

import json
import math
import random

import pytest

from openrlhf_bai.diagnostics.detectors import Thresholds, analyze, new_state, observe, verdict

TH = Thresholds()
LENGTH = "rollout/response_length_mean"
REWARD = "rollout/reward_mean"


def rows_of(lengths, rewards, first_step=1):
    """(step, metrics) rows as PPOTrainer.fit logs them; None leaves a metric out of that step."""
    rows = []
    for i, (length, reward) in enumerate(zip(lengths, rewards)):
        metrics = {"policy_loss": 0.01}
        if length is not None:
            metrics[LENGTH] = length
        if reward is not None:
            metrics[REWARD] = reward
        rows.append((first_step + i, metrics))
    return rows


def test_baselines_are_the_mean_of_the_first_steps_of_each_metric_separately():
    lengths = [800.0, 820.0, 780.0, 810.0, 790.0, 805.0]
    rewards = [0.1, 0.2, 0.3, 0.2, 0.2, 0.25]
    result, _ = analyze(rows_of(lengths, rewards))
    assert result["baseline_length"] == pytest.approx(800.0)
    assert result["baseline_reward"] == pytest.approx(0.2)


def test_run_shorter_than_the_baseline_gives_no_verdict_and_no_diagnostics():
    result, per_step = analyze(rows_of([800.0, 200.0, 100.0], [0.5, -5.0, -9.0]))
    assert result["steps"] == 3
    assert result["baseline_length"] is None and result["baseline_reward"] is None
    assert result["length_collapse"] == {"detected": False, "step": None, "min_ratio": None}
    assert result["hockey_stick"] == {"detected": False, "drop_step": None, "depth": 0.0, "recovery_steps": None}
    assert per_step == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_missing_length_metric_leaves_collapse_unassessed_and_reward_still_judged():
    rewards = [0.5, 0.52, 0.48, 0.51, 0.49] + [0.0] * 10
    result, per_step = analyze(rows_of([None] * 15, rewards))
    assert result["baseline_length"] is None and result["length_collapse"]["min_ratio"] is None
    assert not result["length_collapse"]["detected"]
    assert result["hockey_stick"]["detected"]
    assert all("bai/response_length_ratio" not in p for p in per_step)


def test_nan_and_missing_steps_are_skipped_not_counted_as_values():
    nan = float("nan")
    lengths = [800.0, nan, 800.0, None, 800.0, 800.0, 800.0, nan, 800.0]
    rewards = [0.5, 0.5, float("inf"), 0.5, 0.5, nan, 0.5, 0.5, 0.5]
    result, per_step = analyze(rows_of(lengths, rewards))
    # Steps 2 and 4 hold no length: the fifth finite one, and so the baseline, comes at step 7.
    assert result["baseline_length"] == 800.0
    assert "bai/response_length_ratio" not in per_step[5] and per_step[6]["bai/response_length_ratio"] == 1.0
    assert result["length_collapse"]["min_ratio"] == 1.0
    assert result["baseline_reward"] == 0.5
    assert not result["hockey_stick"]["detected"]
    assert all(math.isfinite(v) for p in per_step for v in p.values())


def test_negative_rewards_drop_is_measured_in_baseline_spreads():
    rewards = [-1.0, -1.1, -0.9, -1.05, -0.95] + [-3.0] * 6
    result, per_step = analyze(rows_of([500.0] * 11, rewards))
    hockey = result["hockey_stick"]
    assert result["baseline_reward"] == pytest.approx(-1.0)
    assert hockey["detected"] and hockey["recovery_steps"] is None
    # Smoothed reward at step 8 is -2.75: 1.75 below the mean, ~22 baseline spreads (std 0.079).
    assert hockey["drop_step"] == 8
    assert per_step[-1]["bai/reward_drawdown"] == pytest.approx(hockey["depth"])
    assert hockey["depth"] > 20
    assert not result["length_collapse"]["detected"]


@pytest.mark.parametrize("seed", range(10))
def test_healthy_noisy_run_with_rising_reward_stays_silent(seed):
    rng = random.Random(seed)
    steps = 200
    lengths = [1200.0 * (1 + rng.gauss(0, 0.05)) for _ in range(steps)]
    rewards = [0.3 + 0.002 * i + rng.gauss(0, 0.02) for i in range(steps)]
    result, per_step = analyze(rows_of(lengths, rewards))
    assert not result["length_collapse"]["detected"]
    assert not result["hockey_stick"]["detected"]
    assert 0.8 < result["length_collapse"]["min_ratio"] < 1.0
    assert not any(p.get("bai/length_collapse") or p.get("bai/hockey_stick") for p in per_step)


def test_real_collapse_fires_within_a_few_steps_and_stays_flagged():
    rng = random.Random(0)
    drop_at = 30
    lengths = [1500.0 * (1 + rng.gauss(0, 0.05)) if s < drop_at else 400.0 for s in range(1, 61)]
    rewards = [0.4 + rng.gauss(0, 0.02) for _ in range(60)]
    result, per_step = analyze(rows_of(lengths, rewards))
    collapse = result["length_collapse"]
    assert collapse["detected"]
    assert drop_at <= collapse["step"] <= drop_at + TH.patience + 2
    assert collapse["min_ratio"] == pytest.approx(400 / result["baseline_length"], rel=1e-3)
    flagged = [p["step"] for p in per_step if p.get("bai/length_collapse") == 1.0]
    assert flagged == list(range(collapse["step"], 61))
    assert all(p["bai/length_collapse_step"] == collapse["step"] for p in per_step if p["step"] >= collapse["step"])


def test_short_dip_below_the_threshold_is_not_a_collapse():
    lengths = [1000.0] * 10 + [100.0] + [1000.0] * 10  # one bad step: the EMA is below 0.6 for only 2 steps
    result, _ = analyze(rows_of(lengths, [0.5] * 21))
    assert not result["length_collapse"]["detected"]
    assert result["length_collapse"]["min_ratio"] == pytest.approx(0.55)


def test_hockey_stick_with_recovery_reports_recovery_steps():
    rng = random.Random(1)
    rewards = [0.5 + rng.gauss(0, 0.02) for _ in range(10)]  # steps 1-10
    rewards += [0.05] * 10  # steps 11-20: the drop
    rewards += [0.05 + 0.03 * i for i in range(1, 21)]  # steps 21-40: slow climb back past 0.5
    result, per_step = analyze(rows_of([900.0] * len(rewards), rewards))
    hockey = result["hockey_stick"]
    assert hockey["detected"]
    assert 11 <= hockey["drop_step"] <= 11 + TH.patience + 1
    recovered_at = hockey["drop_step"] + hockey["recovery_steps"]
    base = result["baseline_reward"]
    # Recovery is the first step whose smoothed reward is back at the baseline: raw reward has passed it by then.
    assert rewards[recovered_at - 1] >= base and rewards[recovered_at - 3] < base
    assert per_step[recovered_at - 1]["bai/reward_drawdown"] <= 0 < per_step[recovered_at - 2]["bai/reward_drawdown"]
    assert per_step[-1]["bai/reward_recovery_steps"] == hockey["recovery_steps"]
    assert hockey["depth"] > TH.hockey_drawdown


def test_flat_reward_baseline_has_a_finite_spread():
    result, per_step = analyze(rows_of([700.0] * 12, [1.0] * 5 + [0.0] * 7))
    assert result["hockey_stick"]["detected"]
    assert all(math.isfinite(p["bai/reward_drawdown"]) for p in per_step if "bai/reward_drawdown" in p)


def test_older_metric_names_give_the_same_verdict():
    lengths = [900.0] * 10 + [200.0] * 10
    rewards = [0.5, 0.6] * 5 + [-1.0] * 10
    new = analyze(rows_of(lengths, rewards))[0]
    old_rows = [(s, {"response_length": m[LENGTH], "reward": m[REWARD]}) for s, m in rows_of(lengths, rewards)]
    assert analyze(old_rows)[0] == new
    assert new["length_collapse"]["detected"] and new["hockey_stick"]["detected"]


def test_state_survives_a_json_round_trip_mid_run_like_a_resumed_live_monitor():
    lengths = [900.0] * 12 + [300.0] * 8
    rewards = [0.5, 0.55, 0.45, 0.5, 0.52] * 2 + [0.0] * 5 + [0.6] * 5
    rows = rows_of(lengths, rewards)
    state = new_state()
    for step, metrics in rows[:11]:
        observe(state, step, metrics, TH)
    state = json.loads(json.dumps(state))  # what checkpointing it in client_states does
    for step, metrics in rows[11:]:
        observe(state, step, metrics, TH)
    assert verdict(state) == analyze(rows, TH)[0]


def test_thresholds_change_the_verdict():
    lengths = [1000.0] * 10 + [550.0] * 10
    rows = rows_of(lengths, [0.5] * 20)
    assert analyze(rows, Thresholds())[0]["length_collapse"]["detected"]
    assert not analyze(rows, Thresholds(collapse_ratio=0.5))[0]["length_collapse"]["detected"]
