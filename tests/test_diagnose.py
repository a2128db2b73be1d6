"""`openrlhf-bai diagnose` on runs written the way OpenRLHF writes them: its logger's stdout lines (0.11 names and
0.9/0.10 names, directly and through a Ray actor), its TensorboardLogger, a wandb CSV export and the plugin's JSONL;
each collapsing and healthy."""

import csv
import json
import math
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from openrlhf_bai.cli.main import main as cli
from openrlhf_bai.diagnostics.readers import read_rows

STEPS = 40
REPO = Path(__file__).resolve().parents[1]


def series(shape: str, seed: int = 0) -> list[tuple[int, float, float]]:
    """(step, mean response length, mean reward). "collapsing": the length falls to a quarter at step 16 and the
    reward drops at step 12, recovering slowly from step 24 (the paper's Figures 2-3); "healthy": 5% length noise,
    slowly rising reward."""
    rng = random.Random(seed)
    out = []
    for step in range(1, STEPS + 1):
        if shape == "healthy":
            length = 1400.0 * (1 + 0.004 * step) * (1 + rng.gauss(0, 0.05))
            reward = 0.40 + 0.004 * step + rng.gauss(0, 0.01)
        else:
            length = 1400.0 * (1 + rng.gauss(0, 0.05)) if step < 16 else 350.0 * (1 + rng.gauss(0, 0.05))
            reward = 0.40 + rng.gauss(0, 0.01) if step < 12 else 0.05 if step < 24 else 0.05 + 0.04 * (step - 23)
        out.append((step, length, reward))
    return out


def status_011(length: float, reward: float) -> dict:
    """PPOTrainer.train_step's status in 0.11: actor metrics, timings, then _compute_rollout_stats."""
    return {
        "policy_loss": -0.0123, "actor_lr": 1e-6, "kl": 0.0021, "grad_norm": 0.35,
        "timing/make_experience": 41.2, "timing/ppo_train": 30.5, "timing/broadcast": 2.0,
        "rollout/reward_mean": reward, "rollout/reward_std": 0.3,
        "rollout/response_length_mean": length, "rollout/truncated_rate": 0.01, "rollout/num_samples": 512.0,
        "timing/generation": 40.1, "timing/step_total": 114.0,
    }


def status_09(length: float, reward: float) -> dict:
    """0.9/0.10: the actor's status averaged experience.info, so the rollout means had plain names."""
    return {
        "policy_loss": -0.0123, "actor_lr": 1e-6, "reward": reward, "return": reward - 0.01,
        "response_length": length, "total_length": length + 180.0, "response_clip_ratio": 0.01, "kl": 0.0021,
    }


STATUS = {"0.11": status_011, "0.9": status_09}


def write_stdout_log(path: Path, shape: str, version: str = "0.11") -> Path:
    """The lines PPOTrainer.fit logs through openrlhf's own logger and handler, captured to a file."""
    from openrlhf.utils import logging_utils

    logger = logging_utils.init_logger("openrlhf.trainer.ppo_trainer")
    handler = logging_utils._default_handler
    with path.open("w") as out:
        # OpenRLHF's handler flushes through the sys.stdout it was made with (maybe an earlier test's capsys, closed
        # now): stream and flush are swapped together.
        old = handler.stream, handler.flush
        handler.stream, handler.flush = out, out.flush
        try:
            logger.info("Sample: <think>Let me compute 2+2.</think> The answer is 4.")
            for step, length, reward in series(shape):
                out.write("Episode [1/1]:  40%|████      | 16/40 [10:02<15:03, 37.6s/it]\r")
                status = STATUS[version](length, reward)
                status["generated_samples"] = ["<think>...</think> 4", reward]
                log_status = {k: v for k, v in status.items() if k not in ["generated_samples"]}
                logger.info(f"✨ Global step {step}: {log_status}")
                if step % 10 == 0:
                    eval_logs = {"pass1": 0.3}
                    logger.info(f"✨ Evaluation completed in 0:01:02, global_step {step}, eval_metrics: {eval_logs}")
        finally:
            handler.stream, handler.flush = old
    return path


def write_tensorboard(root: Path, shape: str, version: str = "0.11", run_name: str = "run") -> Path:
    """OpenRLHF's TensorboardLogger, called as save_logs_and_checkpoints does with logging_steps 1."""
    from openrlhf.utils.logging_utils import TensorboardLogger

    args = SimpleNamespace(logger=SimpleNamespace(tensorboard_dir=str(root), wandb=SimpleNamespace(run_name=run_name)))
    tb = TensorboardLogger(args)
    for step, length, reward in series(shape):
        status = STATUS[version](length, reward)
        status["generated_samples"] = ["<think>...</think> 4", reward]
        tb.log_train(step, status)
    tb.log_eval(STEPS, {"pass1": 0.3})
    tb.close()
    return root / run_name


def write_wandb_history_csv(path: Path, shape: str) -> Path:
    """A run's history export: one row per wandb.log call; WandbLogger.log_train logs the samples table in a row
    of its own, without train/global_step."""
    columns = ["_step", "_runtime", "_timestamp", "train/global_step", *(f"train/{k}" for k in status_011(0, 0))]
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        wandb_step = 0
        for step, length, reward in series(shape):
            writer.writerow([wandb_step, 10.0 * step, 1.7e9 + step] + [""] * (len(columns) - 3))
            values = {f"train/{k}": v for k, v in status_011(length, reward).items()}
            values.pop("train/timing/broadcast")  # a metric not logged that step: an empty cell
            cells = [values.get(column, "") for column in columns[4:]]
            writer.writerow([wandb_step + 1, 10.0 * step, 1.7e9 + step, step, *cells])
            wandb_step += 2
    return path


def write_wandb_panel_csv(path: Path, shape: str) -> Path:
    """A chart panel's "Export CSV": Step, then "<run> - <metric>" with its __MIN/__MAX range columns."""
    metrics = ["train/rollout/response_length_mean", "train/rollout/reward_mean"]
    columns = ["Step"] + [f"ppo-qwen - {m}{suffix}" for m in metrics for suffix in ("", "__MIN", "__MAX")]
    with path.open("w", newline="") as out:
        writer = csv.writer(out, quoting=csv.QUOTE_ALL)
        writer.writerow(columns)
        for step, length, reward in series(shape):
            writer.writerow([step] + [v for v in (length, reward) for _ in range(3)])
    return path


def write_jsonl(path: Path, shape: str) -> Path:
    with path.open("w") as out:
        for step, length, reward in series(shape):
            record = {"step": step, **status_011(length, reward), "bai/response_length_ratio": 1.0}
            out.write(json.dumps(record) + "\n")
    return path


WRITERS = {
    "stdout-0.11": ("stdout", lambda d, shape: write_stdout_log(d / "train.log", shape)),
    "stdout-0.9": ("stdout", lambda d, shape: write_stdout_log(d / "train.log", shape, "0.9")),
    "tensorboard-0.11": ("tensorboard", lambda d, shape: write_tensorboard(d / "tb", shape)),
    "tensorboard-0.9": ("tensorboard", lambda d, shape: write_tensorboard(d / "tb", shape, "0.9")),
    "wandb-history-csv": ("wandb-csv", lambda d, shape: write_wandb_history_csv(d / "history.csv", shape)),
    "wandb-panel-csv": ("wandb-csv", lambda d, shape: write_wandb_panel_csv(d / "panel.csv", shape)),
    "jsonl": ("jsonl", lambda d, shape: write_jsonl(d / "bai.jsonl", shape)),
}


