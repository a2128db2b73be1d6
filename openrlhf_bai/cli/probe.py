"""`openrlhf-bai probe`: merge a candidate per alpha, generate on the training prompts, measure length, EOS rate,
KL to each parent and held-out perplexity, and suggest an alpha. The recipe is openrlhf_bai.probe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openrlhf_bai.probe import MAX_KL_BASE_SHARE, MIN_LENGTH_SHARE
from openrlhf_bai.recipe import add_recipe_flags, recipe_from_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openrlhf-bai probe", description=__doc__.split("\n\n")[0])
    merge = p.add_argument_group("the merge (as for `openrlhf-bai merge`; the same values reuse the same cache)")
    add_recipe_flags(merge, skip=("alpha",), required=("base", "sft"))
    merge.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                       help="candidate shares of the base, each in [0, 1] (default 0.1 0.3 0.5 0.7 0.9)")

    data = p.add_argument_group("prompts (OpenRLHF's prompt dataset form)")
    data.add_argument("--prompts", required=True, help="JSONL file, one prompt per line (the training file works)")
    data.add_argument("--input-key", default="input",
                      help="JSON key of the prompt (as --data.input_key; default input)")
    data.add_argument("--input-template", default=None, help="format string with {} (as --data.input_template)")
    data.add_argument("--apply-chat-template", action="store_true",
                      help="wrap each input with the tokenizer's chat template (as --data.apply_chat_template)")
    data.add_argument("--num-prompts", type=int, default=128, help="use the first N prompts (default 128; 0: all)")
    data.add_argument("--heldout", default=None, help="plain text file: perplexity on it measures knowledge kept")
    data.add_argument("--heldout-max-tokens", type=int, default=16384, help="score at most this many tokens of it")

    gen = p.add_argument_group("generation")
    gen.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto",
                     help="auto: vLLM when a GPU and vllm are present, else transformers generate")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="response budget (default 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy, deterministic (default)")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (transformers)")

    rule = p.add_argument_group("suggestion: the smallest alpha within both bounds")
    rule.add_argument("--reasoning-sft", default=None,
                      help="the length reference: 1-based index into --sft or a checkpoint directory "
                      "(default: last --sft)")
    rule.add_argument("--min-length-share", type=float, default=MIN_LENGTH_SHARE,
                      help=f"mean length >= this share of the reasoning SFT's (default {MIN_LENGTH_SHARE})")
    rule.add_argument("--max-kl-base-share", type=float, default=MAX_KL_BASE_SHARE,
                      help=f"KL to base <= this share of the reasoning SFT's KL to base (default {MAX_KL_BASE_SHARE})")

    out = p.add_argument_group("output")
    out.add_argument("--plot", default=None, metavar="FILE.png",
                     help="figure of length, EOS rate and KL against alpha, in the format of the suffix (default: "
                          "beside --json, its name ending in .png; none without --json)")
    out.add_argument("--json", default=None, metavar="FILE", help="write every number to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    from openrlhf_bai.probe import run_probe

    a = build_parser().parse_args(argv)
    # The plot goes where --plot says or beside --json, never into the current directory unasked.
    plot = a.plot or (str(Path(a.json).with_suffix(".png")) if a.json else None)
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load would bury the probe's own lines
    result = run_probe(
        recipe_from_flags(a), a.alphas, a.prompts, reasoning_sft=a.reasoning_sft, input_key=a.input_key,
        input_template=a.input_template, apply_chat_template=a.apply_chat_template, num_prompts=a.num_prompts or None,
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed, engine=a.engine,
        batch_size=a.batch_size, heldout=a.heldout, heldout_max_tokens=a.heldout_max_tokens,
        min_length_share=a.min_length_share, max_kl_base_share=a.max_kl_base_share, plot_path=plot,
        json_path=a.json,
    )
    s = result["suggestion"]
    print(result["table"])
    print(f"\nbounds: mean length >= {s['min_length']:.1f} tokens ({s['min_length_share']:g} x reasoning SFT), "
          f"KL to base <= {s['max_kl_base']:.4g} ({s['max_kl_base_share']:g} x reasoning SFT)")
    print(s["message"])
    if s["alpha"] is not None:
        path = next(r["path"] for r in result["rows"] if r["kind"] == "candidate" and r["alpha"] == s["alpha"])
        print(f"  merged at {path}; `--actor_init bai --bai.alpha {s['alpha']:g}` with the same models reuses it")
    written = [f"{name}: {path}" for name, path in (("plot", plot), ("numbers", a.json)) if path]
    print(", ".join(written) if written else "nothing written (--json FILE keeps the numbers and a plot beside them)")
    return 0


if __name__ == "__main__":
    from openrlhf_bai.cli.main import run

    sys.exit(run(main, sys.argv[1:]))
