"""`openrlhf-bai demo`: the main job on a built-in default, with nothing to download.

1. write three small real checkpoints (a pretrained base and two SFT models of it, Llama architecture);
2. BAI-merge them (alpha 0.5, SFT weights 0.5/0.5), exactly as `--actor_init bai` does before training;
3. load the result with OpenRLHF's own `openrlhf.models.Actor` on CPU, generate a few tokens, and score them
   with Actor.forward, the call PPO uses for the policy's log-probs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="openrlhf-bai demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a new temporary directory)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=8)
    a = p.parse_args(argv)

    import torch

    from openrlhf_bai import BAIRecipe, merge
    from openrlhf_bai.errors import BAIError
    from openrlhf_bai.integration.flash_attn_cpu import make_flash_attn_importable
    from openrlhf_bai.toy import write_family

    root = Path(a.workdir or tempfile.mkdtemp(prefix="openrlhf-bai-demo-")).absolute()
    t0 = time.time()
    family = write_family(root / "inputs", "llama")
    print(f"[1/3] wrote base, instruct SFT and reasoning SFT checkpoints under {root / 'inputs'}")

    recipe = BAIRecipe(base=str(family["base"]), sft=(str(family["sft_instruct"]), str(family["sft_reasoning"])),
                       alpha=a.alpha)
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
        sequences = actor.model.generate(**inputs, max_new_tokens=a.max_new_tokens, do_sample=False, use_cache=True,
                                         pad_token_id=tokenizer.pad_token_id)
        new = sequences.shape[1] - inputs.input_ids.shape[1]
        action_mask = torch.ones(1, new, dtype=torch.bool)
        log_probs = actor(sequences, action_mask=action_mask, attention_mask=torch.ones_like(sequences))
    text = tokenizer.decode(sequences[0, inputs.input_ids.shape[1]:], skip_special_tokens=False)
    print(f"[3/3] openrlhf.models.Actor loaded the merged checkpoint ({sum(p.numel() for p in actor.parameters()):,} "
          f"parameters, {next(actor.parameters()).dtype}) and generated {new} tokens: {text!r}\n"
          f"      mean log-prob of those tokens under Actor.forward: {log_probs.mean().item():.3f}")
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    from openrlhf_bai.cli.main import run

    sys.exit(run(main, sys.argv[1:]))