def diagnose(capsys, *argv):
    status = cli(["diagnose", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("fmt", WRITERS)
def test_reads_every_step_of_each_format(tmp_path, fmt):
    kind, write = WRITERS[fmt]
    path = write(tmp_path, "collapsing")
    detected, rows = read_rows(path)
    assert detected == kind
    assert [step for step, _ in rows] == list(range(1, STEPS + 1))
    length_key, reward_key = ("response_length", "reward") if fmt.endswith("0.9") else (
        "rollout/response_length_mean", "rollout/reward_mean")
    for (_, metrics), (_, length, reward) in zip(rows, series("collapsing")):
        assert metrics[length_key] == pytest.approx(length, rel=1e-6)  # TensorBoard stores float32
        assert metrics[reward_key] == pytest.approx(reward, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("fmt", WRITERS)
@pytest.mark.parametrize("shape", ["collapsing", "healthy"])
def test_verdict_of_each_format(tmp_path, capsys, fmt, shape):
    path = WRITERS[fmt][1](tmp_path, shape)
    status, out, err = diagnose(capsys, path, "--json", tmp_path / "v.json", "--fail-on", "collapse,hockey")
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["source"] == str(path) and v["steps"] == STEPS and v["kind"] == WRITERS[fmt][0]
    assert err == ""
    assert str(path) in out
    if shape == "healthy":
        assert status == 0
        assert not v["length_collapse"]["detected"] and v["length_collapse"]["step"] is None
        assert v["length_collapse"]["min_ratio"] > 0.85
        # 0.2's fields, unchanged (0.3 only adds: strength, max_strength, sustained_step, reference, recovered).
        assert {k: v["hockey_stick"][k] for k in ("detected", "drop_step", "depth", "recovery_steps")} == {
            "detected": False, "drop_step": None, "depth": 0.0, "recovery_steps": None}
        return
    assert status == 3
    # The references: the smoothed peaks the length and the reward fell from (1400 and 0.40 plus noise).
    assert v["baseline_length"] == pytest.approx(1400, rel=0.1)
    assert v["baseline_reward"] == pytest.approx(0.40, abs=0.02)
    collapse, hockey = v["length_collapse"], v["hockey_stick"]
    assert collapse["detected"] and 16 <= collapse["step"] <= 20
    assert collapse["min_ratio"] == pytest.approx(350 / v["baseline_length"], rel=0.1)
    assert hockey["detected"] and 12 <= hockey["drop_step"] <= 16
    # Reward is back at 0.40 from step 33 (0.05 + 0.04 * 10 = 0.45 at step 33); recovered means the EMA within one
    # noise unit of the reference.
    assert 30 <= hockey["drop_step"] + hockey["recovery_steps"] <= 36
    assert hockey["depth"] > 10
    assert f"YES at step {collapse['step']}" in out and f"drop at step {hockey['drop_step']}" in out


def test_ray_actor_stdout_as_the_driver_prints_it(tmp_path):
    """PPOTrainer is a Ray actor: its lines reach the driver's stdout behind a coloured `(PPOTrainer pid=N)`."""
    log = tmp_path / "driver.log"
    statuses = [(step, status_011(length, reward)) for step, length, reward in series("collapsing")]
    script = textwrap.dedent(f"""
        import json, time
        from pathlib import Path
        import ray

        @ray.remote(num_cpus=0)
        class PPOTrainer:
            def fit(self, statuses):
                from openrlhf_bai.integration.flash_attn_cpu import make_flash_attn_importable
                make_flash_attn_importable()
                from openrlhf.utils.logging_utils import init_logger
                logger = init_logger("openrlhf.trainer.ppo_trainer")
                for global_step, log_status in statuses:
                    logger.info(f"✨ Global step {{global_step}}: {{log_status}}")

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=True)
        ray.get(PPOTrainer.remote().fit.remote(json.loads({json.dumps(statuses)!r})))
        # Ray forwards worker output asynchronously: wait until the last step has reached our stdout.
        deadline = time.time() + 60
        while "Global step {STEPS}:" not in Path({str(log)!r}).read_text() and time.time() < deadline:
            time.sleep(0.2)
        ray.shutdown()
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with log.open("w") as out:
        subprocess.run([sys.executable, "-c", script], stdout=out, stderr=subprocess.PIPE, env=env, check=True,
                       timeout=240)
    assert "\x1b[36m(PPOTrainer pid=" in log.read_text()
    kind, rows = read_rows(log)
    assert kind == "stdout" and rows == [(step, pytest.approx(status)) for step, status in statuses]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_with_and_without_bai_in_one_plot_and_json_list(tmp_path, capsys):
    """The paper's comparison: a run without BAI (collapses) against one with BAI (healthy), two formats."""
    without = write_stdout_log(tmp_path / "without-bai.log", "collapsing")
    with_bai = write_tensorboard(tmp_path / "tb", "healthy", run_name="with-bai")
    plot = tmp_path / "compare.png"
    status, out, _ = diagnose(capsys, without, with_bai, "--json", tmp_path / "v.json", "--plot", plot)
    assert status == 0  # found, but nothing asked to fail on
    verdicts = json.loads((tmp_path / "v.json").read_text())
    assert [v["source"] for v in verdicts] == [str(without), str(with_bai)]
    assert [v["length_collapse"]["detected"] for v in verdicts] == [True, False]
    assert [v["hockey_stick"]["detected"] for v in verdicts] == [True, False]
    assert out.splitlines()[0].split()[:2] == ["run", "steps"] and len(out.splitlines()) == 3
    width, height = png_size(plot)
    # 11 inches wide (legend outside the axes); one 2.6-inch panel per signal logged: length, reward and the kl
    # that OpenRLHF's status carries.
    assert (width, height) == (1100, 840)
    assert 40_000 < plot.stat().st_size < 1_000_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_fail_on_only_the_named_phenomenon(tmp_path, capsys):
    # Length collapses, reward stays flat: only "collapse" gates.
    rng = random.Random(3)
    path = tmp_path / "bai.jsonl"
    path.write_text("".join(
        json.dumps({"step": s, "rollout/response_length_mean": 900.0 if s < 20 else 200.0,
                    "rollout/reward_mean": 0.5 + rng.gauss(0, 0.01)}) + "\n" for s in range(1, 41)))
    assert diagnose(capsys, path, "--fail-on", "hockey")[0] == 0
    assert diagnose(capsys, path, "--fail-on", "collapse")[0] == 3
    assert diagnose(capsys, path, "--fail-on", "hockey,collapse")[0] == 3
    assert diagnose(capsys, path)[0] == 0
    # A looser threshold is a different verdict.
    assert diagnose(capsys, path, "--fail-on", "collapse", "--collapse-ratio", "0.2")[0] == 0
    with pytest.raises(SystemExit) as exc:
        cli(["diagnose", str(path), "--fail-on", "colapse"])
    assert exc.value.code == 2 and "unknown colapse" in capsys.readouterr().err


def test_module_entry_point_exit_status(tmp_path):
    path = write_jsonl(tmp_path / "bai.jsonl", "collapsing")
    result = subprocess.run([sys.executable, "-m", "openrlhf_bai.cli.diagnose", str(path), "--fail-on", "collapse"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "YES at step" in result.stdout
    result = subprocess.run([sys.executable, "-m", "openrlhf_bai.cli.diagnose", str(tmp_path / "missing.log")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"openrlhf-bai: error: {tmp_path / 'missing.log'}: no such file or directory; expected an OpenRLHF stdout "
        "log ('✨ Global step N: {...}'), a verl console log")


def test_kind_forces_the_reader(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bai.log", "healthy")
    assert diagnose(capsys, path, "--kind", "jsonl")[0] == 0
    status, _, err = diagnose(capsys, path, "--kind", "stdout")
    assert status == 1 and f"{path}: no '✨ Global step N: {{...}}' lines" in err


def test_partly_missing_metrics_are_read_as_far_as_they_go(tmp_path, capsys):
    # No reward at all (a run that logged lengths only), and a length log whose reward stops at step 30.
    no_reward = tmp_path / "no-reward.jsonl"
    no_reward.write_text("".join(json.dumps({"step": s, "rollout/response_length_mean": n}) + "\n"
                                 for s, n, _ in series("collapsing")))
    stops = tmp_path / "stops.jsonl"
    stops.write_text("".join(json.dumps({"step": s, "rollout/response_length_mean": n,
                                         **({"rollout/reward_mean": r} if s <= 30 else {})}) + "\n"
                             for s, n, r in series("healthy")))
    status, out, err = diagnose(capsys, no_reward, stops, "--json", tmp_path / "v.json")
    assert status == 0
    assert (f"warning: {no_reward}: no reward metric (looked for rollout/reward_mean, reward_mean, reward, "
            "critic/score/mean" in err)
    assert f"warning: {stops}: reward missing at 10 of 40 steps" in err
    first, second = json.loads((tmp_path / "v.json").read_text())
    assert first["missing_steps"]["response_length"] == 0 and first["missing_steps"]["reward"] == STEPS
    assert first["length_collapse"]["detected"] and first["baseline_reward"] is None
    assert "not assessed (no reward)" in out
    assert second["missing_steps"]["response_length"] == 0 and second["missing_steps"]["reward"] == 10
    assert second["steps"] == STEPS


def test_resumed_run_keeps_the_steps_logged_after_the_resume(tmp_path):
    # Steps 1-12 logged, the job died and resumed from the checkpoint at step 8: 9-12 are logged again.
    lines = [json.dumps({"step": s, "rollout/reward_mean": 1.0}) for s in range(1, 13)]
    lines += [json.dumps({"step": s, "rollout/reward_mean": 2.0}) for s in range(9, 16)]
    # One step in two records (as wandb writes a step in several rows) is one step.
    lines += [json.dumps({"step": 16, "rollout/reward_mean": 3.0}), json.dumps({"step": 16, "kl": 0.1})]
    path = tmp_path / "resumed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _, rows = read_rows(path)
    assert [s for s, _ in rows] == list(range(1, 17))
    assert [m["rollout/reward_mean"] for _, m in rows] == [1.0] * 8 + [2.0] * 7 + [3.0]
    assert rows[-1][1] == {"rollout/reward_mean": 3.0, "kl": 0.1}
    assert rows.restarts == 1  # the resume at step 9; step 16 in two records is no restart


def test_a_csv_of_several_runs_reads_as_its_last_and_says_so(tmp_path, capsys):
    # Logan-Cole-Luna/lean-gym-rl's results/training_metrics.csv: three arms, each from step 1, one after another.
    arms = [(arm, step, length, reward) for arm in ("outcome", "shaped", "typecheck")
            for step, length, reward in series("collapsing" if arm == "typecheck" else "healthy")]
    path = tmp_path / "training_metrics.csv"
    path.write_text("arm,step,completion_length,reward\n" + "".join(f"{a},{s},{n},{r}\n" for a, s, n, r in arms))
    _, rows = read_rows(path)
    assert rows.restarts == 2 and [m["completion_length"] for _, m in rows] == [n for _, n, _ in series("collapsing")]
    status, out, err = diagnose(capsys, path)
    assert status == 0 and "YES at step" in out and err.count("\n") == 1
    assert "its steps go back 2 time(s) (a resumed run, or several runs in one file)" in err


def test_a_csv_whose_step_column_has_a_name_of_its_own_says_to_name_it(tmp_path, capsys):
    # sherrywan717/ppo-vs-grpo-math-rlvr counts its steps in a column called "update".
    path = tmp_path / "ppo_metrics.csv"
    path.write_text("update,generated_tokens,reward_mean,completion_length\n"
                    + "".join(f"{s},{512 * s},{r},{n}\n" for s, n, r in series("collapsing")))
    status, _, err = diagnose(capsys, path)
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert "a CSV file without a step column" in err and "name it with --step-key (its columns: update," in err
    status, out, _ = diagnose(capsys, path, "--step-key", "update", "--reward-key", "reward_mean")
    assert status == 0 and "YES at step" in out


BAD_INPUTS = {  # case: (make the file, the error line up to the file's line number, then a phrase that follows)
    "empty": (lambda d: _write(d / "train.log", ""), "file is empty; expected an OpenRLHF stdout log"),
    "unrelated": (lambda d: _write(d / "notes.txt", "shopping list\neggs, milk\n"),
                  "not a training log of a known format; expected an OpenRLHF stdout log"),
    "binary": (lambda d: _write(d / "model.bin", b"\x00\x01\x02" * 100), "binary file; expected"),
    # A record cut off and then ended by a newline (a writer that died mid-line) is damage, not a growing log.
    "truncated-stdout": (lambda d: _cut_inside_last(write_stdout_log(d / "train.log", "healthy"), "Global step", "\n"),
                         "step line is cut off (truncated file?)"),
    "truncated-jsonl": (lambda d: _cut_inside_last(write_jsonl(d / "bai.jsonl", "healthy"), '"step"', "\n"),
                        "not a JSON object (truncated file?)"),
    "truncated-csv": (lambda d: _cut_inside_last(write_wandb_panel_csv(d / "panel.csv", "healthy"), '"40"', "\n"),
                      "cells where the header has 7 (truncated file?)"),
    "jsonl-without-step": (lambda d: _write(d / "x.jsonl", '{"loss": 1.0}\n'), '"step" or "global_step"'),
    "header-only-csv": (lambda d: _write(d / "panel.csv", '"Step","run - train/rollout/reward_mean"\n'),
                        "no training steps found"),
    "no-metrics": (lambda d: _write(d / "x.jsonl", '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'),
                   "2 steps but no response length, reward, entropy or KL in any"),
    "empty-dir": (lambda d: (d / "tb").mkdir() or d / "tb", "no TensorBoard event files"),
    "empty-event-file": (lambda d: _write(d / "events.out.tfevents.1.host", b""), "no training scalars"),
}


def _write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _cut_inside_last(path: Path, marker: str, then: str = "") -> Path:
    """Cut the file 30 characters after the last `marker` (its last record half written), then append `then`."""
    text = path.read_text()
    path.write_text(text[: text.rindex(marker) + 30] + then)
    return path


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clear_line_naming_the_file(tmp_path, capsys, case):
    make, message = BAD_INPUTS[case]
    path = make(tmp_path)
    # A cut-off record is named by its line: the last one of the file.
    where = f":{path.read_text().count(chr(10))}: " if case.startswith("truncated") else ":"
    status, out, err = diagnose(capsys, path, "--json", tmp_path / "v.json")
    assert status == 1 and out == ""
    assert err.startswith(f"openrlhf-bai: error: {path}{where}"), err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "v.json").exists()


def test_several_tensorboard_runs_in_one_directory_must_be_named_one_by_one(tmp_path, capsys):
    first = write_tensorboard(tmp_path / "tb", "healthy", run_name="bai")
    second = write_tensorboard(tmp_path / "tb", "collapsing", run_name="no-bai")
    status, _, err = diagnose(capsys, tmp_path / "tb")
    assert status == 1 and f"holds several TensorBoard runs ({first}, {second}); pass each one" in err
    status, out, _ = diagnose(capsys, first, second, "--fail-on", "collapse")
    assert status == 3 and len(out.splitlines()) == 3


def test_nan_steps_in_a_log_are_skipped(tmp_path, capsys):
    """A step whose reward is NaN (Python prints it as nan) neither breaks the parse nor the smoothing."""
    path = write_stdout_log(tmp_path / "train.log", "healthy")
    text = path.read_text().replace("'rollout/reward_mean': ", "'rollout/reward_mean': nan, 'x': ", 1)
    path.write_text(text)
    _, rows = read_rows(path)
    assert math.isnan(rows[0][1]["rollout/reward_mean"])
    status, _, err = diagnose(capsys, path, "--json", tmp_path / "v.json", "--fail-on", "hockey")
    assert status == 0 and "reward missing at 1 of 40 steps" in err
    assert json.loads((tmp_path / "v.json").read_text())["hockey_stick"]["detected"] is False


def write_verl_log(path: Path) -> Path:
    """verl's console lines for the collapsing series (Ray's prefix included)."""
    path.write_text("".join(
        f"(TaskRunner pid=1) step:{step} - actor/entropy:0.5 - critic/score/mean:{reward:.4f} - "
        f"response_length/mean:{length:.2f} - response_length/clip_ratio:0.01\n"
        for step, length, reward in series("collapsing")))
    return path


def write_trl_log(path: Path) -> Path:
    """The dicts a Hugging Face Trainer prints, one per logging step."""
    path.write_text("".join(f"{{'loss': 0.01, 'reward': {reward!r}, 'completion_length': {length!r}}}\n"
                            for _, length, reward in series("collapsing")))
    return path


LINE_BASED = {**{name: WRITERS[name] for name in WRITERS if not name.startswith("tensorboard")},
              "verl": ("verl", lambda d, shape: write_verl_log(d / "verl.log")),
              "trl": ("trl", lambda d, shape: write_trl_log(d / "trl.log")),
              "console": ("console", lambda d, shape: write_console_log(d / "grpo_log.txt", shape))}


@pytest.mark.parametrize("fmt", LINE_BASED)
def test_a_log_being_written_is_read_up_to_its_last_complete_line(tmp_path, capsys, fmt):
    """A running training's log ends in half a line (a logger writes a line in pieces): that line waits for the
    next read; every complete step is read and judged, and the log is not touched."""
    kind, write = LINE_BASED[fmt]
    path = write(tmp_path, "collapsing")
    text = path.read_text()
    # Half of step 40's line, no newline (OpenRLHF's stdout logs an evaluation line after it).
    start = text.rindex("Global step") if kind == "stdout" else text.rstrip().rindex("\n") + 1
    path.write_text(text[: start + (text.index("\n", start) - start) // 2])
    before = path.read_bytes()
    detected, rows = read_rows(path)
    assert detected == kind and [step for step, _ in rows] == list(range(1, STEPS))
    named = ("--kl-key", "KL") if kind == "console" else ()  # a loop's own name, else it is offered in a warning
    status, out, err = diagnose(capsys, path, "--fail-on", "collapse", *named)
    # Said, for a finished log written without a final newline (8 of 134 published ones): its last step is unread.
    assert status == 3 and "YES at step" in out and err.count("\n") == 1
    assert "its last line has no newline and is not read" in err
    assert path.read_bytes() == before


def test_a_nan_or_infinite_step_is_skipped_in_every_json_reader(tmp_path, capsys):
    history = [{"step": step, "loss": 0.1, "reward": reward, "completion_length": length}
               for step, length, reward in series("collapsing")]
    history[5]["step"] = float("nan")  # json.dumps writes NaN, as Python's json module reads it back
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"global_step": STEPS, "log_history": history}))
    _, rows = read_rows(path)
    assert [step for step, _ in rows] == [s for s in range(1, STEPS + 1) if s != 6]
    status, out, _ = diagnose(capsys, path, "--fail-on", "collapse")
    assert status == 3 and "YES at step" in out

    jsonl = write_jsonl(tmp_path / "bai.jsonl", "collapsing")
    lines = jsonl.read_text().splitlines(keepends=True)
    lines[5], lines[6] = lines[5].replace('"step": 6', '"step": NaN'), lines[6].replace('"step": 7', '"step": 1e400')
    jsonl.write_text("".join(lines))
    assert [step for step, _ in read_rows(jsonl)[1]] == [s for s in range(1, STEPS + 1) if s not in (6, 7)]


def test_a_csv_cell_over_128_kib_is_read(tmp_path):
    """wandb history exports carry tables and samples as JSON text in a cell; Python's csv refuses > 128 KiB."""
    path = write_wandb_history_csv(tmp_path / "history.csv", "healthy")
    lines = path.read_text().splitlines(keepends=True)
    sample = json.dumps({"rows": [["<think>" + "x" * 300_000 + "</think>", 0.5]]})
    lines[0] = lines[0].rstrip("\r\n") + ",train/samples\r\n"
    lines[1:] = [line.rstrip("\r\n") + ',"' + sample.replace('"', '""') + '"\r\n' for line in lines[1:]]
    path.write_text("".join(lines))
    kind, rows = read_rows(path)
    assert kind == "wandb-csv" and [step for step, _ in rows] == list(range(1, STEPS + 1))
    assert rows[-1][1]["rollout/reward_mean"] == pytest.approx(series("healthy")[-1][2])
    import csv

    assert csv.field_size_limit() == 131072  # put back: the limit is process-wide


OUTPUT_CASES = {  # case: (the --json / --plot arguments, given a folder d, the JSONL RUN and the TensorBoard RUN;
    #                         the error line's phrase)
    "json-is-run": (lambda d, run, tb: ["--json", run], "is one of the inputs"),
    "plot-is-run": (lambda d, run, tb: ["--plot", run], "is one of the inputs"),
    "symlink-to-run": (lambda d, run, tb: ["--plot", _symlink(d / "link.png", run)], "is one of the inputs"),
    "relative-path-to-run": (lambda d, run, tb: ["--json", os.path.relpath(run)], "is one of the inputs"),
    "inside-tensorboard-run": (lambda d, run, tb: ["--json", tb / "verdict.json"], "is inside the input directory"),
    "json-to-directory": (lambda d, run, tb: ["--json", d], "is a directory; give a file path"),
    "plot-to-directory": (lambda d, run, tb: ["--plot", d], "is a directory; give a file path"),
    "missing-directory": (lambda d, run, tb: ["--json", d / "nowhere" / "v.json"], "does not exist"),
    "read-only-place": (lambda d, run, tb: ["--json", "/sys/verdict.json"], "cannot create a file in /sys"),
    # A pipe (as /dev/stdout is): renaming over it would replace the pipe itself. Made here, not /dev/null, which a
    # test must never risk replacing.
    "a-pipe": (lambda d, run, tb: ["--json", _fifo(d / "pipe")], "is not a regular file"),
    "same-json-and-plot": (lambda d, run, tb: ["--json", d / "v.png", "--plot", d / "v.png"],
                           "--json and --plot name the same file"),
    "unknown-figure-format": (lambda d, run, tb: ["--plot", d / "v.txt"],
                              ".txt is not a figure format; end the name with one of .png, .pdf, .svg"),
    "no-figure-suffix": (lambda d, run, tb: ["--plot", d / "v"], "no suffix is not a figure format"),
}


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _contents(paths) -> list:
    return sorted((p, p.read_bytes()) for path in paths for p in ([path] if path.is_file() else path.rglob("*")))


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_outputs_are_refused_before_any_run_is_read_and_no_log_is_ever_written(tmp_path, capsys, case):
    runs = [write_jsonl(tmp_path / "run.jsonl", "collapsing"), write_tensorboard(tmp_path / "tb", "healthy")]
    outputs, message = OUTPUT_CASES[case]
    before = _contents(runs)
    status, out, err = diagnose(capsys, *runs, *outputs(tmp_path, *runs))
    assert status == 1 and out == ""  # refused before the table
    assert err.startswith("openrlhf-bai: error: ") and err.count("\n") == 1 and message in err, err
    assert _contents(runs) == before
    assert not [p for p in tmp_path.rglob(".*")]  # no temp file left


@pytest.mark.parametrize("suffix, magic", [(".pdf", b"%PDF-"), (".svg", b"<?xml"), (".png", b"\x89PNG"),
                                           (".jpg", b"\xff\xd8\xff"), (".PDF", b"%PDF-")])
def test_plot_is_written_in_the_format_of_its_suffix(tmp_path, capsys, suffix, magic):
    run = write_jsonl(tmp_path / "run.jsonl", "collapsing")
    plot = tmp_path / f"verdict{suffix}"
    status, _, _ = diagnose(capsys, run, "--plot", plot)
    assert status == 0 and plot.read_bytes().startswith(magic)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run.jsonl", plot.name])


# Published logs as they are (found reading the corpus runs' original files: tests/data/curves/*/provenance.json).

def test_a_trainer_dict_followed_by_tqdm_redraws_on_its_line_is_read(tmp_path):
    # ningguo-*'s grpo.log: tqdm redraws its bar with \r after the dict, on the same line; reading only the text after
    # the last \r dropped that log and shifted every later step.
    path = write_trl_log(tmp_path / "trl.log")
    lines = path.read_text().splitlines()
    lines[5] += "\r 33%|███▎      | 620/1875 [12:34:10<27:20:09, 78.41s/it]\r" + " " * 20 + "\r"
    lines[6] = " 34%|███▍      | 630/1875 [12:47:12<27:05:10, 78.30s/it]\r" + lines[6]
    path.write_text("\n".join(lines) + "\n")
    kind, rows = read_rows(path)
    assert kind == "trl" and [step for step, _ in rows] == list(range(1, STEPS + 1))
    assert [m["completion_length"] for _, m in rows] == [length for _, length, _ in series("collapsing")]


def test_only_a_training_dict_makes_a_console_log_a_trl_log(tmp_path, capsys):
    # A CS336-style loop prints `histogram: {...}` dicts: not a Trainer's log, so the kind is unknown (one line saying
    # so), not a TRL log without steps.
    path = tmp_path / "loop.log"
    path.write_text("step 1 reward 0.5\nhistogram: {'0': 12, '1': 20}\n")
    status, _, err = diagnose(capsys, path)
    assert status == 1 and "not a training log of a known format" in err and len(err.strip().splitlines()) == 1


def test_stray_nul_bytes_in_a_text_log_are_not_a_binary_file(tmp_path):
    # eric-haibin-lin/verl-data's resp256 log: NCCL ends two lines with a NUL byte.
    path = write_verl_log(tmp_path / "verl.log")
    nccl = "(WorkerDict pid=9) ProcessGroupNCCL created ncclComm_ 0xab8cf20 on CUDA device: \x00\n"
    path.write_text(nccl * 2 + path.read_text())
    kind, rows = read_rows(path)
    assert kind == "verl" and [step for step, _ in rows] == list(range(1, STEPS + 1))


def test_an_event_file_named_otherwise_is_read_as_tensorboard_reads_it(tmp_path):
    # zz1358m-*-8k: events.grpoout.tfevents.<time>.<host>; TensorBoard reads any file whose name holds "tfevents".
    run = write_tensorboard(tmp_path / "tb", "collapsing")
    event_file = next(run.glob("events.out.tfevents.*"))
    renamed = event_file.rename(run / event_file.name.replace("events.out.", "events.grpoout."))
    assert read_rows(renamed) == read_rows(run) == ("tensorboard", read_rows(run)[1])
    assert [step for step, _ in read_rows(run)[1]] == list(range(1, STEPS + 1))


def test_llama_factorys_trainer_log_is_read_by_its_current_steps(tmp_path, capsys):
    # LLaMA-Factory's LogCallback writes trainer_log.jsonl with its step as "current_steps" (PPO logs a reward).
    path = tmp_path / "trainer_log.jsonl"
    path.write_text("".join(json.dumps({"current_steps": step, "total_steps": STEPS, "loss": 0.1, "reward": reward,
                                        "lr": 1e-6, "epoch": step / STEPS, "percentage": 100 * step / STEPS,
                                        "elapsed_time": "0:00:27", "remaining_time": "0:01:35"}) + "\n"
                            for step, _, reward in series("collapsing")))
    kind, rows = read_rows(path)
    assert kind == "jsonl" and [step for step, _ in rows] == list(range(1, STEPS + 1))
    status, out, _ = diagnose(capsys, path, "--fail-on", "hockey")
    assert status == 3 and "YES drop at step" in out


def test_ms_swifts_logging_jsonl_is_read_by_its_global_step_of_max_steps(tmp_path, capsys):
    # ms-swift's GRPO writes logging.jsonl: TRL's names, the step as "global_step/max_steps": "12/500", strings for
    # its progress, an eval line at a step, and a closing summary holding the log_history.
    path = tmp_path / "logging.jsonl"
    lines = [{"loss": 0.01, "completions/mean_length": length, "reward": reward, "kl": 0.001, "epoch": step / STEPS,
              "global_step/max_steps": f"{step}/{STEPS}", "percentage": f"{100 * step / STEPS:.2f}%",
              "elapsed_time": "6s", "memory(GiB)": 15.97} for step, length, reward in series("collapsing")]
    lines.insert(10, {"eval_loss": 0.1, "global_step/max_steps": f"10/{STEPS}", "percentage": "25.00%"})
    lines.append({"last_model_checkpoint": "output/v0/checkpoint-40", "global_step": STEPS, "log_history": [{}]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    kind, rows = read_rows(path)
    assert kind == "jsonl" and [step for step, _ in rows] == list(range(1, STEPS + 1))
    assert rows[9][1]["eval_loss"] == 0.1 and rows[0][1]["completions/mean_length"] == series("collapsing")[0][1]
    status, out, _ = diagnose(capsys, path, "--fail-on", "collapse")
    assert status == 3 and "YES at step" in out


def test_verls_file_logger_jsonl_is_read_with_its_metrics(tmp_path, capsys):
    # verl's FileLogger (verl/utils/tracking.py) writes json.dumps({"step": step, "data": data}) per line.
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "data": {
        "response_length/mean": length, "critic/score/mean": reward, "actor/entropy": 0.5}}) + "\n"
        for step, length, reward in series("collapsing")))
    kind, rows = read_rows(path)
    assert kind == "jsonl" and rows[0][1]["response_length/mean"] == series("collapsing")[0][1]
    status, out, _ = diagnose(capsys, path, "--fail-on", "collapse")
    assert status == 3 and "YES at step" in out


def write_notebook(path: Path, shape: str) -> Path:
    """A notebook saved with the table transformers' notebook callback draws in the training cell (as Unsloth's GRPO
    notebooks draw it, with every logged metric; "/" in a name spaced out), by transformers' own text_to_html_table."""
    from transformers.utils.notebook import text_to_html_table

    table = [["Step", "Training Loss", "reward", "reward_std", "completions / mean_length", "kl"]]
    table += [[step, 0.0, reward, 0.2, length, 0.001 * step] for step, length, reward in series(shape)]
    html = (f"<div><progress value='{STEPS}' max='{STEPS}'></progress> [{STEPS}/{STEPS} 1:40:29, Epoch 0/1]</div>"
            + text_to_html_table(table))
    cells = [{"cell_type": "code", "source": ["trainer.train()"], "outputs": [
        {"output_type": "stream", "name": "stderr", "text": ["==((====))==  Unsloth - 2x faster free finetuning\n"]},
        {"output_type": "display_data", "metadata": {},
         "data": {"text/html": html.splitlines(keepends=True), "text/plain": ["<IPython.core.display.HTML object>"]}}]}]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 0}, indent=1))
    return path


def test_a_notebook_saved_with_its_training_table_is_read(tmp_path, capsys):
    # TRL users train in Colab and share the .ipynb (the corpus's 77 notebook runs were extracted from such tables).
    path = write_notebook(tmp_path / "Qwen2.5_(3B)-GRPO.ipynb", "collapsing")
    kind, rows = read_rows(path)
    assert kind == "notebook" and [step for step, _ in rows] == list(range(1, STEPS + 1))
    assert rows[0][1]["completions/mean_length"] == pytest.approx(series("collapsing")[0][1], abs=1e-6)  # as printed
    assert rows[0][1]["loss"] == 0.0 and rows[-1][1]["kl"] == pytest.approx(0.001 * STEPS)
    status, out, _ = diagnose(capsys, path, "--fail-on", "collapse")
    assert status == 3 and "YES at step" in out

    # The same table pasted into a Markdown file; a notebook saved without outputs is one line saying so.
    pasted = tmp_path / "training_statistics.md"
    pasted.write_text("# Training\n\n" + "".join(json.loads(path.read_text())["cells"][0]["outputs"][1]["data"]
                                                 ["text/html"]))
    assert read_rows(pasted) == ("notebook", rows)
    empty = tmp_path / "empty.ipynb"
    empty.write_text(json.dumps({"cells": [{"cell_type": "code", "source": ["trainer.train()"], "outputs": []}],
                                 "nbformat": 4}))
    status, _, err = diagnose(capsys, empty)
    assert status == 1 and "saved without its outputs" in err and len(err.strip().splitlines()) == 1


def test_a_callbacks_printed_lines_are_read_where_the_notebooks_table_has_the_loss_only(tmp_path, capsys):
    # anirudh-* (batch 32): plain transformers draws Step | Training Loss, while a TrainerCallback printed every
    # metric as "[Step N] name=value" lines (values as '%.4f'): the source that names more metrics is read.
    from transformers.utils.notebook import text_to_html_table

    table = text_to_html_table([["Step", "Training Loss"]] + [[step, 0.0] for step, _, _ in series("collapsing")])
    printed = [f"[Step {step}] loss=0.0000 completions/mean_length={length:.4f} reward={reward:.4f} kl=0.0001\n"
               for step, length, reward in series("collapsing")]
    cells = [{"cell_type": "code", "source": ["trainer.train()"], "outputs": [
        {"output_type": "display_data", "metadata": {}, "data": {"text/html": table.splitlines(keepends=True)}},
        {"output_type": "stream", "name": "stdout", "text": printed}]}]
    path = tmp_path / "grpo_train.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    kind, rows = read_rows(path)
    assert kind == "notebook" and [step for step, _ in rows] == list(range(1, STEPS + 1))
    assert rows[0][1]["completions/mean_length"] == round(series("collapsing")[0][1], 4)
    status, out, _ = diagnose(capsys, path, "--fail-on", "collapse")
    assert status == 3 and "YES at step" in out


def write_console_log(path: Path, shape: str = "collapsing") -> Path:
    """A hand-written GRPO loop's prints (as adv06/WidgetAnchor's grpo_log.txt): lines with the word Step and no
    metrics, then one `GRPO step N/40 | name: value | ...` line a step."""
    path.write_text("".join(
        f"  Step {step}: generating 2 candidates for prompt 1/1...\n  Rewards: [-1.0, 0.5] (1/2 rendered)\n"
        f"GRPO step {step}/{STEPS} | loss: 0.0001 | reward: {reward:.4f} | response_length: {length:.2f} | KL: 0.0001\n"
        for step, length, reward in series(shape)))
    return path


def test_a_hand_written_loops_printed_step_lines_are_read(tmp_path, capsys):
    path = write_console_log(tmp_path / "grpo_log.txt")
    kind, rows = read_rows(path)
    assert kind == "console" and [step for step, _ in rows] == list(range(1, STEPS + 1))
    _, length, reward = series("collapsing")[0]
    assert rows[0][1] == {"loss": 0.0001, "reward": round(reward, 4), "response_length": round(length, 2),
                          "KL": 0.0001}
    status, out, _ = diagnose(capsys, path, "--fail-on", "collapse")
    assert status == 3 and "YES at step" in out
    status, out, _ = diagnose(capsys, write_console_log(tmp_path / "healthy.txt", "healthy"), "--fail-on", "collapse")
    assert status == 0 and "YES" not in out

    # MiniMind's GRPO trainer counts its steps in brackets and names its metrics in words (coicozoi-*'s log).
    minimind = tmp_path / "grpo.log"
    minimind.write_text("".join(
        f"Epoch:[1/1]({step}/9751), Reward: {reward:.4f}, KL_ref: 0.0002, Adv Std: 0.9257, Actor Loss: 0.0000, "
        f"Avg Response Len: {length:.2f}, Learning Rate: 0.00000030\n"
        for step, length, reward in series("collapsing")))
    kind, rows = read_rows(minimind)
    assert kind == "console" and [step for step, _ in rows] == list(range(1, STEPS + 1))
    assert rows[0][1]["Avg Response Len"] == round(series("collapsing")[0][1], 2)
    status, out, _ = diagnose(capsys, minimind, "--length-key", "Avg Response Len", "--reward-key", "Reward",
                              "--fail-on", "collapse")
    assert status == 3 and "YES at step" in out

    # No step lines, each from a real log: one name=value pair (a loss printed with a timing), DeepSpeed's step and
    # throughput lines, a Lightning bar's train_loss_step=1.460 (the step of a loss's integer part): refused.
    other = tmp_path / "train.log"
    other.write_text(
        "[step 1] loss=22.8647 (83.8s)\n[Rank 0] step=10, skipped=0, lr=[1e-06], mom=[(0.9, 0.95)]\n"
        "[2025-04-09 01:47:22,103] [INFO] [timer.py:215:stop] epoch=0/micro_step=10/global_step=10, "
        "RunningAvgSamplesPerSec=0.68, CurrSamplesPerSec=0.98, MemAllocated=5.02GB\n"
        "Epoch 9: 100%|##########| 860/860 [00:05<00:00, 162.25it/s, v_num=1, train_loss_step=1.460, lr=0.00161, "
        "val_loss=0.132]\n")
    status, _, err = diagnose(capsys, other)
    assert status == 1 and "not a training log of a known format" in err and len(err.strip().splitlines()) == 1
    # A verl run that crashed before step 1 (its first line's timestamp holds a comma) and a CleanRL loop's
    # "global step=22528, episodic return=14.8" lines: no CSV header, so no advice to name its step column.
    crashed = tmp_path / "grpo.log"
    crashed.write_text("2025-02-25 19:42:16,238\tINFO worker.py:1841 -- Started a local Ray instance.\n"
                       "(main_task pid=2105103) {'actor_rollout_ref': {'actor': {'clip_ratio': 0.2,\n")
    cleanrl = tmp_path / "output.log"
    cleanrl.write_text("global step=22528, episodic return=14.838737487792969\n" * 2)
    for path in (crashed, cleanrl):
        status, _, err = diagnose(capsys, path)
        assert status == 1 and "not a training log of a known format" in err and "--step-key" not in err

    # nanochat prints its throughput with thousands separators: read whole, as 4883, not 4.
    nanochat = tmp_path / "pretrain.log"
    nanochat.write_text("".join(f"step {step:05d}/00040 ({step * 2.5:.2f}%) | loss: 10.397162 | lrm: 0.01 | "
                                f"dt: 1677.49ms | tok/sec: 4,883 | reward: {reward:.4f} | total: 1,234,567.5\n"
                                for step, _, reward in series("collapsing")))
    kind, rows = read_rows(nanochat)
    assert kind == "console" and rows[0][1] == {"loss": 10.397162, "lrm": 0.01, "tok/sec": 4883.0,
                                                "reward": round(series("collapsing")[0][2], 4), "total": 1234567.5}


def test_a_loops_own_metric_names_are_suggested_for_the_key_options(tmp_path, capsys):
    """A hand-written loop names its metrics its own way (200 times in the corpus a run needs --<signal>-key): the
    names that hold the signal's word are offered, the training level before an evaluation's or a spread's, and
    nothing is read unasked."""
    loop = tmp_path / "train.log"
    loop.write_text("".join(f"step {step} | eval_reward: 0.5 | reward_std: 0.1 | mean_reward: {reward:.4f} | "
                            f"avg_len: {length:.1f} | KL: {0.001 * step:.4f} | lr: 1e-06\n"
                            for step, length, reward in series("collapsing")))
    status, _, err = diagnose(capsys, loop)
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert ("name yours with --length-key / --reward-key; it logs, for --length-key: avg_len; --reward-key: "
            "mean_reward, eval_reward, reward_std; --kl-key: KL)") in err

    status, out, err = diagnose(capsys, loop, "--reward-key", "mean_reward", "--json", tmp_path / "v.json")
    assert status == 0 and "not assessed (no length)" in out
    assert "no length metric (looked for rollout/response_length_mean" in err
    assert "length collapse not assessed; it logs avg_len: pass --length-key NAME to read one as the length" in err
    assert "KL blow-up not assessed; it logs KL: pass --kl-key NAME" in err
    assert "entropy" not in err  # nothing named like it: most runs log no entropy, and are not warned
    assert json.loads((tmp_path / "v.json").read_text())["kl_blowup"]["max_ratio"] is None  # not assessed

    status, out, err = diagnose(capsys, loop, "--reward-key", "mean_reward", "--length-key", "avg_len", "--kl-key",
                                "KL", "--fail-on", "collapse")
    assert status == 3 and "YES at step" in out and err == ""


def test_a_steps_own_lines_of_pairs_are_read_with_it(tmp_path, capsys):
    """DeepSpeed-Chat prints its reward on a line of its own after each step line (dsexamples-*'s original was read
    without it); a loop may print such lines before its step line (junyij-*'s gradient magnitudes). A line printed
    at fewer than half the steps, or holding more than pairs, is not the step's."""
    steps = series("collapsing")
    old = tmp_path / "step3.log"  # DeepSpeed-Chat 2023: step3_rlhf_finetuning/main.py
    old.write_text("[2023-05-01 10:00:00,000] [INFO] [launch.py:229:main] process 1 spawned\n" + "".join(
        f"epoch: 0|step: {step - 1}|ppo_ep: 1|act_loss: 0.2099|cri_loss: 0.1204|unsuper_loss: 0.0\n"
        f"average reward score: {reward}\n{'-' * 85}\n"
        f"|E2E latency=7.99s |Gather latency=0.00s (0.00%) |Generate time=5.26s (65.81%) |CurSamplesPerSec=8.01\n"
        for step, _, reward in steps))
    kind, rows = read_rows(old)
    assert kind == "console" and [step for step, _ in rows] == list(range(STEPS))
    assert [metrics["average reward score"] for _, metrics in rows] == [reward for _, _, reward in steps]
    assert not any("CurSamplesPerSec" in metrics for _, metrics in rows)  # a line of more than pairs
    status, out, _ = diagnose(capsys, old, "--reward-key", "average reward score", "--fail-on", "hockey")
    assert status == 3 and "YES drop at step" in out

    newer = tmp_path / "training.log"  # DeepSpeed-Chat 2024, its throughput lines between, and a 10-step evaluation
    newer.write_text("".join(
        f"Epoch: 0 | Step: {step} | PPO Epoch: 1 | Actor Loss: 0.21 | Critic Loss: 0.12 | Unsupervised Loss: 0.0\n"
        f"End-to-End => Latency: 9.79s, TFLOPs: 3.10, Samples/sec: 6.54, Time/seq 0.15s, Batch Size: 64, "
        f"Total Seq. Length: 512\nTraining   => Latency: 2.52s, TFLOPs: 3.10\n"
        f"Average reward score: {reward} | EMA reward score: 0.1\n"
        + (f"eval reward: {reward}\n" if step % 10 == 0 else "") + "-" * 85 + "\n"
        for step, _, reward in steps))
    kind, rows = read_rows(newer)
    assert rows[0][1] == {"Epoch": 0.0, "PPO Epoch": 1.0, "Actor Loss": 0.21, "Critic Loss": 0.12,
                          "Unsupervised Loss": 0.0, "Average reward score": steps[0][2], "EMA reward score": 0.1}
    assert not any("eval reward" in metrics for _, metrics in rows)  # 4 of 40 steps

    before = tmp_path / "ppo.log"  # printed before the step line: the step after it, where first seen
    before.write_text("".join(
        f"Here is the answer step by step.\nTotal distance: 124 km + 372 km = {step} km\n"
        f"Average LoRA Gradient Magnitude: {length}\nStep: {step} | Loss: 0.0047 | KL: 0.0001\n"
        for step, length, _ in steps))
    kind, rows = read_rows(before)
    assert [metrics["Average LoRA Gradient Magnitude"] for _, metrics in rows] == [n for _, n, _ in steps]
    assert set(rows[-1][1]) == {"Loss", "KL", "Average LoRA Gradient Magnitude"}
    # Printed on both ends: a growing log cut before its next step line, and a reward printed once before training.
    with before.open("a") as log:
        log.write("Average LoRA Gradient Magnitude: 1e-05\n")
    assert read_rows(before)[1] == rows
    old.write_text("average reward score: -2.0\n" + old.read_text())
    assert [metrics["average reward score"] for _, metrics in read_rows(old)[1]] == [reward for _, _, reward in steps]


def test_a_log_of_several_line_formats_is_read_as_the_loops_own_steps(tmp_path, capsys):
    """Real logs hold more than one kind of line (each case below is a corpus original that was misread): the format
    holding more values is read, and of printed step lines the loop's own print (its most frequent form)."""
    steps = series("collapsing")
    # scottbiggs-*: "[dream_cmp] epoch=0 step=N ..." each step, a Trainer-style dict of the epoch's means once an
    # epoch; dsexamples-*: DeepSpeed's throughput line every 10 steps, with a step and two numbers of its own.
    mixed = tmp_path / "current_out.txt"
    mixed.write_text("".join(
        f"[dream_cmp] epoch=0 step={step} avg_entropy=0.2465 avg_reward={reward:.4f} response_length={length:.1f}\n"
        + (f"[dream_cmp] epoch {step // 10} mean metrics: {{'loss': 0.0, 'avg_reward': {reward}}}\n"
           f"[2023-04-18 08:48:36,058] [INFO] [timer.py:199:stop] epoch=0/micro_step={step}/global_step={step}, "
           "RunningAvgSamplesPerSec=86.77, CurrSamplesPerSec=78.88, MemAllocated=10.77GB\n" if step % 10 == 0 else "")
        for step, length, reward in steps))
    # a36600248-*: a pasted shell session, the steps as JSON records with their step after a "[date] WARNING" line,
    # then per-question records of steps 30-41 from another log.
    pasted = tmp_path / "session.txt"
    pasted.write_text(
        "[2026-03-17 09:54:59] WARNING transformers.modeling_utils: Could not estimate the number of tokens\n"
        + "".join(json.dumps({"time": "2026-03-17 09:55:00", "step": step, "logs": {
            "loss": 0.02, "reward": reward, "response_length": length}}) + "\n" for step, length, reward in steps)
        + "".join(json.dumps({"mode": "train", "global_step": step, "question_id": "mbpp_test_422",
                              "node_count": 4, "reward": 1.0}) + "\n" for step in range(30, 42)))
    for path in (mixed, pasted):
        kind, rows = read_rows(path)
        assert (kind, rows.restarts) == ("console", 0) and [step for step, _ in rows] == list(range(1, STEPS + 1))
        assert [metrics["response_length"] for _, metrics in rows] == pytest.approx([x for _, x, _ in steps], abs=0.05)
        status, out, _ = diagnose(capsys, path, "--fail-on", "collapse")
        assert status == 3 and "YES at step" in out

    # JunyiJ/PostTraining-LLM-Small: "Step: N | Loss: ... | KL: ..." each step and "[step N] avg_loss=... acc=..."
    # every few steps, another form naming other metrics at the same steps: both are the loop's print.
    two_forms = tmp_path / "ppo.log"
    two_forms.write_text("".join(
        f"Step: {step} | Loss: 0.0047 | KL: -0.0000 | response_length: {length:.1f}\n"
        + (f"[step {step}] avg_loss=0.0047 acc={reward:.4f}\n" if step % 5 == 0 else "")
        for step, length, reward in steps))
    kind, rows = read_rows(two_forms)
    assert kind == "console" and [step for step, _ in rows] == list(range(1, STEPS + 1))
    assert rows[4][1]["acc"] == round(steps[4][2], 4) and "acc" not in rows[0][1] and rows[4][1]["KL"] == 0
    # The loop resumed from a checkpoint at step 31 (its log appended): the later lines replace steps 31-40, as in
    # every reader.
    two_forms.write_text(two_forms.read_text() + "".join(
        f"Step: {step} | Loss: 0.0047 | KL: -0.0000 | response_length: 99.0\n" + (
            f"[step {step}] avg_loss=0.0047 acc=0.9000\n" if step % 5 == 0 else "") for step in range(31, STEPS + 1)))
    kind, rows = read_rows(two_forms)
    assert rows.restarts == 1 and [step for step, _ in rows] == list(range(1, STEPS + 1))
    assert rows[34][1] == {"Loss": 0.0047, "KL": 0, "response_length": 99.0, "avg_loss": 0.0047, "acc": 0.9}
    assert rows[29][1]["response_length"] == round(steps[29][1], 1)

    # trl-qwen25-05b-grpo-kl-thousands-*: an SFT phase printed "step N/611 loss=... lr=..." (more lines) before the
    # GRPO Trainer's dicts (more values): the dicts are the run.
    sft_then_grpo = tmp_path / "logs.md"
    sft_then_grpo.write_text("".join(f"step {i}/611 loss={2 - i / 1000:.4f} lr=2e-05\n" for i in range(10, 610, 10))
                             + write_trl_log(tmp_path / "trl.log").read_text())
    kind, rows = read_rows(sft_then_grpo)
    assert kind == "trl" and len(rows) == STEPS and rows[0][1]["reward"] == steps[0][2]


def test_a_notebooks_table_is_read_over_printed_lines_unless_it_shows_the_loss_alone(tmp_path):
    # abhilash-*: the Unsloth table (6 decimals) and a callback's printed lines with more names at 4 significant
    # digits and a dict of its own ({'log/serial': 5426, 'step': 5426, ...}): the Trainer's table is the run.
    path = write_notebook(tmp_path / "train grpo.ipynb", "collapsing")
    notebook = json.loads(path.read_text())
    notebook["cells"][0]["outputs"].append({"output_type": "stream", "name": "stdout", "text": [
        f"[Step {step}] reward={reward:.4g} completions/mean_length={length:.4g} kl=0.001 extra_a=1 extra_b=2 "
        "extra_c=3 extra_d=4\n" for step, length, reward in series("collapsing")]
        + ["{'log/serial': 5426, 'step': 5426, 'loss': 0.1, 'reward': 0.2}\n"]})
    path.write_text(json.dumps(notebook))
    kind, rows = read_rows(path)
    assert kind == "notebook" and [step for step, _ in rows] == list(range(1, STEPS + 1))
    assert rows[0][1]["completions/mean_length"] == pytest.approx(series("collapsing")[0][1], abs=1e-6)
    assert "extra_a" not in rows[0][1]
