"""What the detectors shared by the live monitor and `diagnose` raise, and what they leave alone
(openrlhf_bai.diagnostics.detectors)."""

import json
import math
import random
from dataclasses import replace

import pytest

from openrlhf_bai.cli.main import main as cli
from openrlhf_bai.diagnostics.detectors import (DETECTORS, RENAMED, Thresholds, analyze, make_thresholds, new_state,
                                                observe, upgrade_state, verdict)
from openrlhf_bai.errors import BAIError

TH = Thresholds()
LENGTH = "rollout/response_length_mean"
REWARD = "rollout/reward_mean"
TRUNCATED = "rollout/truncated_rate"


def rows_of(lengths, rewards, first_step=1, every=1):
    """(step, metrics) rows as PPOTrainer.fit logs them; None leaves a metric out of that step."""
    rows = []
    for i, (length, reward) in enumerate(zip(lengths, rewards)):
        metrics = {"policy_loss": 0.01}
        if length is not None:
            metrics[LENGTH] = length
        if reward is not None:
            metrics[REWARD] = reward
        rows.append((first_step + i * every, metrics))
    return rows


def events(rows, th=TH, cap=None):
    state = new_state(cap)
    for step, metrics in rows:
        observe(state, step, metrics, th)
    return state["events"]


def small_batch_length(rng, length, samples=4):
    """Mean length of `samples` completions of one prompt: jumps 2-3x from step to step with the prompt."""
    prompt = length * math.exp(rng.gauss(0, 0.45))
    return sum(prompt * math.exp(rng.gauss(0, 0.3)) for _ in range(samples)) / samples


def test_a_collapse_between_the_first_two_log_points_cannot_contaminate_the_reference():
    # Logged every 10 steps, length 95 % down between the first and second log point.
    rows = [(10, {LENGTH: 2400.0, REWARD: 0.2})] + [(s, {LENGTH: 120.0, REWARD: 0.2}) for s in range(20, 201, 10)]
    result, per_step = analyze(rows)
    assert result["baseline_length"] == pytest.approx(2400.0)  # the level it fell from, not a median with the collapse
    assert result["length_collapse"]["step"] == 40  # onset at 20: within patience + 1 log points
    assert result["length_collapse"]["min_ratio"] == pytest.approx(120 / 2400)


def test_a_slow_decline_is_a_collapse_only_once_under_half_its_start():
    rng = random.Random(0)
    # Length falls to 0.53 of its start over 500 steps (a length penalty): never 40 % below its median of the last
    # 100 steps, and not under half of its start level (the median of the first 100 steps): no collapse.
    rows = rows_of([3000.0 * (1 - s / 1000) * (1 + rng.gauss(0, 0.04)) for s in range(500)], [0.5] * 500)
    assert not analyze(rows)[0]["length_collapse"]["detected"]
    # The same slope on to a fifth: a collapse, raised against the start level where the level passes half of it.
    rows = rows_of([3000.0 * (1 - s / 1000) * (1 + rng.gauss(0, 0.04)) for s in range(800)], [0.5] * 800)
    found = events(rows)
    assert [e["detector"] for e in found if e["alarm"]] == ["length_collapse"]
    assert "of its start level 2" in found[0]["message"] and "--bai.start_ratio 0.5" in found[0]["message"]
    level = 3000.0 * (1 - (found[0]["step"] - 1) / 1000)
    assert 0.4 < level / found[0]["values"]["reference"] < 0.5  # just past half the start (about 2850 tokens)
    assert not analyze(rows, replace(TH, start_ratio=0.15))[0]["length_collapse"]["detected"]  # the knob
    # The same halving within 20 steps is one.
    fast = [3000.0] * 50 + [3000.0 * (1 - s / 40) for s in range(20)] + [1500.0] * 30
    assert analyze(rows_of([v * (1 + rng.gauss(0, 0.04)) for v in fast], [0.5] * 100))[0]["length_collapse"]["detected"]


def test_a_base_model_learning_the_format_in_its_first_steps_is_no_collapse_and_a_later_fall_is():
    # R1-Zero-style start: 305 tokens at step 1, a third of that by step 5, then growing back (the length is judged
    # only from warmup_steps after its first log point); the same fall after the warm-up is a collapse.
    rng = random.Random(4)
    early = [305.0, 190.0, 110.0, 60.0, 45.0, 50.0, 48.0, 55.0, 60.0, 70.0] + [80.0 + 8 * i for i in range(40)]
    rows = rows_of([v * (1 + rng.gauss(0, 0.05)) for v in early], [0.3] * 50)
    assert not analyze(rows)[0]["length_collapse"]["detected"]
    assert analyze(rows, replace(TH, warmup_steps=0))[0]["length_collapse"]["detected"]  # what 0.3 raised
    late = [300.0] * 30 + [100.0] * 20
    found = analyze(rows_of([v * (1 + rng.gauss(0, 0.05)) for v in late], [0.3] * 50))[0]
    assert found["length_collapse"]["step"] <= 35


