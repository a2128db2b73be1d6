"""The OpenRLHF releases teams run (hooks.TESTED_OPENRLHF: 0.10.4, 0.11.0, 0.11.1, 0.11.2): the stability monitor
(metrics, save, stop, resume) and `--bai.merge_only` on each; an older release gets one clear line.

scripts/openrlhf-versions.sh installs each release's wheel alone (its own files only; it runs on the pinned stack)
into ~/.cache/openrlhf-bai/openrlhf-<version>, from PyPI the first time; a subprocess puts that folder first on
PYTHONPATH. The wheels differ only in OpenRLHF's files (unzip and diff); where the monitor meets them:
- PPOTrainer.fit: 0.10.4 leaves its loop on is_exhausted before looking at the batch, 0.11.0 on an empty exhausted
  batch (the backport's stop returns exactly that batch);
- the checkpoint's client_states: 0.11.2 adds latest_eval_metric_value, and restores it;
- the CLI: 0.10.2 brought the nested flags (--actor.model_name_or_path, args.ckpt.path) that 0.10.0 lacks.
The venv's own 0.11.2 runs the whole of tests/test_hooks_monitor.py directly.
"""

import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_bai.integration.hooks import TESTED_OPENRLHF
from openrlhf_bai.merger import PROVENANCE

ROOT = Path(__file__).resolve().parents[1]
OLDER = "0.10.0"  # flat args, --pretrain: the monitor cannot read them
INSTALLED = importlib.metadata.version("openrlhf")
MONITOR_TESTS = (  # in tests/test_hooks_monitor.py
    "test_the_monitor_takes_openrlhfs_callback_api_where_it_has_one_and_wraps_nothing",
    "test_collapse_and_hockey_stick_reach_tensorboard_and_jsonl",  # metrics, through OpenRLHF's TensorBoard logger
    "test_resumed_run_keeps_its_baseline_through_client_states",  # resume
    "test_monitor_in_ray_workers_hooked_only_by_the_runtime_env",  # save (on_collapse save and stop), in Ray workers
    "test_on_collapse_stop_ends_ppotrainer_fit_cleanly",  # stop, in the release's PPOTrainer.fit
    "test_on_collapse_stop_ends_the_async_trainer_and_its_generator_cleanly",  # stop, in its async trainer
)


@pytest.fixture(scope="module")
def releases():
    """{version: folder holding that release's openrlhf package}, by the script `make test` runs."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "openrlhf-versions.sh"), *TESTED_OPENRLHF, OLDER],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    folders = [Path(line) for line in done.stdout.split()]
    return dict(zip([*TESTED_OPENRLHF, OLDER], folders))


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """A sitecustomize that makes flash-attn importable on CPU before OpenRLHF's first import (no GPU here)."""
    folder = tmp_path_factory.mktemp("shim")
    (folder / "sitecustomize.py").write_text("from openrlhf_bai.integration.flash_attn_cpu import "
                                             "make_flash_attn_importable\nmake_flash_attn_importable()\n")
    return folder


def environment(release: Path, shim: Path) -> dict:
    path = [str(release), str(shim), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONDONTWRITEBYTECODE": "1"}


def test_the_venv_runs_a_tested_release_the_others_run_below():
    assert INSTALLED in TESTED_OPENRLHF  # tests/test_hooks_monitor.py runs on it directly


@pytest.mark.parametrize("version", [v for v in TESTED_OPENRLHF if v != INSTALLED])
def test_the_monitor_saves_stops_and_resumes_on_openrlhf(version, releases, shim, run_pytest):
    run, results = run_pytest(environment(releases[version], shim),
                              *[f"tests/test_hooks_monitor.py::{name}" for name in MONITOR_TESTS])
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    assert {name: outcome for name, (outcome, _) in results.items()} == {name: "passed" for name in MONITOR_TESTS}
    # That release's files, without the callback API: the backport's wrappers.
    assert results[MONITOR_TESTS[0]][1] == {"callback_path": "backport",
                                            "openrlhf": f"{version} {releases[version] / 'openrlhf'}"}


@pytest.mark.parametrize("version", [*TESTED_OPENRLHF, OLDER])
def test_merge_only_prints_a_command_that_openrlhfs_own_cli_takes(version, releases, shim, llama_family):
    env = environment(releases[version], shim)
    fam = {name: str(path) for name, path in llama_family.items()}
    run = subprocess.run(
        [sys.executable, "-m", "openrlhf_bai.cli.main", "train-ppo", "--actor_init", "bai", "--bai.base", fam["base"],
         "--bai.sft", fam["sft_instruct"], fam["sft_reasoning"], "--bai.merge_only"],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    command = shlex.split(run.stdout.strip().splitlines()[-1])
    actor_flag = "--pretrain" if version == OLDER else "--actor.model_name_or_path"  # the release's own spelling
    flags = [arg for arg in command[3:] if arg.startswith("--")]
    # The actor in the release's spelling; the entropy logged (--actor.entropy_coef 0) where the release's flags nest.
    assert command[:4] == [sys.executable, "-m", "openrlhf.cli.train_ppo_ray", actor_flag]
    assert flags == [actor_flag] + ([] if version == OLDER else ["--actor.entropy_coef"])
    merged = Path(command[4])
    assert json.loads((merged / PROVENANCE).read_text())["recipe"]["sft"] == [fam["sft_instruct"], fam["sft_reasoning"]]
    helped = subprocess.run([sys.executable, "-m", "openrlhf.cli.train_ppo_ray", "--help"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert helped.returncode == 0, helped.stderr
    assert all(f"  {flag} " in helped.stdout for flag in flags)  # every flag is one of that release's CLI


def test_an_older_openrlhf_gets_one_line_and_trains_without_the_monitor(releases, shim):
    script = ("import json, types\n"
              "from openrlhf_bai.integration import launcher, monitor, worker\n"
              "print(json.dumps(launcher.driver_runtime_env(types.SimpleNamespace(**monitor.DEFAULTS))))\n"
              "worker.install_hooks()\n")
    run = subprocess.run([sys.executable, "-c", script], env=environment(releases[OLDER], shim), capture_output=True,
                         text=True, timeout=600)
    line = (f"the stability monitor needs OpenRLHF 0.10.4 or later (tested: {', '.join(TESTED_OPENRLHF)}), found "
            f"{OLDER}; training runs without it, `openrlhf-bai diagnose` reads its logs afterwards")
    runtime_env = json.loads(run.stdout.strip().splitlines()[0])
    assert "worker_process_setup_hook" not in runtime_env  # Ray's workers are left alone
    assert run.stderr.splitlines().count(f"openrlhf-bai: {line}") == 1  # the launcher's one line
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == f"openrlhf_bai.errors.BAIError: {line}"
