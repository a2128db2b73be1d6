"""Edge cases of the detectors shared by the live monitor and `diagnose` (openrlhf_bai.diagnostics.detectors)."""

import json
import math
import random

import pytest

from openrlhf_bai.diagnostics.detectors import Thresholds, analyze, make_thresholds, new_state, observe, verdict
from openrlhf_bai.errors import BAIError

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


def test_a_collapse_between_the_first_two_log_points_cannot_contaminate_the_reference():
    # The real case: logged every 10 steps, length 95 % down between the first and second log point.
    rows = [(10, {LENGTH: 2400.0, REWARD: 0.2})] + [(s, {LENGTH: 120.0, REWARD: 0.2}) for s in range(20, 201, 10)]
    result, per_step = analyze(rows)
    assert result["baseline_length"] == 2400.0  # the level it fell from, not an average with the collapse
    assert result["length_collapse"]["step"] == 40  # onset at 20: patience 3 counts 20, 30, 40
    assert result["length_collapse"]["min_ratio"] == pytest.approx(120 / 2400, rel=0.05)


def test_the_reference_window_is_counted_in_steps_so_a_slow_decline_is_no_collapse():
    # Length halves over 500 steps (a length penalty): never 40 % below its peak of the last 100 steps.
    rows = rows_of([3000.0 * (1 - s / 1000) for s in range(500)], [0.5] * 500)
    assert not analyze(rows)[0]["length_collapse"]["detected"]
    # The same halving within 20 steps is one.
    fast = rows_of([3000.0] * 50 + [3000.0 * (1 - s / 40) for s in range(20)] + [1500.0] * 30, [0.5] * 100)
    assert analyze(fast)[0]["length_collapse"]["detected"]


def test_run_resumed_at_step_500_logging_every_10_steps_works_like_one_from_the_start():
    lengths = [1000.0] * 10 + [300.0] * 10
    start = analyze(rows_of(lengths, [0.5] * 20))[0]["length_collapse"]
    resumed = analyze([(500 + 10 * i, m) for i, (_, m) in enumerate(rows_of(lengths, [0.5] * 20))])[0]["length_collapse"]
    assert start["detected"] and resumed["detected"]
    assert (resumed["step"] - 500) // 10 + 1 == start["step"]  # the same log point


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
    assert "bai/response_length_ratio" not in per_step[1] and per_step[2]["bai/response_length_ratio"] == 1.0
    assert result["baseline_length"] == 800.0 and result["length_collapse"]["min_ratio"] == 1.0
    assert result["baseline_reward"] == 0.5 and not result["hockey_stick"]["detected"]
    assert all(math.isfinite(v) for p in per_step for v in p.values())


def test_negative_rewards_drop_is_measured_in_noise_units():
    rng = random.Random(3)
    rewards = [-1.0 + rng.gauss(0, 0.05) for _ in range(20)] + [-3.0 + rng.gauss(0, 0.05) for _ in range(10)]
    result, per_step = analyze(rows_of([500.0] * 30, rewards))
    hockey = result["hockey_stick"]
    assert hockey["detected"] and hockey["recovery_steps"] is None
    assert 21 <= hockey["drop_step"] <= 21 + TH.patience
    assert hockey["depth"] > 20  # 2.0 down with noise ~0.05
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
    assert 0.75 < result["length_collapse"]["min_ratio"] < 1.0
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
    assert result["baseline_length"] > 1500.0  # the smoothed peak it fell from
    flagged = [p["step"] for p in per_step if p.get("bai/length_collapse") == 1.0]
    assert flagged == list(range(collapse["step"], 61))
    assert all(p["bai/length_collapse_step"] == collapse["step"] for p in per_step if p["step"] >= collapse["step"])


