"""patches/openrlhf-0.11.2-actor-init.patch, applied to OpenRLHF 0.11.2's own release files.

The installed openrlhf package (the wheel's files, checked against the wheel's RECORD hashes) is copied into a
temporary directory and patched there with `git apply`; the patched OpenRLHF then runs in subprocesses with that
directory first on PYTHONPATH, so its CLI and trainer find openrlhf_bai through the entry points openrlhf_bai
really installs (pyproject.toml: groups openrlhf.actor_init and openrlhf.trainer_callbacks). OpenRLHF's own
tests/test_ppo_trainer.py and this project's tests/test_hooks_monitor.py run there too: the monitor on the
trainer-callback API, with nothing wrapped.
"""

import ast
import base64
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_bai.merger import PROVENANCE, merges_dir

PATCH = Path(__file__).resolve().parents[1] / "patches" / "openrlhf-0.11.2-actor-init.patch"
OPENRLHF_CLI = "openrlhf.cli.train_ppo_ray"
# The flash-attn shim has to run before OpenRLHF's first import in each subprocess (no GPU here).
SITECUSTOMIZE = "from openrlhf_bai.integration.flash_attn_cpu import make_flash_attn_importable\n" \
                "make_flash_attn_importable()\n"


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    """The environment for a subprocess that imports the patched OpenRLHF 0.11.2."""
    registered = {(ep.group, ep.name) for ep in importlib.metadata.distribution("openrlhf-bai").entry_points}
    for group in ("openrlhf.actor_init", "openrlhf.trainer_callbacks"):
        assert (group, "bai") in registered, \
            f"openrlhf_bai's installed metadata lacks the {group} entry point: pyproject.toml, then pip install -e ."

    dist = importlib.metadata.distribution("openrlhf")
    assert dist.version == "0.11.2"
    root = tmp_path_factory.mktemp("upstream")
    site, shim = root / "site", root / "shim"
    for file in dist.files:
        if file.parts[0] not in ("openrlhf", "tests") or file.hash is None:  # __pycache__ has no hash
            continue
        data = file.locate().read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.new(file.hash.mode, data).digest()).rstrip(b"=").decode()
        assert digest == file.hash.value, f"{file} differs from the openrlhf 0.11.2 wheel"
        (site / file).parent.mkdir(parents=True, exist_ok=True)
        (site / file).write_bytes(data)
    # The CLI before the patch: the flag is new.
    assert "--actor_init" not in (site / "openrlhf/cli/train_ppo_ray.py").read_text()

    # GIT_CEILING_DIRECTORIES: git apply must patch these files, not look for a repository above them.
    subprocess.run(["git", "apply", "-p1", "--verbose", str(PATCH)], cwd=site, check=True,
                   env={**os.environ, "GIT_CEILING_DIRECTORIES": str(root)})
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = [str(site), str(shim), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONDONTWRITEBYTECODE": "1"}


def run_python(env, *args, cwd=None):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_patched_cli_lists_actor_init_with_the_installed_initializers(patched):
    help_text = run_python(patched, "-m", OPENRLHF_CLI, "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "--actor_init {none,bai}, --actor.init {none,bai}" in help_text.stdout
    # The plugin's own flags, from the initializer's add_arguments, in a group of their own.
    assert "openrlhf-bai (--actor_init bai, stability monitor):" in help_text.stdout
    group = help_text.stdout.split("openrlhf-bai (--actor_init bai, stability monitor):")[1]
    assert "--bai.base" in group and "--bai.alpha" in group and "--bai.merge_only" in group


def test_actor_init_bai_reaches_the_plugin_initializer(patched, llama_family):
    fam = {name: str(path) for name, path in llama_family.items()}
    run = run_python(
        patched, "-m", OPENRLHF_CLI, "--actor.model_name_or_path", fam["sft_reasoning"],
        "--reward.remote_url", "http://localhost:5000/get_reward",
        "--actor_init", "bai", "--bai.base", fam["base"], "--bai.sft", fam["sft_instruct"], fam["sft_reasoning"],
        "--bai.alpha", "0.25", "--bai.merge_only",
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    merged = Path(lines[-1])
    assert lines[-2] == f"openrlhf-bai: actor initialized from {merged} (alpha 0.25)"
    assert merged.parent == merges_dir()  # the launcher's shared merge cache
    recipe = json.loads((merged / PROVENANCE).read_text())["recipe"]
    assert recipe["coefficients"] == pytest.approx([0.25, 0.375, 0.375])
    assert recipe["sft"] == [fam["sft_instruct"], fam["sft_reasoning"]]


def test_actor_init_bai_without_a_base_is_a_one_line_error(patched, llama_family):
    run = run_python(patched, "-m", OPENRLHF_CLI, "--actor.model_name_or_path", str(llama_family["sft_reasoning"]),
                     "--reward.remote_url", "http://localhost:5000/get_reward", "--actor_init", "bai")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "openrlhf-bai: error: --actor_init bai needs --bai.base, the pretrained model the SFT models were trained from"
    )
    assert "Traceback" not in run.stderr


# Drives the patched BasePPOTrainer.save_logs_and_checkpoints as PPOTrainer.fit does, with nothing of the plugin
# set up beforehand: only the trainer-callback entry point connects the two. No checkpoint is saved (no actor group,
# --ckpt.save_steps inf, --bai.on_collapse warn); the save path of the hooks' wrapper is test_hooks_monitor's.
TRAINER_SCRIPT = r"""
import argparse, json, sys
from types import SimpleNamespace

from openrlhf.trainer.ppo_trainer import BasePPOTrainer
from openrlhf.utils.config import hierarchize

root = sys.argv[1]
ckpt = sys.argv[2] if len(sys.argv) > 2 else root + "/ckpt"

args = hierarchize(argparse.Namespace(**{
    "logger.logging_steps": 1, "logger.tensorboard_dir": root + "/tb", "logger.wandb.key": None,
    "logger.wandb.run_name": "run", "ckpt.path": ckpt, "ckpt.save_steps": float("inf"),
    "ckpt.load_enable": False, "ckpt.best_metric_key": "", "algo.kl.target": None, "algo.kl.init_coef": 0.0,
    "algo.kl.horizon": 10000, "algo.advantage.estimator": "reinforce", "algo.dynamic_filtering_enable": False,
    "eval.steps": float("inf"), "train.num_episodes": 1, "rollout.batch_size": 1, "rollout.n_samples_per_prompt": 1,
    "rollout.vllm_generate_batch_size": 1, "vllm.enable_sleep": False,
    "bai.reference_steps": 50, "bai.patience": 2,
}))
trainer = object.__new__(BasePPOTrainer)
BasePPOTrainer.__init__(trainer, SimpleNamespace(args=args), None, None, None, None, None, None)
installed = []
for step in range(1, 13):
    length = 1000.0 + 10 * (step % 2) if step < 7 else 300.0
    logs = {"rollout/response_length_mean": length, "rollout/reward_mean": 0.5 + 0.01 * (step % 3)}
    trainer.save_logs_and_checkpoints(step, logs, {"global_step": step})
    installed.append(getattr(BasePPOTrainer.save_logs_and_checkpoints, "_openrlhf_bai", False))
trainer.tensorboard_logger.close()
print(json.dumps(installed))
"""


def test_trainer_callbacks_run_the_stability_monitor_in_the_patched_trainer(patched, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_python(patched, "-c", TRAINER_SCRIPT, str(tmp_path))
    assert run.returncode == 0, run.stderr
    # The entry point ran the monitor at every step; OpenRLHF's method was never wrapped.
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [False] * 12

    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "bai_diagnostics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 13))  # the monitor ran once per step, never twice
    collapse = [row["step"] for row in rows if row.get("bai/length_collapse") == 1.0]
    assert collapse and collapse[0] > 7  # the drop starts at step 7; patience 2

    # The warning, once, through OpenRLHF's logger (stdout).
    assert run.stdout.count("[openrlhf-bai] step") == 1
    assert f"[openrlhf-bai] step {collapse[0]}: sequence length collapse" in run.stdout

    # The bai/* metrics went through OpenRLHF's TensorBoard logger.
    accumulator = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"scalars": 0})
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("train/bai/length_collapse")}
    assert sorted(logged) == list(range(1, 13)) and logged[collapse[0]] == 1.0  # judged from the first step


