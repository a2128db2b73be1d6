"""`make demo` (`openrlhf-bai demo`) run as a user runs it, checked for what the user sees: a merged checkpoint that
OpenRLHF's Actor loads and generates with, the collapse detected at the step the published curve collapses, bai/*
scalars in a TensorBoard event file read back, and the diagnose PNG."""

import hashlib
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from openrlhf_bai.cli.demo import CURVE, CURVES


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(workdir, stdout) of one demo run; the published curve it replays is checked to be left as it was."""
    workdir = tmp_path_factory.mktemp("demo")
    curve_bytes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (CURVES / CURVE).iterdir()}
    exe = Path(sys.executable).with_name("openrlhf-bai")
    proc = subprocess.run([str(exe), "demo", "--workdir", str(workdir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (CURVES / CURVE).iterdir()} == curve_bytes
    return workdir, proc.stdout


def test_the_merged_checkpoint_loads_in_openrlhfs_actor_and_generates(demo):
    workdir, out = demo
    assert "M_bai = 0.5*base + 0.25*instruct + 0.25*reasoning" in out
    assert "openrlhf.models.Actor loaded the merged checkpoint" in out and "generated 8 tokens" in out
    record = json.loads((workdir / "bai_actor" / "bai_recipe.json").read_text())
    assert record["recipe"]["coefficients"] == pytest.approx([0.5, 0.25, 0.25])

    # What the user does next with it: load it in OpenRLHF's Actor and generate.
    from openrlhf.models import Actor
    from openrlhf.utils.utils import get_tokenizer

    actor = Actor(str(workdir / "bai_actor"), attn_implementation="eager", param_dtype="bf16")
    tokenizer = get_tokenizer(str(workdir / "bai_actor"), actor.model, "left", None)
    inputs = tokenizer("Solve 2 + 3 step by step.", return_tensors="pt")
    with torch.no_grad():
        sequences = actor.model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
        log_probs = actor(sequences, action_mask=torch.ones(1, 5, dtype=torch.bool),
                          attention_mask=torch.ones_like(sequences))
    assert sequences.shape == (1, inputs.input_ids.shape[1] + 5)
    assert log_probs.shape == (1, 5) and torch.isfinite(log_probs).all()


def test_the_collapse_is_detected_at_the_step_the_published_curve_collapses(demo):
    workdir, out = demo
    label = json.loads((CURVES / CURVE / "label.json").read_text())["length_collapse"]
    logging_steps = json.loads((CURVES / CURVE / "provenance.json").read_text())["logging_steps"]
    assert "A replay" in out  # it says what it is
    detected = [int(step) for step in re.findall(r">>> detected at step (\d+): bai/length_collapse = 1", out)]
    assert len(detected) == 1, out
    step = detected[0]
    # Not before the labeled onset, and within a few log points of it (the detectors wait `patience` points).
    assert label["onset_step"] <= step <= label["onset_step"] + 4 * logging_steps
    # The monitor's own warning came through OpenRLHF's logger in that step, before the step's row was printed.
    warning = out.index(f"[openrlhf-bai] step {step}: sequence length collapse")
    assert warning < out.index(f"\n  {step:>5} ") < out.index(">>> detected")

    tb = EventAccumulator(str(workdir / "tensorboard" / f"replay-{CURVE}"), size_guidance={"scalars": 0})
    tb.Reload()
    collapse = {e.step: e.value for e in tb.Scalars("train/bai/length_collapse")}
    assert min(s for s, v in collapse.items() if v == 1.0) == step  # the event file agrees with what was printed


def test_tensorboard_holds_the_runs_metrics_and_the_monitors_bai_scalars(demo):
    workdir, _ = demo
    tb = EventAccumulator(str(workdir / "tensorboard" / f"replay-{CURVE}"), size_guidance={"scalars": 0})
    tb.Reload()
    tags = set(tb.Tags()["scalars"])
    assert {"train/bai/response_length_ratio", "train/bai/length_collapse", "train/bai/entropy_ratio"} <= tags
    ratio = {e.step: e.value for e in tb.Scalars("train/bai/response_length_ratio")}
    # Every published log point from the first with a reference (the points before the last patience: from the
    # 4th log point, step 40, on), at its own step.
    assert sorted(ratio) == list(range(40, 190, 10))
    assert ratio[180] < 0.2  # 53 tokens -> about 5
    length = {e.step: e.value for e in tb.Scalars("train/completions/mean_length")}
    assert length[10] == pytest.approx(53.35) and length[20] == pytest.approx(2.6)  # the published numbers


def test_the_diagnose_png_is_written_and_the_output_says_where_to_look(demo):
    workdir, out = demo
    png = workdir / "collapse.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > 400 and height > 300
    where = out[out.index("Where to look:"):]
    for path in (workdir / "tensorboard", png, workdir / "ckpt" / "bai_diagnostics.jsonl", workdir / "bai_actor"):
        assert str(path) in where and path.exists()
    assert "YES at step" in out  # diagnose's verdict table on the monitor's JSONL
