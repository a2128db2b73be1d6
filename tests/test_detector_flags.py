"""The detectors' flags as a user meets them: entropy logged by default in OpenRLHF commands, thresholds of an older
release refused naming their replacement (launcher, monitor settings, diagnose), strength in `diagnose --json`."""

import json
import sys
from pathlib import Path

import pytest

from openrlhf_bai.cli.main import main as cli
from openrlhf_bai.diagnostics.detectors import RENAMED
from openrlhf_bai.errors import BAIError
from openrlhf_bai.integration.launcher import run as launch
from openrlhf_bai.integration.monitor import check_config


def command_of(capsys):
    import shlex

    return shlex.split(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("given, expected", [
    ([], ["--actor.entropy_coef", "0"]),  # added: OpenRLHF 0.11 computes and logs entropy_loss, the loss unchanged
    (["--bai.entropy", "off"], []),  # the command untouched
    (["--bai.stability", "off"], []),  # nothing would read it
])
def test_the_launcher_makes_openrlhf_log_entropy_unless_told_not_to(capsys, given, expected):
    assert launch(["--actor.model_name_or_path", "m", "--ckpt.path", "/c", *given, "--bai.merge_only"]) == 0
    assert command_of(capsys)[3:] == ["--actor.model_name_or_path", "m", "--ckpt.path", "/c", *expected]


@pytest.mark.parametrize("flag", [["--actor.entropy_coef", "0.01"], ["--actor.entropy_coef=0.001"]])
def test_an_entropy_coef_the_user_set_is_kept(capsys, flag):
    assert launch(["--actor.model_name_or_path", "m", *flag, "--bai.merge_only"]) == 0
    assert command_of(capsys)[3:] == ["--actor.model_name_or_path", "m", *flag]


def test_openrlhf_logs_entropy_loss_with_coef_0_and_leaves_the_loss_alone():
    """What the default relies on, in the installed OpenRLHF: the flag's name, None by default, 0 logs only."""
    import inspect

    from openrlhf.cli import train_ppo_ray
    from openrlhf.trainer.ray import ppo_actor

    parser_source = inspect.getsource(train_ppo_ray)
    assert '"--actor.entropy_coef"' in parser_source
    actor_source = inspect.getsource(ppo_actor)
    assert "return_entropy=self.args.actor.entropy_coef is not None" in actor_source
    assert "if self.args.actor.entropy_coef != 0:" in actor_source
    assert 'metrics["entropy_loss"] = entropy_loss.detach()' in actor_source


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_a_renamed_threshold_is_refused_in_one_line_naming_its_replacement(old, capsys):
    new = RENAMED[old][0]
    with pytest.raises(BAIError, match=rf"^--bai\.{old} was removed in 0\.3: use --bai\.{new} "):
        launch([f"--bai.{old}", "1", "--bai.merge_only"])
    with pytest.raises(BAIError, match=rf"^--bai\.{old} was removed"):
        check_config({"stability": "on", "on_collapse": "warn", "strict_callbacks": False, "alert_url": None,
                      "alert_timeout": 2.0, old: 1.0})  # $OPENRLHF_BAI_MONITOR written by an older launcher
    dashed = old.replace("_", "-")
    with pytest.raises(SystemExit) as exit_:
        cli(["diagnose", "x.csv", f"--{dashed}", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert f"--{dashed} was removed in 0.3: use --{new.replace('_', '-')}" in err[0]


def test_diagnose_json_keeps_its_fields_and_adds_strength(tmp_path, capsys):
    path = tmp_path / "run.csv"
    rows = [(s, 1000.0 if s < 30 else 200.0, 0.5 + 0.01 * (s % 3)) for s in range(1, 61)]
    path.write_text("step,response_length/mean,critic/score/mean\n" + "".join(f"{s},{n},{r}\n" for s, n, r in rows))
    assert cli(["diagnose", str(path), "--json", str(tmp_path / "v.json"), "--fail-on", "collapse"]) == 3
    v = json.loads((tmp_path / "v.json").read_text())
    for key in ("detected", "step", "min_ratio"):  # 0.2's fields
        assert key in v["length_collapse"]
    for key in ("detected", "drop_step", "depth", "recovery_steps"):
        assert key in v["hockey_stick"]
    collapse = v["length_collapse"]
    assert collapse["detected"] and 30 <= collapse["step"] <= 34
    assert collapse["strength"] > 0 and collapse["max_strength"] >= collapse["strength"]
    assert collapse["sustained_step"] >= collapse["step"] and collapse["reference"] == pytest.approx(1000.0)
    assert "strength" in capsys.readouterr().out  # the table says how strong, and whether it was sustained


def test_the_monitor_takes_the_runs_length_cap_from_openrlhfs_args(tmp_path, monkeypatch):
    """--rollout.max_new_tokens is the cap the truncation rule needs: with it, a length drop the truncated share
    explains is a truncation drop; without it (and no max-length metric logged), the same drop is a collapse."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the trainer helpers of test_hooks_monitor
    from test_hooks_monitor import drive, make_trainer, openrlhf_args, tensorboard_scalars

    from openrlhf_bai.integration import hooks, worker
    from openrlhf_bai.integration.monitor import CONFIG_ENV

    monkeypatch.delenv(CONFIG_ENV, raising=False)
    worker.install_hooks()
    try:
        rows = []
        for step in range(1, 41):  # half the responses cut at 8192 tokens, then 2 %; the others keep ~3000
            share = 0.5 if step < 20 else 0.02
            rows.append({"rollout/response_length_mean": share * 8192 + (1 - share) * 3000 * (1 + 0.02 * (step % 3)),
                         "rollout/truncated_rate": share, "rollout/reward_mean": 0.5, "policy_loss": 0.01})
        found = {}
        for name, cap in (("with-cap", 8192), ("without-cap", None)):
            args = openrlhf_args(tmp_path, run_name=name, **{"rollout.max_new_tokens": cap})
            drive(make_trainer(args), rows)
            tb = tensorboard_scalars(args)
            found[name] = {key: max(tb[f"train/bai/{key}"].values()) for key in ("truncation_drop", "length_collapse")}
        assert found == {"with-cap": {"truncation_drop": 1.0, "length_collapse": 0.0},
                         "without-cap": {"truncation_drop": 0.0, "length_collapse": 1.0}}
    finally:
        del hooks.CALLBACKS[1:]
