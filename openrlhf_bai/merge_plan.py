"""Planning a BAI merge: every check, reading configs, safetensors headers and one matrix's first rows, before any
tensor is merged.

plan_merge(recipe) -> MergePlan   open each input (checkpoint_io), check architecture / names / shapes / vocabulary
                                  rows / that each SFT model is a fine-tune of the base, choose the output dtype, lay
                                  the output out in shards, hash the recipe
provenance(plan)                  the record written beside the merged weights (bai_recipe.json)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openrlhf_bai import checkpoint_io as io
from openrlhf_bai.errors import BAIError
from openrlhf_bai.recipe import DTYPES, BAIRecipe, to_fp32

PROVENANCE = "bai_recipe.json"
# Bump when the output bytes for the same recipe would change. 2: tensors in the base's storage order (was: by name).
FORMAT_VERSION = 2
# Below this cosine similarity an SFT model is not a fine-tune of the base (fixed a priori: see plan_merge).
LINEAGE_COSINE = 0.2
LINEAGE_VALUES = 1 << 20  # values of the matrix compared: its first rows, 4 MB in fp32 per input


@dataclass(slots=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # output shape
    dtype: str  # output dtype (safetensors name)
    rows: tuple[int, ...]  # each input's row count (equal unless the vocabulary differs)
    merged: bool  # floating tensors are merged; others are copied from the config source


@dataclass
class MergePlan:
    recipe: BAIRecipe
    inputs: list[io.Checkpoint]  # base first, then the SFT models
    tensors: list[TensorPlan]
    shards: list[tuple[str, list[TensorPlan]]]
    out_dtype: str  # bf16 / fp16 / fp32
    config_src: int
    tokenizer_src: int
    recipe_hash: str
    bytes_to_read: int  # tensor data of all inputs
    bytes_to_write: int  # tensor data of the output; `merge_stream.output_size` gives every file's exact size


def labels(recipe: BAIRecipe) -> list[str]:
    return [f"base ({recipe.base})"] + [f"sft[{i + 1}] ({p})" for i, p in enumerate(recipe.sft)]


def some(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _is_vocab_tensor(name: str, shapes: list[tuple], inputs: list[io.Checkpoint]) -> bool:
    """A tensor whose row count is each input's vocab_size (embeddings, lm_head) and whose other dims agree."""
    return all(s[1:] == shapes[0][1:] and len(s) == len(shapes[0]) for s in shapes) and all(
        s and s[0] == c.config.get("vocab_size") for s, c in zip(shapes, inputs)
    )


