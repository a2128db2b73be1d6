"""`openrlhf-bai demo`: both halves of the product on this machine, with nothing to download.

Part 1, the merge `--actor_init bai` runs before training:
  write three small real checkpoints (a pretrained base and two SFT models of it, Llama architecture), BAI-merge
  them (alpha 0.5, SFT weights 0.5/0.5), load the result with OpenRLHF's own `openrlhf.models.Actor` on CPU, generate
  a few tokens and score them with Actor.forward, the call PPO uses for the policy's log-probs.
Part 2, the stability monitor that runs for days inside OpenRLHF's trainer:
  a real published collapse from the curve corpus (tests/data/curves/), replayed log point by log point through
  OpenRLHF's own BasePPOTrainer.save_logs_and_checkpoints with the monitor installed (openrlhf_bai.install_hooks,
  as every Ray worker of a run gets it), its TensorBoard logger on; then `openrlhf-bai diagnose --plot` on the
  JSONL file the monitor wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# The curve corpus lives in the repository, beside the package: `make demo` runs from a checkout (editable install).
CURVES = Path(__file__).resolve().parents[2] / "tests" / "data" / "curves"
CURVE = "trl-qwen25vl-3b-grpo-aokvqa-len-collapse"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="openrlhf-bai demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where everything goes (default: a new temporary directory)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--curve", default=str(CURVES / CURVE), metavar="DIR",
                   help="a run of the curve corpus (provenance.json + its log) to replay (default: %(default)s)")
    a = p.parse_args(argv)
    if not (Path(a.curve) / "provenance.json").is_file():
        from openrlhf_bai.errors import BAIError

        raise BAIError(f"{a.curve}: no provenance.json; the demo's curves are in a checkout of the repository "
                       "(tests/data/curves/): run it from there (make demo), or pass --curve DIR")

    root = Path(a.workdir or tempfile.mkdtemp(prefix="openrlhf-bai-demo-")).absolute()
    t0 = time.time()
    print("Part 1: Balanced Actor Initialization, the merge `--actor_init bai` does before any GPU work starts")
    merge_and_load(root, a.alpha, a.max_new_tokens)
    print("\nPart 2: the stability monitor inside OpenRLHF's trainer, on a real published collapse")
    where = replay_collapse(root, Path(a.curve))
    print(f"\nWhere to look:\n{where}")
    print(f"done in {time.time() - t0:.1f} s")
    return 0


def merge_and_load(root: Path, alpha: float, max_new_tokens: int) -> None:
    import torch

    from openrlhf_bai import BAIRecipe, merge
    from openrlhf_bai.errors import BAIError
    from openrlhf_bai.integration.flash_attn_cpu import make_flash_attn_importable
    from openrlhf_bai.toy import write_family

    family = write_family(root / "inputs", "llama")
    print(f"[1/3] wrote base, instruct SFT and reasoning SFT checkpoints under {root / 'inputs'}")

    recipe = BAIRecipe(base=str(family["base"]), sft=(str(family["sft_instruct"]), str(family["sft_reasoning"])),
                       alpha=alpha)
    out = merge(recipe, root / "bai_actor", progress=False)
    c = recipe.coefficients()
    print(f"[2/3] BAI merge -> {out}\n      M_bai = {c[0]:g}*base + {c[1]:g}*instruct + {c[2]:g}*reasoning "
          f"(alpha={recipe.alpha:g}); provenance in {out / 'bai_recipe.json'}")

    make_flash_attn_importable()
    try:
        from openrlhf.models import Actor
        from openrlhf.utils.utils import get_tokenizer
    except ImportError as e:
        raise BAIError(f"OpenRLHF is not importable ({e}); install the extra: pip install 'openrlhf-bai[openrlhf]'")

    actor = Actor(str(out), attn_implementation="eager", param_dtype="bf16")
    actor.eval()
    tokenizer = get_tokenizer(str(out), actor.model, "left", None)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Solve 2 + 3 step by step."}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        sequences = actor.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                         pad_token_id=tokenizer.pad_token_id)
        new = sequences.shape[1] - inputs.input_ids.shape[1]
        action_mask = torch.ones(1, new, dtype=torch.bool)
        log_probs = actor(sequences, action_mask=action_mask, attention_mask=torch.ones_like(sequences))
    text = tokenizer.decode(sequences[0, inputs.input_ids.shape[1]:], skip_special_tokens=False)
    print(f"[3/3] openrlhf.models.Actor loaded the merged checkpoint ({sum(p.numel() for p in actor.parameters()):,} "
          f"parameters, {next(actor.parameters()).dtype}) and generated {new} tokens: {text!r}\n"
          f"      (random toy weights, so the words mean nothing); mean log-prob of those tokens under "
          f"Actor.forward: {log_probs.mean().item():.3f}")


def replay_collapse(root: Path, curve: Path) -> str:
    """Replay `curve` through OpenRLHF's trainer with the monitor on; return the 'where to look' lines."""
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer
    from openrlhf.utils.config import hierarchize

    from openrlhf_bai import install_hooks
    from openrlhf_bai.cli import diagnose
    from openrlhf_bai.diagnostics.detectors import DETECTORS, SIGNAL_KEYS, first_value
    from openrlhf_bai.diagnostics.readers import read_rows
    from openrlhf_bai.integration.monitor import CONFIG_ENV, JSONL_NAME

    provenance = json.loads((curve / "provenance.json").read_text())
    _, rows = read_rows(curve / provenance["file"], logging_steps=int(provenance.get("logging_steps") or 1))
    print(f"  {curve.name}: {provenance['model']}, {provenance['algorithm']}\n"
          f"  published at {provenance['source_url']}\n"
          f"  A replay: its {len(rows)} logged points, as published, go one by one through OpenRLHF's "
          "BasePPOTrainer.save_logs_and_checkpoints,\n  the method PPOTrainer.fit calls once per step, with the "
          "monitor installed as in every worker of a run.")

    # OpenRLHF 0.11 args as its CLI builds them (dotted dests, then hierarchize): log every call to TensorBoard,
    # never checkpoint (no DeepSpeed actors here), no wandb.
    run_name = "replay-" + curve.name
    args = hierarchize(argparse.Namespace(**{
        "logger.logging_steps": 1, "logger.tensorboard_dir": str(root / "tensorboard"), "logger.wandb.key": None,
        "logger.wandb.run_name": run_name, "ckpt.path": str(root / "ckpt"), "ckpt.save_steps": float("inf"),
        "ckpt.load_enable": False, "ckpt.best_metric_key": "", "algo.kl.target": None, "algo.kl.init_coef": 0.0,
        "algo.kl.horizon": 10000, "algo.advantage.estimator": "reinforce", "algo.dynamic_filtering_enable": False,
        "eval.steps": float("inf"), "train.num_episodes": 1, "rollout.batch_size": 1, "rollout.n_samples_per_prompt": 1,
        "rollout.vllm_generate_batch_size": 1, "vllm.enable_sleep": False,
    }))
    install_hooks()
    os.environ.pop(CONFIG_ENV, None)  # the monitor's defaults, whatever this shell has set
    trainer = object.__new__(BasePPOTrainer)
    BasePPOTrainer.__init__(trainer, SimpleNamespace(args=args), None, None, None, None, None, None)

    print(f"\n  {'step':>5} {'length':>8} {'reward':>7} {'entropy':>8}  {'bai/response_length_ratio':>26} "
          f"{'bai/entropy_ratio':>18}")
    raised = set()
    for step, metrics in rows:
        logs = dict(metrics)
        trainer.save_logs_and_checkpoints(step, logs, {"global_step": step})
        cells = [first_value(metrics, SIGNAL_KEYS[name]) for name in ("length", "reward", "entropy")]
        ratios = [logs.get("bai/response_length_ratio"), logs.get("bai/entropy_ratio")]
        print(f"  {step:>5} " + " ".join(f"{v:>{w}.3g}" if v is not None else f"{'-':>{w}}"
                                         for v, w in zip(cells, (8, 7, 8)))
              + "  " + " ".join(f"{v:>{w}.2f}" if v is not None else f"{'-':>{w}}" for v, w in zip(ratios, (26, 18))))
        for name in DETECTORS:
            if logs.get(f"bai/{name}") == 1 and name not in raised:
                raised.add(name)
                print(f"  >>> detected at step {step}: bai/{name} = 1 in this step's logs (the monitor's warning, "
                      "through OpenRLHF's logger, is above)")
    trainer.tensorboard_logger.close()

    jsonl = Path(args.ckpt.path) / JSONL_NAME
    png = root / "collapse.png"
    print(f"\n  openrlhf-bai diagnose {jsonl} --plot {png}")
    diagnose.main([str(jsonl), "--plot", str(png)])
    return (f"  tensorboard --logdir {root / 'tensorboard'}   train/bai/* beside the run's own metrics\n"
            f"  {png}   the diagnose figure: each signal against its threshold, the detection marked\n"
            f"  {jsonl}   every step's numbers, what `openrlhf-bai diagnose` reads\n"
            f"  {root / 'bai_actor'}   the merged checkpoint\n"
            "  In your own run: the README's quickstart (openrlhf-bai train-ppo ... --actor_init bai --bai.merge_only)")


if __name__ == "__main__":
    from openrlhf_bai.cli.main import run

    sys.exit(run(main, sys.argv[1:]))
