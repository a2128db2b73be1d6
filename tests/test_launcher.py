"""The launcher: argument split and rewrite, the cached merge, pass-through, and the launch into OpenRLHF 0.11.2's
own train_ppo_ray (its parser and checks run on the rewritten arguments)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from openrlhf_bai.cli.main import main as dispatcher
from openrlhf_bai.cli.train_ppo_ray import main
from openrlhf_bai.errors import BAIError
from openrlhf_bai.integration import launcher
from openrlhf_bai.integration.worker import SETUP_HOOK
from openrlhf_bai.integration.monitor import CONFIG_ENV
from openrlhf_bai.merger import PROVENANCE, merges_dir


def recipe_flags(fam, *extra):
    return ["--bai.base", str(fam["base"]), "--bai.sft", str(fam["sft_instruct"]), str(fam["sft_reasoning"]), *extra]


def shell_words(line: str) -> list[str]:
    """The words bash makes of a command line."""
    run = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, text=True, check=True)
    return run.stdout.split("\0")[:-1]


def command_of(capsys) -> list[str]:
    """The OpenRLHF command merge_only prints as its last stdout line, split as bash splits it."""
    return shell_words(capsys.readouterr().out.strip().splitlines()[-1])


def file_states(directory: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_merge_only_with_dotted_flags_rewrites_the_actor_and_passes_everything_else(llama_family, capsys):
    sft = str(llama_family["sft_reasoning"])
    openrlhf = ["--actor.model_name_or_path", sft, f"--critic.model_name_or_path={sft}", "--reward.clip_range", "-10",
                "10", "--data.input_template", "User: {}\nAssistant:", "--ckpt.path", "/ckpt",
                "--logger.tensorboard_dir", "tb"]
    assert main([*openrlhf[:3], "--actor_init", "bai", *recipe_flags(llama_family, "--bai.alpha", "0.25"),
                 *openrlhf[3:], "--bai.merge_only", "--bai.on_collapse", "stop"]) == 0
    command = command_of(capsys)
    merged = command[command.index("--actor.model_name_or_path") + 1]
    assert command[:3] == [sys.executable, "-m", "openrlhf.cli.train_ppo_ray"]
    assert command[3:] == ["--actor.model_name_or_path", merged, "--critic.model_name_or_path", merged, *openrlhf[3:],
                           "--actor.entropy_coef", "0"]  # --bai.entropy on (default): OpenRLHF logs entropy_loss
    assert Path(merged).parent == merges_dir()
    recipe = json.loads((Path(merged) / PROVENANCE).read_text())["recipe"]
    assert recipe["coefficients"] == pytest.approx([0.25, 0.375, 0.375])
    assert recipe["sft"] == [str(llama_family["sft_instruct"]), sft]


def test_merge_only_with_the_flags_of_earlier_releases_and_the_dotted_actor_init(llama_family, tmp_path, capsys):
    sft = str(llama_family["sft_reasoning"])
    out = tmp_path / "actor"
    openrlhf = [f"--pretrain={sft}", "--critic_pretrain", sft, "--reward_pretrain", sft, "--save_path", "/out",
                "--use_tensorboard", "tb"]
    assert main(["--actor.init", "bai", "--bai.base", str(llama_family["base"]), "--bai.output_dir", str(out),
                 *openrlhf, "--bai.merge_only"]) == 0
    # --bai.sft defaults to the actor path: a one-SFT recipe, alpha*base + (1-alpha)*actor.
    assert command_of(capsys)[3:] == ["--pretrain", str(out), "--critic_pretrain", str(out), *openrlhf[3:],
                                      "--actor.entropy_coef", "0"]  # the installed OpenRLHF's (0.11) flag
    recipe = json.loads((out / PROVENANCE).read_text())["recipe"]
    assert recipe["sft"] == [sft] and recipe["coefficients"] == pytest.approx([0.5, 0.5])


def test_a_repeat_run_reuses_the_cached_merge_untouched(llama_family, capsys):
    args = ["--actor.model_name_or_path", "x", "--actor_init", "bai", *recipe_flags(llama_family, "--bai.alpha", "0.7"),
            "--bai.merge_only"]
    main(args)
    merged = Path(command_of(capsys)[4])
    before = file_states(merged)
    main(args)
    assert Path(command_of(capsys)[4]) == merged
    assert file_states(merged) == before and len(before) >= 4  # config, weights, tokenizer, provenance


def test_actor_init_none_changes_nothing(llama_family, capsys):
    cache = merges_dir()
    before = sorted(cache.iterdir()) if cache.exists() else []
    openrlhf = [f"--pretrain={llama_family['sft_reasoning']}", "--actor.model_name_or_path", "a b", "--flag", "-1"]
    assert main([*openrlhf, "--bai.stability", "off", "--bai.merge_only"]) == 0
    assert command_of(capsys)[3:] == openrlhf
    assert (sorted(cache.iterdir()) if cache.exists() else []) == before


def test_init_actor_on_openrlhfs_hierarchized_args(llama_family, tmp_path):
    """The path a patched OpenRLHF parser takes: add_bai_arguments on its parser, hierarchize, init_actor."""
    import argparse

    from openrlhf.utils.config import hierarchize

    parser = argparse.ArgumentParser()
    parser.add_argument("--actor.model_name_or_path")
    parser.add_argument("--critic.model_name_or_path")
    launcher.add_bai_arguments(parser)
    sft = str(llama_family["sft_reasoning"])
    args = hierarchize(parser.parse_args([
        "--actor.model_name_or_path", sft, "--critic.model_name_or_path", sft, "--actor.init", "bai",
        "--bai.base", str(llama_family["base"]), "--bai.output_dir", str(tmp_path / "m"), "--bai.patience", "4",
        "--bai.strict_callbacks", "--bai.alert_url", "https://hooks.slack.com/services/T0/B0/X",
    ]))
    launcher.init_actor(args)
    assert args.actor.model_name_or_path == args.critic.model_name_or_path == str(tmp_path / "m")
    assert json.loads((tmp_path / "m" / PROVENANCE).read_text())["recipe"]["sft"] == [sft]
    assert args.bai.patience == 4 and args.bai.on_collapse == "warn"  # what the monitor reads from trainer.args.bai
    assert (args.bai.strict_callbacks is True and args.bai.alert_url.startswith("https://")
            and args.bai.alert_timeout == 2)


@pytest.mark.parametrize("argv, message", [
    (["--actor_init", "bai", "--actor.model_name_or_path", "m"], "needs --bai.base"),
    (["--bai.base", "b", "--bai.sft", "s"], "--bai.base --bai.sft given without --actor_init bai"),
    (["--bai.collapse_ratio", "1.5"], "--bai.collapse_ratio must be in (0, 1)"),
    (["--bai.patience", "0"], "--bai.patience must be an integer >= 1"),
    (["--bai.warmup_steps", "-1"], "--bai.warmup_steps must be an integer >= 0"),
    (["--bai.entropy_ratio_units", "-1"], "--bai.entropy_ratio_units must be >= 0"),
    (["--bai.alert_url", "hooks.slack.com/services/T0/B0/X"], "--bai.alert_url must be an http:// or https:// URL"),
    (["--bai.alert_timeout", "0"], "--bai.alert_timeout must be in (0, 60] seconds"),
    (["--actor_init", "bai", "--bai.base", "b", "--pretrain", "a", "--actor.model_name_or_path", "a"], "use one"),
    (["--actor_init", "bai", "--bai.base", "b", "--bai.sft", "s1", "s2", "--bai.sft_weights", "1"], "2 SFT models"),
    (["--actor_init", "bai", "--bai.base", "/no/such/base", "--bai.sft", "/no/such/sft"], "checkpoint not found"),
])
def test_bad_input_is_one_line_on_stderr(argv, message, capsys):
    assert dispatcher(["train-ppo", *argv, "--bai.merge_only"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("openrlhf-bai: error: ") and message in err and err.count("\n") == 1


def test_python_m_launcher_prints_the_command_last(llama_family, tmp_path):
    sft = str(llama_family["sft_reasoning"])
    run = subprocess.run(
        [sys.executable, "-m", "openrlhf_bai.cli.train_ppo_ray", "--actor_init", "bai", *recipe_flags(llama_family),
         "--actor.model_name_or_path", sft, "--bai.output_dir", str(tmp_path / "m"), "--bai.merge_only"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    command = shell_words(run.stdout.strip().splitlines()[-1])
    assert command[3:] == ["--actor.model_name_or_path", str(tmp_path / "m"), "--actor.entropy_coef", "0"]
    assert not any(arg.startswith(("--bai", "--actor_init", "--actor.init")) for arg in command)


def test_driver_runtime_env_joins_a_submitted_jobs_env(monkeypatch):
    """Under `ray job submit` Ray merges the job's runtime_env with ray.init's and refuses repeated keys."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    bai = SimpleNamespace(stability="on", on_collapse="save")
    job = {"env_vars": {"NCCL_DEBUG": "INFO", "A": "1"}, "working_dir": "/code"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job, "metadata": {}}))
    monkeypatch.setenv("NCCL_DEBUG", "INFO")  # the job's env_vars are the driver's environment too
    monkeypatch.delenv("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", raising=False)
    ours = launcher.driver_runtime_env(bai)
    merged = _merge_runtime_env(job, ours)  # what ray.init does with them; None on a conflict
    assert merged is not None and merged["worker_process_setup_hook"] == SETUP_HOOK
    assert (merged["env_vars"]["NCCL_DEBUG"] == "INFO"
            and merged["env_vars"]["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] == "1")
    assert json.loads(merged["env_vars"][CONFIG_ENV])["on_collapse"] == "save"

    job["worker_process_setup_hook"] = "users.hook"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job}))
    with pytest.raises(BAIError, match="Ray takes one"):
        launcher.driver_runtime_env(bai)