def test_openrlhf_trainer_tests_pass_on_the_patched_files(patched, run_pytest):
    """OpenRLHF's own tests/test_ppo_trainer.py, with the tests the pull request adds (OpenRLHF's mocking style, so
    the trainer modules import without Ray), run on the patched files with openrlhf_bai installed."""
    site = patched["PYTHONPATH"].split(os.pathsep)[0]
    run, results = run_pytest(patched, "tests/test_ppo_trainer.py", cwd=site)
    assert run.returncode == 0, run.stdout + run.stderr
    assert {outcome for outcome, _ in results.values()} == {"passed"}
    release = importlib.metadata.distribution("openrlhf").locate_file("tests/test_ppo_trainer.py").read_text()
    ran = {name.split("[")[0] for name in results}
    assert ran == defined_tests(release) | {
        "test_trainer_callbacks_load_once_and_see_each_step_before_logging_and_checkpointing",
        "test_sync_fit_ends_after_the_step_a_callback_stops",
        "test_async_fit_ends_generator_and_trainer_after_the_step_a_callback_stops",
    }


def defined_tests(source: str) -> set:
    return {node.name for node in ast.parse(source).body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_the_monitor_tests_pass_on_the_patched_files_through_the_callback_api(patched, run_pytest):
    """tests/test_hooks_monitor.py, every test (metrics, save, stop in PPOTrainer.fit and in the async trainer,
    resume, never harming the step, alerts), on the patched files: the monitor is an ordinary trainer callback there."""
    monitor_tests = Path(__file__).with_name("test_hooks_monitor.py")
    run, results = run_pytest(patched, str(monitor_tests))
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    assert {outcome for outcome, _ in results.values()} == {"passed"}
    assert {name.split("[")[0] for name in results} == defined_tests(monitor_tests.read_text())
    properties = results["test_the_monitor_takes_openrlhfs_callback_api_where_it_has_one_and_wraps_nothing"][1]
    site = patched["PYTHONPATH"].split(os.pathsep)[0]
    assert properties == {"callback_path": "api", "openrlhf": f"0.11.2 {os.path.join(site, 'openrlhf')}"}


def test_a_failing_monitor_in_the_patched_trainer_is_logged_once_and_training_goes_on(patched, tmp_path):
    """The entry point's call at every step is guarded: a ckpt.path below a regular file
    (the JSONL row cannot be written) ends nothing; each step's metrics are logged and the failures counted."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "a-file").write_text("")
    run = run_python(patched, "-c", TRAINER_SCRIPT, str(tmp_path), str(tmp_path / "a-file" / "ckpt"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("[openrlhf-bai] stability_monitor failed: NotADirectoryError") == 1
    accumulator = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"scalars": 0})
    accumulator.Reload()
    errors = {e.step: e.value for e in accumulator.Scalars("train/bai/monitor_errors")}
    assert errors == {step: float(step) for step in range(1, 13)}
    # from the first step on
    assert sorted(e.step for e in accumulator.Scalars("train/bai/length_collapse")) == list(range(1, 13))