def plan_merge(recipe: BAIRecipe) -> MergePlan:
    """Every check the merge needs, reading configs, safetensors headers and the first rows of one matrix."""
    recipe.validate()
    paths = recipe.inputs()
    inputs = [io.open_checkpoint(p, label) for p, label in zip(paths, labels(recipe))]
    config_src = paths.index(recipe.config_from or recipe.sft[0])
    tokenizer_src = paths.index(recipe.tokenizer_from or recipe.sft[0])

    base = inputs[0]
    arch = (base.config.get("architectures"), base.config.get("model_type"))
    for c in inputs[1:]:
        other = (c.config.get("architectures"), c.config.get("model_type"))
        if other != arch:
            raise BAIError(f"architecture differs: {base.label} is {arch[0]} ({arch[1]}), "
                           f"{c.label} is {other[0]} ({other[1]})")

    # Tied embeddings: a tied input's output head is its embedding (a copy it saved is not what transformers loads).
    # All tied: the merge is tied, lm_head is dropped. Tied and untied mixed (Qwen2.5-Math-1.5B, tied, and
    # DeepSeek-R1-Distill-Qwen-1.5B, untied): the merge is untied, and each tied input's embedding is its lm_head.
    tied = [c.config.get("tie_word_embeddings") is True or "lm_head.weight" not in c.tensors for c in inputs]
    heads_from = None
    if all(tied):
        for c in inputs:
            c.tensors.pop("lm_head.weight", None)
    elif any(tied):
        untied = next(c for c, t in zip(inputs, tied) if not t)
        head = untied.tensors["lm_head.weight"]
        shared = set.intersection(*(set(c.tensors) for c in inputs)) - {"lm_head.weight"}
        embeddings = [n for n in sorted(shared) if untied.tensors[n].shape == head.shape]
        if len(embeddings) != 1:
            raise BAIError(f"cannot tell the input embedding that is the output head of the tied inputs "
                           f"({', '.join(c.label for c, t in zip(inputs, tied) if t)}): "
                           f"{some(embeddings) or 'no tensor'} has lm_head.weight's shape {list(head.shape)}")
        heads_from = [embeddings[0] if t else "lm_head.weight" for t in tied]
        for c, source in zip(inputs, heads_from):
            c.tensors["lm_head.weight"] = c.tensors[source]  # read the embedding's bytes as this input's head
    names_per_input = [set(c.tensors) for c in inputs]
    for c, names in zip(inputs[1:], names_per_input[1:]):
        if names != names_per_input[0]:
            raise BAIError(
                f"tensor names differ between {base.label} and {c.label}: "
                f"only in base: {some(names_per_input[0] - names) or '-'}; "
                f"only in {c.label.split()[0]}: {some(names - names_per_input[0]) or '-'}"
            )

    if recipe.dtype == "auto":
        float_dtypes = [t.dtype for t in base.tensors.values() if t.dtype in io.FLOATS]
        out_dtype = {v: k for k, v in DTYPES.items()}.get(max(set(float_dtypes), key=float_dtypes.count), "fp32")
    else:
        out_dtype = recipe.dtype

    # The base's storage order: the merge then reads every input front to back, and tensors that lie side by side
    # in all inputs are merged as one run (merge_stream), as in name order for a single file but not across shards.
    tensors, sizes, bytes_to_read = [], [], 0
    shard_rank = {f: i for i, f in enumerate(sorted({t.file for t in base.tensors.values()}, key=lambda f: f.name))}
    order = sorted((shard_rank[base.tensors[n].file], base.tensors[n].offset, n) for n in names_per_input[0])
    for _, _, name in order:
        infos = [c.tensors[name] for c in inputs]
        kinds = [(i.shape, i.dtype) for i in infos]
        if kinds.count(kinds[0]) == len(kinds):  # the usual case, a few operations for each of 47k tensors
            shape, dtype = kinds[0]
            merged = dtype in io.FLOATS
            t = TensorPlan(name, shape, DTYPES[out_dtype] if merged else dtype, (io.rows_of(shape),) * len(infos),
                           merged)
            bytes_to_read += io.nbytes(shape, dtype) * len(infos)
        else:
            t = _tensor_plan(name, infos, inputs, recipe, config_src, out_dtype)
            bytes_to_read += sum(io.nbytes(i.shape, i.dtype) for i in infos)
        tensors.append(t)
        sizes.append(io.nbytes(t.shape, t.dtype))

    # A wrong base (another pretraining of the same architecture and shapes) passes every check above and merges into
    # noise. Fine-tunes of one base keep a projection matrix nearly parallel to it (cosine above 0.9);
    # weights grown from another initialization are orthogonal in this many dimensions (cosine within 1/sqrt(n) of 0).
    probe = next((t for t in tensors if t.merged and len(t.shape) == 2 and t.shape[0] * t.shape[1] >= 4096
                  and len(set(t.rows)) == 1
                  and not _is_vocab_tensor(t.name, [c.tensors[t.name].shape for c in inputs], inputs)), None)
    if probe is not None:
        n = min(probe.shape[0], max(1, LINEAGE_VALUES // probe.shape[1]))
        try:
            first = [to_fp32(io.read_rows(c, probe.name, 0, n), c.tensors[probe.name].dtype,
                             np.empty(n * probe.shape[1], np.float32)).astype(np.float64) for c in inputs]
        finally:  # a plan that is never merged (a dry run, a cache look-up) holds no open files
            for c in inputs:
                io.close(c)
        for c, x in zip(inputs[1:], first[1:]):
            norms = float(np.linalg.norm(first[0]) * np.linalg.norm(x))
            cosine = float(first[0] @ x) / norms if norms else 1.0
            if cosine < LINEAGE_COSINE:
                raise BAIError(f"{c.label} is not a fine-tune of {base.label}: {probe.name} has cosine similarity "
                               f"{cosine:.2f} between them (fine-tunes of one base stay above 0.9, separately "
                               "pretrained models are near 0); the base must be the model the SFT models were "
                               "trained from (--base, launcher: --bai.base)")

    # Shards as transformers lays them out: close a shard when the next tensor would pass the limit.
    limit, shards, current, size = io.parse_size(recipe.max_shard_size), [], [], 0
    for t, n in zip(tensors, sizes):
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += n
    shards.append(current)
    names = [io.SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    key = {
        "format": FORMAT_VERSION, "coefficients": recipe.coefficients(), "alpha": recipe.alpha,
        "weights": recipe.weights(), "dtype": out_dtype, "vocab_mismatch": recipe.vocab_mismatch,
        "max_shard_size": limit, "config_src": config_src, "tokenizer_src": tokenizer_src,
        "inputs": [c.fingerprint for c in inputs],
        "tokenizer": _tokenizer_digest(inputs[tokenizer_src].directory),
    }
    if heads_from:  # only where tied and untied inputs mix (before 0.3 refused, or tied dropping the untied heads)
        key["heads_from"] = heads_from
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return MergePlan(recipe, inputs, tensors, list(zip(names, shards)), out_dtype, config_src, tokenizer_src, digest,
                     bytes_to_read, sum(sizes))


def _tensor_plan(name, infos, inputs, recipe: BAIRecipe, config_src: int, out_dtype: str) -> TensorPlan:
    """A tensor whose shape or dtype differs between inputs: only the rows of a grown vocabulary may differ."""
    base, shapes = inputs[0], [i.shape for i in infos]
    if shapes.count(shapes[0]) != len(shapes):
        if not _is_vocab_tensor(name, shapes, inputs):
            k = next(k for k, s in enumerate(shapes) if s != shapes[0])
            raise BAIError(f"shape mismatch for tensor {name}: {list(shapes[0])} in {base.label}, "
                           f"{list(shapes[k])} in {inputs[k].label}")
        if recipe.vocab_mismatch == "error":
            rows = ", ".join(f"{s[0]} in {c.label.split()[0]}" for s, c in zip(shapes, inputs))
            raise BAIError(
                f"vocabulary sizes differ: {name} has {rows} rows (an SFT model added tokens); pass "
                "--vocab-mismatch renormalize (launcher: --bai.vocab_mismatch) to merge each row over the inputs "
                "that have it"
            )
    merged = all(i.dtype in io.FLOATS for i in infos)
    return TensorPlan(name, shapes[config_src], DTYPES[out_dtype] if merged else infos[config_src].dtype,
                      tuple(io.rows_of(s) for s in shapes), merged)


def _tokenizer_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for name in io.TOKENIZER_FILES + ("generation_config.json",):
        if (directory / name).is_file():
            h.update(name.encode() + (directory / name).read_bytes())
    return h.hexdigest()


def provenance(plan: MergePlan) -> dict:
    from openrlhf_bai import __version__

    return {
        "recipe": plan.recipe.as_dict(),
        "recipe_hash": plan.recipe_hash,
        "output_dtype": plan.out_dtype,
        "openrlhf_bai_version": __version__,
        "inputs": [
            {"role": "base" if k == 0 else "sft", "path": c.path, "revision": c.revision,
             "file_sizes": c.file_sizes, "fingerprint": c.fingerprint}
            for k, c in enumerate(plan.inputs)
        ],
    }