def test_launch_starts_ray_with_the_hooks_then_runs_openrlhfs_own_cli(llama_family, monkeypatch):
    """Not merge_only: Ray is started with OpenRLHF's env_vars, the monitor's settings and the setup hook, then
    OpenRLHF's train_ppo_ray runs as __main__ on the rewritten arguments. Its parser accepts them all, and its own
    last check (too few sample batches for 8 actor GPUs) stops it before any GPU is asked for."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    sft = str(llama_family["sft_reasoning"])
    argv_before = list(sys.argv)
    try:
        with pytest.raises(AssertionError, match="number of sample batches must be greater"):
            main(["--actor.model_name_or_path", sft, "--actor_init", "bai", *recipe_flags(llama_family),
                  "--reward.model_name_or_path", sft, "--bai.noise_units", "4", "--rollout.batch_size", "1",
                  "--rollout.micro_batch_size", "8", "--actor.num_gpus_per_node", "8",
                  "--bai.alert_url", "http://127.0.0.1:9/hook", "--bai.alert_timeout", "1", "--bai.strict_callbacks"])
        env_vars = ray.get_runtime_context().runtime_env["env_vars"]
        assert env_vars["NCCL_DEBUG"] == "INFO" and env_vars["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] == "1"
        monitor = json.loads(env_vars[CONFIG_ENV])
        assert monitor["noise_units"] == 4 and monitor["strict_callbacks"] is True
        assert monitor["alert_url"] == "http://127.0.0.1:9/hook" and monitor["alert_timeout"] == 1
        assert SETUP_HOOK in env_vars.values()  # Ray keeps a module-path setup hook as an env var
        assert sys.argv == argv_before
    finally:
        ray.shutdown()


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "scripts"


@pytest.fixture(scope="module")
def openrlhf_flags():
    """Every option of OpenRLHF 0.11.2's own train_ppo_ray parser, as its --help lists them."""
    import contextlib
    import io
    import re
    import runpy

    argv, sys.argv = sys.argv, ["train_ppo_ray", "--help"]
    help_text = io.StringIO()
    try:
        with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
            runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    finally:
        sys.argv = argv
    return set(re.findall(r"--[\w.]+", help_text.getvalue()))


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.sh")))
def test_example_scripts_merge_and_hand_openrlhf_only_its_own_flags(script, llama_family, tmp_path, openrlhf_flags):
    env = {**os.environ, "BASE": str(llama_family["base"]), "SFT_INSTRUCT": str(llama_family["sft_instruct"]),
           "SFT_REASONING": str(llama_family["sft_reasoning"]), "SAVE_PATH": str(tmp_path / "exp"), "LAUNCH": "",
           "PYTHON": sys.executable, "OPENRLHF_BAI_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(["bash", str(EXAMPLES / script), "--bai.merge_only"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    command = shell_words(run.stdout.strip().splitlines()[-1])
    assert {arg for arg in command[3:] if arg.startswith("--")} <= openrlhf_flags
    merged = Path(command[command.index("--actor.model_name_or_path") + 1])
    assert merged.parent == tmp_path / "cache" / "merged"
    assert json.loads((merged / PROVENANCE).read_text())["recipe"]["coefficients"] == pytest.approx([0.5, 0.25, 0.25])


def test_merge_options_reach_the_merge_and_its_hash_but_threads_do_not(llama_family, tmp_path, capsys):
    """--bai.config_from / --bai.tokenizer_from / --bai.vocab_mismatch change the output, so its cache directory;
    --bai.threads changes neither."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    f = llama_family
    base_args = ["--actor.model_name_or_path", "x", "--actor_init", "bai", *recipe_flags(f), "--bai.merge_only"]
    main(base_args)
    default = Path(command_of(capsys)[4])
    before = file_states(default)
    main([*base_args, "--bai.threads", "1"])
    assert Path(command_of(capsys)[4]) == default and file_states(default) == before

    main([*base_args, "--bai.config_from", str(f["sft_reasoning"]), "--bai.tokenizer_from", str(f["base"])])
    chosen = Path(command_of(capsys)[4])
    assert chosen != default
    recipe = json.loads((chosen / PROVENANCE).read_text())["recipe"]
    assert (recipe["config_from"], recipe["tokenizer_from"]) == (str(f["sft_reasoning"]), str(f["base"]))

    # An SFT model that added 8 tokens: refused by default, merged with --bai.vocab_mismatch renormalize.
    grown = tmp_path / "sft_grown"
    shutil.copytree(f["sft_reasoning"], grown)
    sd = load_file(str(grown / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[name] = torch.cat([sd[name], torch.zeros(8, sd[name].shape[1], dtype=sd[name].dtype)])
    save_file(sd, str(grown / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((grown / "config.json").read_text())
    config["vocab_size"] += 8
    (grown / "config.json").write_text(json.dumps(config))
    grown_args = ["--actor_init", "bai", "--bai.base", str(f["base"]), "--bai.sft", str(f["sft_instruct"]), str(grown),
                  "--bai.config_from", str(grown), "--bai.merge_only"]
    assert dispatcher(["train-ppo", *grown_args]) == 1
    assert "--bai.vocab_mismatch" in capsys.readouterr().err
    main([*grown_args, "--bai.vocab_mismatch", "renormalize"])
    merged = Path(command_of(capsys)[4])
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == config["vocab_size"]


def help_flags(argv) -> set[str]:
    """The flags a command's --help lists, as a user reads them."""
    import re

    run = subprocess.run([sys.executable, "-m", "openrlhf_bai.cli.main", *argv, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return set(re.findall(r"--[\w.-]+", run.stdout))


def test_every_recipe_option_exists_in_merge_probe_and_the_launcher_under_both_spellings():
    import dataclasses

    from openrlhf_bai.recipe import RECIPE_FLAGS, BAIRecipe

    assert set(RECIPE_FLAGS) == {f.name for f in dataclasses.fields(BAIRecipe)} - {"extra"}
    merge, probe, train = help_flags(["merge"]), help_flags(["probe"]), help_flags(["train-ppo"])
    for name in RECIPE_FLAGS:
        cli_spelling, bai_spelling = "--" + name.replace("_", "-"), f"--bai.{name}"
        assert cli_spelling in merge and bai_spelling in train, name
        assert cli_spelling in probe or (name == "alpha" and "--alphas" in probe), name
    assert {"--normalize", "--max-shard-size"} <= merge and {"--bai.normalize", "--bai.max_shard_size"} <= train


def test_normalize_is_a_launcher_flag_and_its_hint_names_it(llama_family, capsys):
    args = ["--actor.model_name_or_path", "x", "--actor_init", "bai", *recipe_flags(llama_family),
            "--bai.sft_weights", "2", "1", "--bai.merge_only"]
    assert dispatcher(["train-ppo", *args]) == 1
    err = capsys.readouterr().err
    assert err == ("openrlhf-bai: error: SFT weights sum to 3, not 1; pass --normalize (launcher: --bai.normalize) "
                   "to rescale them\n")
    assert main([*args, "--bai.normalize"]) == 0
    merged = Path(command_of(capsys)[4])
    recipe = json.loads((merged / PROVENANCE).read_text())["recipe"]
    assert recipe["coefficients"] == pytest.approx([0.5, 1 / 3, 1 / 6])


@pytest.mark.parametrize("typo, closest", [
    (["--bai.alpah", "0.1"], "--bai.alpha"),
    (["--bai.merge-only"], "--bai.merge_only"),
    (["--bai.sft_weight", "1"], "--bai.sft_weights"),
    (["--bai.normalise"], "--bai.normalize"),
    (["--bai.max-shard-size=1GB"], "--bai.max_shard_size"),
])
def test_an_unknown_bai_flag_is_refused_naming_the_closest_before_anything_runs(typo, closest, llama_family,
                                                                               tmp_path):
    """Through the real launcher CLI: nothing merged (the cache stays empty), no Ray, one line, non-zero exit."""
    cache = tmp_path / "cache"
    env = {**os.environ, "OPENRLHF_BAI_CACHE": str(cache)}
    for merge_only in (["--bai.merge_only"], []):
        run = subprocess.run(
            [sys.executable, "-m", "openrlhf_bai.cli.train_ppo_ray", "--actor.model_name_or_path",
             str(llama_family["sft_reasoning"]), "--actor_init", "bai", *recipe_flags(llama_family), *typo,
             *merge_only], capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 1 and run.stdout == ""
        flag = typo[0].split("=")[0]
        assert run.stderr.strip().splitlines() == [f"openrlhf-bai: error: unknown flag {flag}; did you mean {closest}?"]
        assert not cache.exists()


def test_a_renamed_bai_flag_is_refused_naming_its_replacement(capsys):
    import ray

    assert dispatcher(["train-ppo", "--pretrain", "m", "--bai.hockey_drawdown", "4.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("openrlhf-bai: error: --bai.hockey_drawdown was removed in 0.3: use --bai.noise_units (")
    assert err.count("\n") == 1
    assert not ray.is_initialized()


def test_recipe_flags_without_actor_init_bai_are_refused(capsys):
    assert dispatcher(["train-ppo", "--pretrain", "m", "--bai.normalize", "--bai.max_shard_size", "1GB"]) == 1
    assert capsys.readouterr().err == ("openrlhf-bai: error: --bai.normalize --bai.max_shard_size given without "
                                       "--actor_init bai; add --actor_init bai to merge\n")
