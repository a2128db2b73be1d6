"""Shared test set-up: offline, a private merge cache, flash-attn importable on CPU, small real checkpoints."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OPENRLHF_BAI_CACHE", tempfile.mkdtemp(prefix="bai-test-cache-"))

import pytest  # noqa: E402

from openrlhf_bai.integration.flash_attn_cpu import make_flash_attn_importable  # noqa: E402

make_flash_attn_importable()


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """base, sft_instruct, sft_reasoning: tiny untied Llama checkpoints, single-file bf16, one shared tokenizer."""
    from openrlhf_bai.toy import write_family

    return write_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def run_pytest(tmp_path_factory):
    """run(env, *args, cwd=None): pytest in a subprocess (other OpenRLHF files first on PYTHONPATH) in cwd, this
    project's root by default. Returns the CompletedProcess and {test name: (outcome, {property: value})} read from
    its JUnit XML report: outcome is passed, failed, error or skipped; properties are the test's record_property."""
    import subprocess
    import sys
    import xml.etree.ElementTree as ET
    from pathlib import Path

    def run(env, *args, cwd=None, timeout=1200):
        report = tmp_path_factory.mktemp("junit") / "report.xml"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                               *args], env=env, cwd=cwd or Path(__file__).resolve().parents[1], capture_output=True,
                              text=True, timeout=timeout)
        results = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            results[case.get("name")] = (outcome, {p.get("name"): p.get("value") for p in case.iter("property")})
        return done, results

    return run