def test_short_dip_below_the_threshold_is_not_a_collapse():
    lengths = [1000.0] * 10 + [100.0] + [1000.0] * 10  # one bad step: the EMA is below 0.6 for only 2 steps
    result, _ = analyze(rows_of(lengths, [0.5] * 21))
    assert not result["length_collapse"]["detected"]
    assert result["length_collapse"]["min_ratio"] == pytest.approx(0.55)  # smoothed 550 / peak 1000


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
    # Recovered: the smoothed reward back within one noise unit of the reference it fell from (0.5 + noise).
    assert 31 <= recovered_at <= 36
    assert rewards[recovered_at - 1] >= 0.5 - 0.05
    assert per_step[-1]["bai/reward_recovery_steps"] == hockey["recovery_steps"]
    assert hockey["depth"] > TH.hockey_drawdown
    events = [e["detector"] for e in analyze_events(rows_of([900.0] * len(rewards), rewards))]
    assert events == ["hockey_stick", "reward_recovered"]


def analyze_events(rows):
    state = new_state()
    for step, metrics in rows:
        observe(state, step, metrics, TH)
    return state["events"]


def test_entropy_collapse_from_one_to_five_hundredths_is_raised_and_a_noisy_slow_decline_is_not():
    collapse = [(s, {"entropy_loss": 1.0 if s < 20 else 0.05}) for s in range(1, 41)]
    result, per_step = analyze(collapse)
    assert result["entropy_collapse"]["detected"] and 20 <= result["entropy_collapse"]["step"] <= 20 + TH.patience + 1
    assert per_step[-1]["bai/entropy_collapse"] == 1.0 and per_step[-1]["bai/entropy_ratio"] < 0.1
    rng = random.Random(0)
    healthy = [(s, {"actor/entropy": (0.6 - 0.0008 * s) * (1 + rng.gauss(0, 0.1))}) for s in range(1, 401)]
    result, per_step = analyze(healthy)
    assert not result["entropy_collapse"]["detected"] and not any(p.get("bai/entropy_collapse") for p in per_step)


def test_kl_blowup_needs_a_jump_over_its_recent_level_and_the_floor():
    rng = random.Random(0)
    growing = [(s, {"kl": 0.0003 * s * (1 + rng.gauss(0, 0.3))}) for s in range(1, 401)]  # 0 -> 0.12, healthy
    assert not analyze(growing)[0]["kl_blowup"]["detected"]
    jump = [(s, {"ppo_kl": 0.002 if s < 50 else 0.8}) for s in range(1, 61)]
    result, per_step = analyze(jump)
    assert result["kl_blowup"]["detected"] and 50 <= result["kl_blowup"]["step"] <= 50 + TH.patience + 1
    assert result["kl_blowup"]["max_ratio"] > TH.kl_factor


def test_a_length_drop_with_the_truncated_share_falling_is_reported_as_a_truncation_drop_not_a_collapse():
    rows = [(s, {LENGTH: 6000.0 if s < 30 else 3000.0, "rollout/truncated_rate": 0.4 if s < 30 else 0.02})
            for s in range(1, 60)]
    result, per_step = analyze(rows)
    assert not result["length_collapse"]["detected"]
    drop = result["truncation_drop"]
    assert drop["detected"] and drop["truncated_rate_before"] == pytest.approx(0.4) and drop["truncated_rate_after"] < 0.1
    assert per_step[-1]["bai/truncation_drop"] == 1.0 and per_step[-1]["bai/length_collapse"] == 0.0
    # The same length drop with the truncated share unchanged is a collapse.
    rows = [(s, {LENGTH: m[LENGTH], "rollout/truncated_rate": 0.01}) for s, m in rows]
    assert analyze(rows)[0]["length_collapse"]["detected"]


def test_flat_reward_has_a_finite_noise_unit():
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
    with pytest.raises(BAIError, match="--bai.collapse_ratio must be in"):
        make_thresholds({"collapse_ratio": 1.5})
    assert analyze(rows, Thresholds())[0]["length_collapse"]["detected"]
    assert not analyze(rows, Thresholds(collapse_ratio=0.5))[0]["length_collapse"]["detected"]
