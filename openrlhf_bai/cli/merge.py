"""`openrlhf-bai merge`: the BAI merge from the command line, a thin layer over BAIRecipe and merge()."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from openrlhf_bai.recipe import add_recipe_flags, recipe_from_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openrlhf-bai merge",
        description="M_sft = sum_i w_i * M_i, then M_bai = alpha * M_base + (1 - alpha) * M_sft (arXiv 2509.00309).",
    )
    add_recipe_flags(p, required=("base", "sft"))
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--dry-run", action="store_true", help="run every check and print the plan; write nothing")
    p.add_argument("--export-mergekit", metavar="FILE", default=None, help="also write the equivalent mergekit YAML")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads merging slices in parallel (default: the cores this process may use, at most "
                        "64); the output is the same for every N")
    return p


def main(argv: list[str] | None = None) -> int:
    from openrlhf_bai.atomic import check_output_file, write_text_atomic
    from openrlhf_bai.merger import check_destination, existing_parent, merge_or_reuse, output_size, plan_merge
    from openrlhf_bai.recipe import to_mergekit_yaml

    a = build_parser().parse_args(argv)
    recipe = recipe_from_flags(a)
    plan = plan_merge(recipe)
    output = Path(a.output).expanduser().absolute()
    reuse = check_destination(output, plan, a.overwrite)
    if a.export_mergekit:
        inputs = [f for c in plan.inputs for f in c.directory.iterdir()]
        check_output_file(a.export_mergekit, inputs, "--export-mergekit")
    coefficients = ", ".join(f"{c.label.split()[0]}={w:.4g}" for c, w in zip(plan.inputs, recipe.coefficients()))
    print(f"BAI merge: alpha={recipe.alpha:g}, coefficients {coefficients}, dtype {plan.out_dtype}")
    print(f"  {len(plan.tensors)} tensors in {len(plan.shards)} shard(s); read {plan.bytes_to_read / 1e6:.1f} MB, "
          f"write {plan.bytes_to_write / 1e6:.1f} MB; recipe hash {plan.recipe_hash[:16]}")
    if a.dry_run:  # writes nothing, the mergekit YAML included
        free = shutil.disk_usage(existing_parent(output)).free
        state = "holds this merge already (would be reused)" if reuse else "would be written"
        print(f"  dry run: {output} {state}; disk needed {output_size(plan) / 1e6:.1f} MB, free {free / 1e9:.1f} GB"
              + (f"; mergekit equivalent would go to {a.export_mergekit}" if a.export_mergekit else ""))
        return 0
    _, reused = merge_or_reuse(recipe, output, overwrite=a.overwrite, progress=not a.no_progress, plan=plan,
                               threads=a.threads)
    print(f"{'reused' if reused else 'wrote'} {output}")
    if a.export_mergekit:  # only once the merge it describes exists
        write_text_atomic(a.export_mergekit, to_mergekit_yaml(recipe, plan.out_dtype))
        print(f"  mergekit equivalent written to {a.export_mergekit}")
    return 0


if __name__ == "__main__":
    from openrlhf_bai.cli.main import run

    sys.exit(run(main, sys.argv[1:]))
