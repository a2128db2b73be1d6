"""The --bai.* flags through a patched OpenRLHF 0.11.2 (patches/, applied as tests/test_upstream_patch.py does): the
recipe table's flags reach the merge with the launcher's hash, and a misspelled flag stops OpenRLHF's own parser
before anything is merged."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_bai.merger import PROVENANCE

# The patched-OpenRLHF fixture of test_upstream_patch.py (tests/ is no package: the openrlhf wheel owns `tests`).
_spec = importlib.util.spec_from_file_location("_upstream_patch", Path(__file__).with_name("test_upstream_patch.py"))
_upstream = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_upstream)
patched, run_python, OPENRLHF_CLI = _upstream.patched, _upstream.run_python, _upstream.OPENRLHF_CLI


def test_recipe_flags_through_the_patched_parser_give_the_launchers_cache_directory(patched, llama_family, tmp_path):
    fam = {name: str(path) for name, path in llama_family.items()}
    env = {**patched, "OPENRLHF_BAI_CACHE": str(tmp_path / "cache")}
    recipe = ["--bai.base", fam["base"], "--bai.sft", fam["sft_instruct"], fam["sft_reasoning"],
              "--bai.sft_weights", "2", "1", "--bai.normalize", "--bai.max_shard_size", "100KB", "--bai.alpha", "0.3"]
    upstream = run_python(env, "-m", OPENRLHF_CLI, "--actor.model_name_or_path", fam["sft_reasoning"],
                          "--reward.remote_url", "http://localhost:5000/get_reward", "--actor_init", "bai", *recipe,
                          "--bai.merge_only")
    assert upstream.returncode == 0, upstream.stderr
    merged = Path(upstream.stdout.strip().splitlines()[-1])
    assert len(list(merged.glob("model-*-of-*.safetensors"))) > 1  # --bai.max_shard_size reached the merge
    coefficients = json.loads((merged / PROVENANCE).read_text())["recipe"]["coefficients"]
    assert coefficients == pytest.approx([0.3, 0.7 * 2 / 3, 0.7 / 3])

    ours = subprocess.run([sys.executable, "-m", "openrlhf_bai.cli.train_ppo_ray", "--actor_init", "bai", *recipe,
                           "--bai.merge_only"], env=env, capture_output=True, text=True, timeout=300)
    assert ours.returncode == 0, ours.stderr
    command = ours.stdout.strip().splitlines()[-1].split()
    # The same recipe hash, the same cache directory.
    assert command[command.index("--actor.model_name_or_path") + 1] == str(merged)


def test_a_misspelled_flag_stops_the_patched_parser_before_the_merge(patched, llama_family, tmp_path):
    fam = {name: str(path) for name, path in llama_family.items()}
    env = {**patched, "OPENRLHF_BAI_CACHE": str(tmp_path / "cache")}
    run = run_python(env, "-m", OPENRLHF_CLI, "--actor.model_name_or_path", fam["sft_reasoning"],
                     "--reward.remote_url", "http://localhost:5000/get_reward", "--actor_init", "bai",
                     "--bai.base", fam["base"], "--bai.alpah", "0.1", "--bai.merge_only")
    assert run.returncode == 2  # argparse's usage error
    assert run.stderr.strip().splitlines()[-1].endswith("error: unrecognized arguments: --bai.alpah 0.1")
    assert not (tmp_path / "cache").exists()