def test_run_resumed_at_step_500_logging_every_10_steps_works_like_one_from_the_start():
    rng = random.Random(1)
    lengths = [(1000.0 if i < 10 else 300.0) * (1 + rng.gauss(0, 0.03)) for i in range(20)]
    start = analyze(rows_of(lengths, [0.5] * 20))[0]["length_collapse"]
    resumed = analyze(rows_of(lengths, [0.5] * 20, first_step=500, every=10))[0]["length_collapse"]
    assert start["detected"] and resumed["detected"]
    assert (resumed["step"] - 500) // 10 + 1 == start["step"]  # the same log point


def test_missing_length_metric_leaves_collapse_unassessed_and_reward_still_judged():
    rng = random.Random(2)
    rewards = [0.5 + rng.gauss(0, 0.02) for _ in range(10)] + [0.05 + rng.gauss(0, 0.02) for _ in range(10)]
    result, per_step = analyze(rows_of([None] * 20, rewards))
    assert result["baseline_length"] is None and result["length_collapse"]["min_ratio"] is None
    assert not result["length_collapse"]["detected"]
    assert result["hockey_stick"]["detected"]
    assert all("bai/response_length_ratio" not in p for p in per_step)


def test_nan_and_missing_steps_are_skipped_not_counted_as_values():
    nan = float("nan")
    lengths = [800.0, nan, 810.0, None, 790.0, 800.0, 805.0, nan, 795.0]
    rewards = [0.5, 0.51, float("inf"), 0.49, 0.5, nan, 0.52, 0.5, 0.48]
    result, per_step = analyze(rows_of(lengths, rewards), replace(TH, warmup_steps=0))
    assert "bai/response_length_ratio" not in per_step[1] and "bai/response_length_ratio" in per_step[8]
    assert result["baseline_length"] == pytest.approx(800.0, rel=0.02)
    assert not any(result[name]["detected"] for name in DETECTORS)
    assert all(math.isfinite(v) for p in per_step for v in p.values())


def test_negative_rewards_drop_is_measured_in_noise_units():
    rng = random.Random(3)
    rewards = [-1.0 + rng.gauss(0, 0.05) for _ in range(20)] + [-3.0 + rng.gauss(0, 0.05) for _ in range(10)]
    result, per_step = analyze(rows_of([500.0 * (1 + rng.gauss(0, 0.03)) for _ in range(30)], rewards))
    hockey = result["hockey_stick"]
    assert hockey["detected"] and hockey["recovery_steps"] is None and not hockey["recovered"]
    assert 21 <= hockey["drop_step"] <= 21 + TH.patience + 1
    assert hockey["depth"] > 10  # 2.0 down with noise ~0.05
    assert hockey["strength"] > 0
    assert not result["length_collapse"]["detected"]


@pytest.mark.parametrize("seed", range(10))
def test_healthy_noisy_run_with_rising_reward_stays_silent(seed):
    rng = random.Random(seed)
    lengths = [1200.0 * (1 + rng.gauss(0, 0.05)) for _ in range(200)]
    rewards = [0.3 + 0.002 * i + rng.gauss(0, 0.02) for i in range(200)]
    result, per_step = analyze(rows_of(lengths, rewards))
    assert not any(result[name]["detected"] for name in DETECTORS)
    assert 0.8 < result["length_collapse"]["min_ratio"] < 1.0
    assert not any(p[f"bai/{name}"] for p in per_step for name in ("length_collapse", "hockey_stick"))


@pytest.mark.parametrize("seed", range(5))
def test_noisy_small_batch_grpo_run_whose_lengths_jump_2_to_3x_stays_silent(seed):
    # 1 prompt x 4 completions a step, the way TRL / Unsloth GRPO notebooks run: 0.1's EMA-peak reference sat on
    # the spikes and called such runs collapsed at a "lowest ratio" near 0.3.
    rng = random.Random(seed)
    lengths = [small_batch_length(rng, 300) for _ in range(300)]
    rewards = [sum(rng.random() < 0.2 + 0.4 * s / 300 for _ in range(4)) / 4 for s in range(300)]
    assert max(lengths[i + 1] / lengths[i] for i in range(299)) > 2.5  # it does jump
    result, _ = analyze(rows_of(lengths, rewards))
    assert not any(result[name]["detected"] for name in DETECTORS)


def test_a_real_collapse_in_a_noisy_small_batch_run_is_raised_and_stays_flagged():
    rng = random.Random(7)
    lengths = [small_batch_length(rng, 350 if s < 150 else 50) for s in range(1, 251)]
    result, per_step = analyze(rows_of(lengths, [0.4] * 250))
    collapse = result["length_collapse"]
    assert collapse["detected"] and 150 <= collapse["step"] <= 165
    assert collapse["sustained_step"] is not None and collapse["max_strength"] > 1


