"""The BAI merge, read top to bottom; each part lives in its own module, as mergekit keeps I/O apart from arithmetic:

checkpoint_io   reading inputs: local directories and hub ids, safetensors headers checked, tensors read by pread
merge_plan      plan_merge(recipe): every check, from configs, headers and one matrix's first rows, before any merging
merge_stream    write_merge(plan, dir): the arithmetic streamed slice by slice into shards on a thread pool
atomic_dir      write_dir(out, write): lock, temporary directory beside out, rename into place, leftovers of killed
                merges removed, SIGTERM and Ctrl-C cleaned up

merge(recipe, out)       plan, refuse an output that is (inside, or contains) an input, reuse a finished identical
                         merge, else write it atomically
cache_dir_for(recipe)    where the launcher and `probe` keep merges: $OPENRLHF_BAI_CACHE/merged/bai-<recipe hash>
                         ($OPENRLHF_BAI_CACHE defaults to ~/.cache/openrlhf-bai, the one cache root of the project)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from openrlhf_bai import checkpoint_io as io
from openrlhf_bai.atomic_dir import (  # noqa: F401  (existing_parent, STALE_FOREIGN_S: for callers)
    STALE_FOREIGN_S, check_output_dir, existing_parent, write_dir)
from openrlhf_bai.errors import BAIError
from openrlhf_bai.merge_plan import (  # noqa: F401  (the names callers import from merger)
    FORMAT_VERSION, PROVENANCE, MergePlan, TensorPlan, plan_merge, provenance)
from openrlhf_bai.merge_stream import MAX_THREADS, output_size, write_merge
from openrlhf_bai.recipe import BAIRecipe


READ_BESIDE = (io.INDEX_NAME, "config.json", "generation_config.json", *io.TOKENIZER_FILES)


def recipe_hash(recipe: BAIRecipe) -> str:
    """Identifies the output: the recipe's numbers and a content fingerprint of every input."""
    return plan_merge(recipe).recipe_hash


def cache_root() -> Path:
    """The project's one cache root: $OPENRLHF_BAI_CACHE, else ~/.cache/openrlhf-bai."""
    return Path(os.environ.get("OPENRLHF_BAI_CACHE") or Path.home() / ".cache" / "openrlhf-bai").expanduser()


def merges_dir() -> Path:
    return cache_root() / "merged"


def cache_dir_for(recipe: BAIRecipe, plan: MergePlan | None = None) -> Path:
    """Where the launcher and `probe` keep merged checkpoints, one directory per recipe hash."""
    plan = plan or plan_merge(recipe)
    return merges_dir() / f"bai-{plan.recipe_hash[:16]}"


def existing_merge_hash(output_dir: Path) -> str | None:
    try:
        return json.loads((Path(output_dir) / PROVENANCE).read_text())["recipe_hash"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None


def check_not_an_input(output_dir: Path, plan: MergePlan) -> None:
    """Refuse an output that is an input's directory, lies inside one, or contains one, comparing real paths: the
    directory as given and resolved, each directory holding the bytes of a file the merge reads (a hub snapshot's
    blobs/), and a hub input's whole repo folder in the cache. --overwrite or not: a merge never writes over its
    inputs."""
    real = Path(output_dir).expanduser().absolute().resolve()
    for c in plan.inputs:
        places = {c.directory.absolute(), c.directory.resolve()}
        read = {c.directory / n for n in (*c.file_sizes, *READ_BESIDE)}
        places.update(f.resolve().parent for f in read if f.exists())
        if c.revision is not None:  # models--org--name/snapshots/<commit>
            places.add(c.directory.resolve().parent.parent)
        for place in sorted(places):
            if real == place or place in real.parents:
                where = "is" if real == place else "is inside"
            elif real in place.parents:
                where = "contains"
            else:
                continue
            raise BAIError(f"output {output_dir} {where} {place}, where input {c.label} is read from; a merge never "
                           "writes over its inputs (--overwrite or not): choose another directory")


def check_destination(output_dir: Path, plan: MergePlan, overwrite: bool) -> bool:
    """Every check of the output before any work; True if output_dir already holds this merge (it is reused)."""
    output_dir = Path(output_dir).expanduser().absolute()
    check_not_an_input(output_dir, plan)
    return check_output_dir(output_dir, lambda d: existing_merge_hash(d) == plan.recipe_hash, overwrite)


def default_threads() -> int:
    """The cores this process may run on (a job scheduler's CPU set, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def merge(recipe: BAIRecipe, output_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
          plan: MergePlan | None = None, threads: int | None = None) -> Path:
    """Merge into output_dir and return it. A finished merge of the same recipe there is reused untouched;
    two processes merging the same recipe do the work once. On any failure nothing is left at output_dir.
    `threads` (default: the usable cores) changes the speed only, never a byte of the output."""
    return merge_or_reuse(recipe, output_dir, overwrite=overwrite, progress=progress, plan=plan, threads=threads)[0]


def merge_or_reuse(recipe: BAIRecipe, output_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
                   plan: MergePlan | None = None, threads: int | None = None) -> tuple[Path, bool]:
    """`merge`, also saying whether the output was already there (True) or written now (False)."""
    plan = plan or plan_merge(recipe)
    threads = min(MAX_THREADS, default_threads() if threads is None else threads)
    if threads < 1:
        raise BAIError(f"threads must be at least 1, got {threads}")
    output_dir = Path(output_dir).expanduser().absolute()
    check_not_an_input(output_dir, plan)
    try:
        reused = write_dir(output_dir, lambda tmp: write_merge(plan, tmp, progress, threads), overwrite=overwrite,
                           done=lambda d: existing_merge_hash(d) == plan.recipe_hash, size=lambda: output_size(plan))
    finally:
        for c in plan.inputs:
            io.close(c)
    return output_dir, reused
