"""The README's main job, `openrlhf-bai demo`, run as a user runs it: real checkpoints, real merge, OpenRLHF's Actor."""

import json
import subprocess
import sys
from pathlib import Path


def test_demo_merges_and_generates_with_openrlhf_actor(tmp_path):
    exe = Path(sys.executable).with_name("openrlhf-bai")
    proc = subprocess.run([str(exe), "demo", "--workdir", str(tmp_path), "--max-new-tokens", "6"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "M_bai = 0.5*base + 0.25*instruct + 0.25*reasoning" in out
    assert "openrlhf.models.Actor loaded the merged checkpoint" in out and "generated 6 tokens" in out
    record = json.loads((tmp_path / "bai_actor" / "bai_recipe.json").read_text())
    assert record["recipe"]["alpha"] == 0.5 and len(record["inputs"]) == 3
    log_prob = float(out.split("Actor.forward: ")[1].split()[0])
    assert log_prob < 0  # a real log-probability from OpenRLHF's forward pass