def test_real_collapse_fires_within_patience_plus_one_and_stays_flagged():
    rng = random.Random(0)
    drop_at = 30
    lengths = [(1500.0 if s < drop_at else 400.0) * (1 + rng.gauss(0, 0.05)) for s in range(1, 61)]
    rewards = [0.4 + rng.gauss(0, 0.02) for _ in range(60)]
    result, per_step = analyze(rows_of(lengths, rewards))
    collapse = result["length_collapse"]
    assert collapse["detected"] and drop_at <= collapse["step"] <= drop_at + TH.patience + 1
    assert collapse["min_ratio"] == pytest.approx(400 / 1500, rel=0.15)
    assert result["baseline_length"] == pytest.approx(1500.0, rel=0.05)  # the median it fell from
    flagged = [p["step"] for p in per_step if p["bai/length_collapse"] == 1.0]
    assert flagged == list(range(collapse["step"], 61))
    assert all(p["bai/length_collapse_step"] == collapse["step"] for p in per_step if p["step"] >= collapse["step"])
    # Strength: > 0 from the raise on; sustained (what save/stop act on) patience - 1 points after it.
    assert all(p["bai/length_collapse_strength"] > 0 for p in per_step if p["step"] >= collapse["step"])
    assert all(p["bai/length_collapse_strength"] < 0 for p in per_step if p["step"] < drop_at)
    assert collapse["step"] + TH.patience - 1 <= collapse["sustained_step"] <= collapse["step"] + TH.patience + 1
    assert collapse["strength"] > 0 and collapse["max_strength"] >= collapse["strength"]


def test_a_collapse_that_comes_back_ends_and_one_that_returns_is_raised_again(tmp_path, capsys):
    # 1,000 tokens, a 30-step collapse to 100, back to 1,000, then down to 100 for good (a run that came back once).
    rng = random.Random(3)
    shape = [1000.0] * 40 + [100.0] * 30 + [1000.0] * 40 + [100.0] * 30
    rows = rows_of([v * (1 + rng.gauss(0, 0.04)) for v in shape], [0.4] * len(shape))
    result, per_step = analyze(rows)
    first, second = result["length_collapse"]["episodes"]
    assert 41 <= first["step"] <= 41 + TH.patience + 1 and 71 <= first["recovery_step"] <= 71 + TH.patience
    assert 111 <= second["step"] <= 111 + TH.patience + 1 and second["recovery_step"] is None
    # The verdict's fields keep describing the first raise; unrecovered_step is the collapse that stayed.
    collapse = result["length_collapse"]
    assert collapse["step"] == first["step"] and collapse["recovered"]
    assert collapse["recovery_steps"] == first["recovery_step"] - first["step"]
    assert collapse["unrecovered_step"] == second["step"]
    flagged = [p["step"] for p in per_step if p["bai/length_collapse"] == 1.0]
    assert min(flagged) == first["step"] and not any(first["recovery_step"] <= s < second["step"] for s in flagged)
    assert [e["detector"] for e in events(rows) if not e.get("sustained")] == [
        "length_collapse", "length_collapse_recovered", "length_collapse"]
    # diagnose says so too.
    path = tmp_path / "log.csv"
    path.write_text("step,rollout/response_length_mean\n" + "".join(f"{s},{m[LENGTH]}\n" for s, m in rows))
    assert cli(["diagnose", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"back from step {first['recovery_step']}, again at step {second['step']}" in out


def test_a_collapsed_level_wavering_around_the_threshold_is_raised_once_and_does_not_end():
    # After a fall to a tenth the level wanders between 0.55 and 0.75 of its old 1,000 tokens: around collapse_ratio
    # 0.6, never halfway back to the reference (0.77 of it), so one raise, no end, no second alarm.
    rows = rows_of([1000.0] * 40 + [100.0] * 20 + [550.0, 720.0, 600.0, 700.0, 560.0, 740.0] * 15, [0.4] * 150)
    result, _ = analyze(rows)
    assert len(result["length_collapse"]["episodes"]) == 1 and not result["length_collapse"]["recovered"]
    assert [e["detector"] for e in events(rows) if e["alarm"]] == ["length_collapse"]


def test_a_collapse_back_above_its_threshold_at_the_end_of_a_log_is_not_one_that_stayed(tmp_path, capsys):
    # 1,000 tokens, a fall to 100, then 680 for the last 12 steps: above collapse_ratio x 1,000 (600) but short of
    # halfway back (775). The raise stays open (the monitor does not raise it again), but a finished log read by
    # diagnose has no collapse that stayed; one that ends at 300 has.
    for end, stayed in ((680.0, False), (300.0, True)):
        rows = rows_of([1000.0] * 40 + [100.0] * 20 + [end] * 12, [0.4] * 72)
        collapse = analyze(rows)[0]["length_collapse"]
        assert len(collapse["episodes"]) == 1 and collapse["episodes"][0]["recovery_step"] is None
        assert collapse["unrecovered_step"] == (collapse["step"] if stayed else None)
        path = tmp_path / f"log{end:.0f}.csv"
        path.write_text("step,rollout/response_length_mean\n" + "".join(f"{s},{m[LENGTH]}\n" for s, m in rows))
        assert cli(["diagnose", str(path)]) == 0
        assert ("above its threshold at the end" in capsys.readouterr().out) is not stayed


def test_an_entropy_collapse_that_comes_back_is_reported_ended_and_a_kl_blowup_never_ends():
    rows = [(s, {"entropy_loss": (0.9 if s < 30 or 50 <= s < 80 else 0.02) * (1 + 0.02 * (s % 3)),
                 "kl": 3.0 if 30 <= s < 50 else 0.01 * (1 + 0.1 * (s % 3))}) for s in range(1, 101)]
    result, _ = analyze(rows)
    entropy, kl = result["entropy_collapse"], result["kl_blowup"]
    assert [e["recovery_step"] is not None for e in entropy["episodes"]] == [True, False]
    assert entropy["recovered"] and entropy["unrecovered_step"] == entropy["episodes"][1]["step"] >= 80
    assert kl["detected"] and len(kl["episodes"]) == 1 and not kl["recovered"]  # KL spikes come and go: one alarm


def test_one_log_point_dips_are_not_collapses_or_hockey_sticks():
    rng = random.Random(4)
    lengths = [1000.0 * (1 + rng.gauss(0, 0.03)) for _ in range(40)]
    rewards = [0.3 + 0.005 * s + rng.gauss(0, 0.02) for s in range(40)]
    lengths[20], rewards[25] = 100.0, -0.5  # one bad step each
    lengths[30] = lengths[31] = 150.0  # and two in a row
    result, _ = analyze(rows_of(lengths, rewards))
    assert not result["length_collapse"]["detected"] and not result["hockey_stick"]["detected"]


def test_hockey_stick_with_slow_recovery_reports_the_time_to_recover():
    rng = random.Random(1)
    rewards = [0.5 + rng.gauss(0, 0.02) for _ in range(20)]  # steps 1-20
    rewards += [0.05 + rng.gauss(0, 0.02) for _ in range(10)]  # steps 21-30: the drop
    rewards += [0.05 + 0.025 * i + rng.gauss(0, 0.02) for i in range(1, 31)]  # steps 31-60: slow climb past 0.5
    rows = rows_of([900.0 * (1 + rng.gauss(0, 0.03)) for _ in rewards], rewards)
    result, per_step = analyze(rows)
    hockey = result["hockey_stick"]
    assert hockey["detected"] and 21 <= hockey["drop_step"] <= 21 + TH.patience + 1
    recovered_at = hockey["drop_step"] + hockey["recovery_steps"]
    assert hockey["recovered"] and 45 <= recovered_at <= 60  # the climb is back near 0.5 around step 48
    assert per_step[-1]["bai/reward_recovery_steps"] == hockey["recovery_steps"]
    assert hockey["depth"] > TH.noise_units
    assert [e["detector"] for e in events(rows) if e["alarm"] or e["detector"] == "reward_recovered"] == [
        "hockey_stick", "reward_recovered"]


def test_a_reward_that_falls_by_half_and_stays_down_with_8_completions_a_step_is_raised():
    # Rewards move in eighths; the 20-step mean falls from 0.6 to 0.3 and never comes back. One step's noise
    # (0.17) is more than half the fall; the level's noise is what it is measured in.
    rng = random.Random(5)
    rewards = [sum(rng.random() < (0.6 if s < 100 else 0.3) for _ in range(8)) / 8 for s in range(250)]
    result, _ = analyze(rows_of([700.0] * 250, rewards))
    hockey = result["hockey_stick"]
    assert hockey["detected"] and 100 <= hockey["drop_step"] <= 130 and not hockey["recovered"]


def test_entropy_collapse_from_one_to_five_hundredths_is_raised_and_a_noisy_slow_decline_is_not():
    collapse = [(s, {"entropy_loss": (1.0 if s < 20 else 0.05) * (1 + 0.01 * (s % 3))}) for s in range(1, 41)]
    result, per_step = analyze(collapse)
    assert result["entropy_collapse"]["detected"] and 20 <= result["entropy_collapse"]["step"] <= 20 + TH.patience + 1
    assert per_step[-1]["bai/entropy_collapse"] == 1.0 and per_step[-1]["bai/entropy_ratio"] < 0.1
    rng = random.Random(0)
    healthy = [(s, {"actor/entropy": (0.6 - 0.0008 * s) * (1 + rng.gauss(0, 0.1))}) for s in range(1, 401)]
    result, per_step = analyze(healthy)
    assert not result["entropy_collapse"]["detected"] and not any(p["bai/entropy_collapse"] for p in per_step)
    # Falling to a fifth but staying at 0.3 nats is lower entropy, not a collapse (--bai.entropy_nats 0.1).
    high = [(s, {"entropy_loss": 1.5 if s < 20 else 0.28}) for s in range(1, 60)]
    assert not analyze(high)[0]["entropy_collapse"]["detected"]


def test_an_entropy_spike_of_a_few_points_is_not_the_level_a_collapse_is_measured_from():
    rng = random.Random(1)
    noisy = lambda level: level * math.exp(rng.gauss(0, 0.15))  # noqa: E731
    # 0.13 nats, 3 log points at 1.1-1.7 during a reward dip, then back to half the start: lower, not collapsed.
    spike = [noisy(0.13) for _ in range(8)] + [1.1, 1.7, 0.75] + [noisy(0.06) for _ in range(30)]
    result, per_step = analyze([(5 * (i + 1), {"entropy": e}) for i, e in enumerate(spike)])
    assert not result["entropy_collapse"]["detected"] and result["baseline_entropy"] < 0.25
    # A rise that stays is the entropy's level: a later fall to a tenth of it is a collapse.
    rise = [noisy(0.13) for _ in range(8)] + [noisy(1.2) for _ in range(12)] + [noisy(0.06) for _ in range(20)]
    result, _ = analyze([(5 * (i + 1), {"entropy": e}) for i, e in enumerate(rise)])
    assert result["entropy_collapse"]["detected"] and result["baseline_entropy"] > 0.8
    assert 5 * 21 <= result["entropy_collapse"]["step"] <= 5 * (21 + TH.patience + 1)


def test_a_length_that_grew_during_a_crash_and_went_back_to_its_start_is_not_a_collapse():
    # Arithmetic answers (a TRL run, 1 x 8): 7 tokens, ~30 for 80 steps of a reward crash, then 7 again: a fall to a
    # quarter of the 100-step reference, but back where the run began.
    rng = random.Random(4)
    noisy = lambda level: level * math.exp(rng.gauss(0, 0.15))  # noqa: E731
    lengths = [noisy(7.0) for _ in range(60)] + [noisy(30.0) for _ in range(80)] + [noisy(7.0) for _ in range(160)]
    result, per_step = analyze(rows_of(lengths, [0.5] * len(lengths)))
    assert not result["length_collapse"]["detected"] and not any(p["bai/length_collapse"] for p in per_step)
    # The same fall in a run that began at 30 tokens is a collapse, raised within patience + 1 points.
    result, _ = analyze(rows_of(lengths[60:], [0.5] * 240))
    assert result["length_collapse"]["detected"] and 81 <= result["length_collapse"]["step"] <= 81 + TH.patience + 1


def test_an_entropy_that_settles_back_to_its_near_deterministic_start_is_not_a_collapse():
    # Short arithmetic answers (a TRL run, 1 prompt x 8): 0.003 nats at first, 0.3 for 80 steps of a reward crash,
    # then back near where it began. It fell to a hundredth of its highest level, but not below where RL started.
    rng = random.Random(2)
    noisy = lambda level: level * math.exp(rng.gauss(0, 1.0))  # noqa: E731 - per-step entropy of a few tokens
    settles = [noisy(0.003) for _ in range(60)] + [noisy(0.3) for _ in range(80)] + [noisy(0.004) for _ in range(200)]
    result, per_step = analyze([(s + 1, {"entropy": e}) for s, e in enumerate(settles)])
    assert not result["entropy_collapse"]["detected"] and not any(p["bai/entropy_collapse"] for p in per_step)
    # The same run from 0.3 nats at its start: the fall to 0.004 is a collapse.
    collapses = settles[60:]
    result, _ = analyze([(s + 1, {"entropy": e}) for s, e in enumerate(collapses)])
    assert result["entropy_collapse"]["detected"] and 80 <= result["entropy_collapse"]["step"] <= 80 + 2 * TH.patience
    # A collapse at the second log point (a learning rate far too high): the opening values are fallen ones, and the
    # fall is from where the run began, so it is raised within patience + 1 points.
    at_once = [(10 * (i + 1), {"entropy": 1.0 if i == 0 else 0.02 * (1 + 0.05 * (i % 3))}) for i in range(40)]
    result, _ = analyze(at_once)
    assert result["entropy_collapse"]["detected"] and result["entropy_collapse"]["step"] <= 20 + 10 * (TH.patience + 1)
    # A monitor state saved before the opening level was kept resumes without that test (it cannot know the opening):
    # the same run then reads as it did before, a collapse from the peak.
    rows = [(s + 1, {"entropy": e}) for s, e in enumerate(settles)]
    state = new_state()
    for step, metrics in rows[:100]:
        observe(state, step, metrics, TH)
    old = json.loads(json.dumps(state))
    for track in old["signals"].values():
        del track["opening"], track["top"], track["risen"]
    for step, metrics in rows[100:]:
        observe(old, step, metrics, TH)
    assert verdict(old)["entropy_collapse"]["detected"] and "opening" not in old["signals"]["entropy"]


def test_a_kl_that_rises_slowly_past_one_nat_is_raised_when_it_crosses_it():
    # 0.1 -> 2.5 nats over 300 steps: the trailing reference follows the rise, so it never doubles it; it crosses 1 nat
    # (by its median level) at about step 113, a quarter above a reference of about 0.65.
    rng = random.Random(0)
    rows = [(s, {"kl": (0.1 + 0.008 * s) * (1 + rng.gauss(0, 0.1))}) for s in range(1, 300)]
    result, _ = analyze(rows)
    assert result["kl_blowup"]["detected"] and 112 <= result["kl_blowup"]["step"] <= 112 + TH.patience + 3


def test_a_reward_stuck_at_zero_is_raised_by_its_run_and_a_rare_success_rate_is_not():
    rng = random.Random(3)

    def four_completions(p):  # 1 prompt x 4 completions scored 0/1: the reward moves in quarters
        return sum(rng.random() < p for _ in range(4)) / 4

    # A policy that only fails from step 61: 20 zeros where a zero was 1 step in 25 before. The 20-step level still
    # holds the steps before; the run of zeros (q^n) is raised within patience + 1 log points.
    rewards = [four_completions(0.55) for _ in range(60)] + [0.0] * 20
    drop = analyze(rows_of([500.0] * 80, rewards))[0]["hockey_stick"]
    assert drop["detected"] and 61 <= drop["drop_step"] <= 61 + TH.patience + 1
    # A hard task whose zeros are half the steps: runs of up to 8 zeros are chance, and nothing is raised.
    rewards = [four_completions(0.15) for _ in range(300)]
    assert not analyze(rows_of([500.0] * 300, rewards))[0]["hockey_stick"]["detected"]


def test_verl_kl_in_the_reward_is_read_before_a_zero_kl_loss_and_the_one_update_ppo_kl():
    # verl PPO with the KL in the reward: actor/reward_kl_penalty is the KL to the reference; actor/ppo_kl (old -> new
    # policy of one update) stays tiny, and some verl versions print actor/kl_loss as 0.0 when no KL loss is used.
    rows = [(s, {"actor/kl_loss": 0.0, "actor/ppo_kl": 0.002, "actor/reward_kl_penalty": 0.05 if s < 60 else 1.5})
            for s in range(1, 100)]
    result, _ = analyze(rows)
    assert result["kl_blowup"]["detected"] and 60 <= result["kl_blowup"]["step"] <= 60 + TH.patience + 1


def test_kl_is_judged_against_one_nat_and_its_own_trajectory():
    rng = random.Random(0)
    # GRPO with little KL penalty: a smooth rise to 0.3 nats in the first tens of steps is ordinary.
    smooth = [(s, {"kl": 0.3 * (1 - math.exp(-s / 15)) * (1 + rng.gauss(0, 0.15))}) for s in range(1, 201)]
    assert not analyze(smooth)[0]["kl_blowup"]["detected"]
    # A jump to 0.8 nats stays under the limit; one to 1.5 nats is a blow-up.
    assert not analyze([(s, {"ppo_kl": 0.002 if s < 50 else 0.8}) for s in range(1, 70)])[0]["kl_blowup"]["detected"]
    result, _ = analyze([(s, {"ppo_kl": 0.002 if s < 50 else 1.5 * (1 + 0.05 * (s % 2))}) for s in range(1, 70)])
    assert result["kl_blowup"]["detected"] and 50 <= result["kl_blowup"]["step"] <= 50 + TH.patience + 1
    # Thousands of nats from the first log point: no reference to rise from, raised on the limit alone.
    thousands = [(s, {"kl": 2500.0 * (1 + rng.gauss(0, 0.2))}) for s in range(10, 300, 10)]
    result, _ = analyze(thousands)
    assert result["kl_blowup"]["detected"] and result["kl_blowup"]["step"] == 10 * TH.patience
    # Single-step spikes of a KL that sits at 0.6 nats are no blow-up.
    spiky = [(s, {"kl": 5.3 if s == 27 else 2.5 if s in (47, 50) else 0.6 + 0.05 * (s % 3)}) for s in range(1, 120)]
    assert not analyze(spiky)[0]["kl_blowup"]["detected"]


def capped_rows(shares, untruncated, cap):
    """Mean length of a batch where a share is cut at the cap and the rest averages `untruncated` tokens."""
    return [(s, {LENGTH: r * cap + (1 - r) * u * (1 + 0.02 * (s % 3)), TRUNCATED: r})
            for s, (r, u) in enumerate(zip(shares, untruncated), 1)]


def test_a_length_drop_explained_by_the_truncated_share_is_a_truncation_drop():
    # Half the responses cut at the 8192 cap, then the model learns to stop: the others keep their ~3000 tokens.
    rows = capped_rows([0.5] * 30 + [0.02] * 30, [3000] * 60, 8192)
    result, per_step = analyze(rows, cap=8192)
    assert not result["length_collapse"]["detected"]
    drop = result["truncation_drop"]
    assert drop["detected"] and 30 <= drop["step"] <= 30 + TH.patience + 1
    assert drop["truncated_rate_before"] == pytest.approx(0.5) and drop["truncated_rate_after"] == pytest.approx(0.02)
    assert drop["untruncated_ratio"] > 0.9 and drop["length_cap"] == 8192
    assert per_step[-1]["bai/truncation_drop"] == 1.0 and per_step[-1]["bai/length_collapse"] == 0.0
    # The cap can come from the log's own max-length metric.
    with_max = [(s, {**m, "response_length/max": 8192.0 if m[TRUNCATED] > 0.1 else 5000.0}) for s, m in rows]
    assert analyze(with_max)[0]["truncation_drop"]["detected"]
    # Without any cap, the fall cannot be explained: a collapse.
    assert analyze(rows)[0]["length_collapse"]["detected"]


def test_a_collapse_below_the_cap_with_a_falling_truncated_share_is_a_collapse():
    # The PPO run: mean length to a fifth, truncated share from over a third to 0, while the responses that
    # were not truncated shrank about fourfold (a fixed template far below the cap).
    rows = capped_rows([0.36] * 40 + [0.0] * 40, [2000] * 40 + [500] * 40, 4096)
    result, _ = analyze(rows, cap=4096)
    assert rows[-1][1][LENGTH] / rows[0][1][LENGTH] < 0.25
    collapse = result["length_collapse"]
    assert collapse["detected"] and 40 <= collapse["step"] <= 40 + TH.patience + 1
    assert collapse["untruncated_ratio"] == pytest.approx(0.25, abs=0.05)
    assert not result["truncation_drop"]["detected"]


def test_a_slow_fall_from_the_start_level_is_told_from_the_cap_by_collapse_ratio_too():
    # A distilled model's slow fall (verl, 8192 cap): half its responses at the cap for 100 steps, then over 300 steps
    # the cap lets go and the responses that were not truncated shrink to `kept` of theirs. No 100 steps see the
    # level fall to 0.6; it ends under half its start level, first as the cap lets go (a truncation drop either way).
    # Kept 0.7: the cap explains it all; kept 0.55 (under collapse_ratio, the corpus rule's bound too, though over
    # start_ratio): the responses themselves collapse, raised once their estimated length is under 0.6 of theirs.
    for kept, collapsed in ((0.7, False), (0.55, True)):
        shares = [0.5] * 100 + [0.5 * (1 - s / 300) for s in range(300)] + [0.0] * 50
        lengths = [3000.0] * 100 + [3000.0 * (1 - (1 - kept) * s / 300) for s in range(300)] + [3000.0 * kept] * 50
        result, _ = analyze(capped_rows(shares, lengths, 8192), cap=8192)
        assert result["truncation_drop"]["detected"]
        assert result["length_collapse"]["detected"] == collapsed
        # At the end of the log it is one fall: the collapse it became, else the cap drop (diagnose, --json).
        stayed = [name for name in ("length_collapse", "truncation_drop") if result[name]["unrecovered_step"]]
        assert stayed == ["length_collapse" if collapsed else "truncation_drop"]
    assert 0.55 < result["length_collapse"]["untruncated_ratio"] < 0.6


def test_older_metric_names_give_the_same_verdict():
    rng = random.Random(6)
    lengths = [(900.0 if i < 15 else 200.0) * (1 + rng.gauss(0, 0.03)) for i in range(30)]
    rewards = [0.5 + rng.gauss(0, 0.03) for _ in range(15)] + [-1.0 + rng.gauss(0, 0.03) for _ in range(15)]
    new = analyze(rows_of(lengths, rewards))[0]
    old_rows = [(s, {"response_length": m[LENGTH], "reward": m[REWARD]}) for s, m in rows_of(lengths, rewards)]
    assert analyze(old_rows)[0] == new
    assert new["length_collapse"]["detected"] and new["hockey_stick"]["detected"]


def test_state_survives_a_json_round_trip_mid_run_like_a_resumed_live_monitor():
    rng = random.Random(8)
    lengths = [900.0 * (1 + rng.gauss(0, 0.03)) for _ in range(30)] + [300.0] * 10
    rewards = [0.5 + rng.gauss(0, 0.03) for _ in range(25)] + [0.0] * 5 + [0.6] * 10
    rows = rows_of(lengths, rewards)
    state = new_state()
    for step, metrics in rows[:28]:
        observe(state, step, metrics, TH)
    state = json.loads(json.dumps(state))  # what checkpointing it in client_states does
    for step, metrics in rows[28:]:
        observe(state, step, metrics, TH)
    assert verdict(state) == analyze(rows, TH)[0]


def test_a_state_saved_before_the_start_level_existed_takes_it_from_the_steps_it_holds():
    # A monitor state saved by 0.3 before start_ratio (no "start" in its tracks), resumed at step 300 of a slow
    # decline: its start level is the median of the last 100 steps it still holds, and the decline is judged from there.
    rng = random.Random(9)
    rows = rows_of([3000.0 * (1 - s / 1000) * (1 + rng.gauss(0, 0.04)) for s in range(900)], [0.5] * 900)
    state = new_state()
    for step, metrics in rows[:300]:
        observe(state, step, metrics, TH)
    for track in state["signals"].values():
        track.pop("start"), track.pop("first", None)
    for step, metrics in rows[300:]:
        observe(state, step, metrics, TH)
    raised = [e for e in state["events"] if e["alarm"]]
    assert [e["detector"] for e in raised] == ["length_collapse"] and "of its start level" in raised[0]["message"]
    assert 3000.0 * 0.7 < raised[0]["values"]["reference"] < 3000.0 * 0.8  # the median of steps 200-300, not 2850
    assert raised[0]["step"] > analyze(rows, TH)[0]["length_collapse"]["step"]


def test_a_state_saved_by_0_2_keeps_its_reference_and_what_it_raised():
    old = {"version": 2, "steps": 40,
           "signals": {"length": {"ema": 1000.0, "window": [[s, 1000.0 + s] for s in range(1, 41)], "frozen": None,
                                  "run": 0, "last": 1040.0, "diffs": [5.0, 6.0, 4.0], "count": 40}},
           "length_collapse": {"step": None}, "hockey_stick": {"step": 12, "depth": 9.0, "recovery_steps": None},
           "events": []}
    state = upgrade_state(old)
    assert state["detectors"]["hockey_stick"]["step"] == 12  # not raised again
    for step in range(41, 50):  # a reward too: 0.2's raise has no reference to come back to, and must not fail
        observe(state, step, {LENGTH: 300.0, REWARD: 0.5 + 0.01 * (step % 3)}, TH)
    assert verdict(state)["hockey_stick"]["episodes"] == [{"step": 12, "sustained": 12, "recovery_step": None}]
    found = verdict(state)["length_collapse"]
    assert found["detected"] and found["step"] <= 41 + TH.patience  # the reference came from 0.2's window
    assert upgrade_state({"steps": 3}) is None  # 0.1's state (no version): start afresh


def test_a_state_saved_by_0_3_keeps_what_it_raised_and_can_still_end_it():
    # 0.3's state is today's without episodes: a collapse raised at ~41, saved mid-collapse, then resumed.
    rows = rows_of([1000.0 * (1 + 0.01 * (s % 3)) for s in range(40)] + [100.0] * 20 + [1000.0] * 20, [0.4] * 80)
    state = new_state()
    for step, metrics in rows[:50]:
        observe(state, step, metrics, TH)
    old = json.loads(json.dumps(state))
    for found in old["detectors"].values():
        del found["episodes"]
    old["version"] = 3
    resumed = upgrade_state(old)
    raised = resumed["detectors"]["length_collapse"]["step"]
    assert raised is not None and resumed["detectors"]["length_collapse"]["episodes"][0]["step"] == raised
    for step, metrics in rows[50:]:
        observe(resumed, step, metrics, TH)
    assert [e["detector"] for e in resumed["events"] if e["alarm"]] == ["length_collapse"]  # not raised again
    assert verdict(resumed)["length_collapse"]["recovered"] and verdict(resumed) == analyze(rows, TH)[0]


def test_thresholds_change_the_verdict_and_renamed_ones_are_refused_naming_their_replacement():
    rng = random.Random(9)
    lengths = [(1000.0 if i < 20 else 550.0) * (1 + rng.gauss(0, 0.02)) for i in range(40)]
    rows = rows_of(lengths, [0.5] * 40)
    with pytest.raises(BAIError, match="--bai.collapse_ratio must be in"):
        make_thresholds({"collapse_ratio": 1.5})
    assert analyze(rows, Thresholds())[0]["length_collapse"]["detected"]
    assert not analyze(rows, Thresholds(collapse_ratio=0.5))[0]["length_collapse"]["detected"]
    for old, (new, _) in RENAMED.items():
        with pytest.raises(BAIError, match=f"^--bai.{old} was removed in 0.3: use --bai.{new} "):
            make_thresholds({old: 1.0})
