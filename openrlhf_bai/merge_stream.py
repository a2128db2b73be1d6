"""Streaming the BAI arithmetic: the merged checkpoint written into a directory, tensor slice by tensor slice.

write_merge(plan, out, progress, threads)   every shard of the plan, then the checkpoint's other files (index,
                                            config, generation config, tokenizer, provenance) into directory `out`
output_files(plan), output_size(plan)       those other files, and the exact bytes the whole checkpoint takes

The arithmetic is `recipe.combine_rows`; the reads and writes are checkpoint_io's pread/pwrite. Nothing here knows
where `out` ends up (atomic_dir renames it into place).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np

from openrlhf_bai import checkpoint_io as io
from openrlhf_bai.errors import BAIError
from openrlhf_bai.merge_plan import PROVENANCE, MergePlan, TensorPlan, provenance, some
from openrlhf_bai.recipe import BAIRecipe, combine_rows, to_fp32

CHUNK_ELEMENTS = 1 << 19  # slices of 512K elements: ~7 MB per thread stays in L3, and few enough slices that
# the per-slice Python cost stays small (measured best of 128K..1M on the benchmark)
# Each thread holds ~14 bytes per slice element (its reads and fp32 work space): 64 threads stay under 0.5 GiB,
# and 64 cores merge faster than any disk delivers the inputs.
MAX_THREADS = 64


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def output_files(plan: MergePlan) -> dict[str, bytes | Path]:
    """The merged checkpoint's files besides its shards: bytes to write, or the input file to copy."""
    files: dict[str, bytes | Path] = {}
    if len(plan.shards) > 1:
        weight_map = {t.name: shard for shard, entries in plan.shards for t in entries}
        files[io.INDEX_NAME] = json_bytes({"metadata": {"total_size": plan.bytes_to_write}, "weight_map": weight_map})
    config = dict(plan.inputs[plan.config_src].config)
    if config.get("tie_word_embeddings") and any(t.name == "lm_head.weight" for t in plan.tensors):
        config["tie_word_embeddings"] = False  # tied and untied inputs merge into a model with its own head
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = {
        "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[plan.out_dtype]
    files["config.json"] = json_bytes(config)
    sources = [(plan.config_src, "generation_config.json")] + [(plan.tokenizer_src, n) for n in io.TOKENIZER_FILES]
    for src, name in sources:
        if (plan.inputs[src].directory / name).is_file():
            files[name] = plan.inputs[src].directory / name
    files[PROVENANCE] = json_bytes(provenance(plan))
    return files


def output_size(plan: MergePlan) -> int:
    """Bytes of every file of the merged checkpoint: what the disk must have free."""
    shards = sum(len(_header(entries)) + sum(io.nbytes(t.shape, t.dtype) for t in entries)
                 for _, entries in plan.shards)
    return shards + sum(len(v) if isinstance(v, bytes) else v.stat().st_size for v in output_files(plan).values())


def _header(entries: list[TensorPlan]) -> bytes:
    return io.safetensors_header([(t.name, t.shape, t.dtype) for t in entries])


def write_merge(plan: MergePlan, out: Path, progress: bool, threads: int) -> None:
    """Every shard: its header, then slices of ~CHUNK_ELEMENTS elements merged by a thread pool, each written with
    pwrite at its final offset, so the bytes do not depend on the thread count or the order slices finish in.
    At most 2 slices per thread are in flight: memory stays a few MB per thread whatever the model size."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    update = close = lambda *_: None
    if progress:  # imported only then: tqdm's import is a tenth of a small merge
        from tqdm import tqdm

        bar = tqdm(total=plan.bytes_to_write, unit="B", unit_scale=True, unit_divisor=1024, desc="BAI merge",
                   disable=None)  # None: off when stderr is no terminal
        update, close = bar.update, bar.close
    fds, pending = [], deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="bai-merge")
    try:
        for shard_name, entries in plan.shards:
            fds.append(os.open(out / shard_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            header = _header(entries)
            io.write_at(fds[-1], header, 0)
            offset = len(header)
            for run in _runs(plan, entries):
                numel = sum(io.nbytes(t.shape, "U8") for t in run)
                # Slices of whole rows where rows matter (copied tensors, rows only some inputs have).
                row = 1 if _elementwise(run) else io.row_numel(run[0].shape)
                step = max(1, CHUNK_ELEMENTS // row) * row
                for start in range(0, numel, step):
                    if len(pending) >= 2 * threads:  # slices are alike: waiting for the oldest keeps all threads busy
                        update(pending.popleft().result())
                    pending.append(pool.submit(_merge_slice, plan, run, start, min(start + step, numel), fds[-1],
                                               offset))
                offset += numel * np.dtype(io.DTYPES[run[0].dtype]).itemsize
        while pending:
            update(pending.popleft().result())
    finally:
        pool.shutdown(cancel_futures=True)  # waits for the running slices, so nothing writes after the cleanup
        for fd in fds:
            os.close(fd)
    close()
    for name, content in output_files(plan).items():
        if isinstance(content, bytes):
            (out / name).write_bytes(content)
        else:
            shutil.copyfile(content, out / name)


def _elementwise(run: list[TensorPlan]) -> bool:
    return run[0].merged and len(set(run[0].rows)) == 1


def _runs(plan: MergePlan, entries: list[TensorPlan]):
    """The shard's tensors in runs merged as one flat array: the arithmetic is elementwise and does not care where
    a tensor ends, so an MoE checkpoint's thousands of small tensors cost no more than a few big ones. A run grows
    while every input stores the next tensor right after the previous one in the same file and dtype. Tensors
    copied from the config source, or with rows only some inputs have, go alone."""
    run = []
    for t in entries:
        if run and not (_elementwise([t]) and all(_follows(c, run[-1].name, t.name) for c in plan.inputs)):
            yield run
            run = []
        run.append(t)
        if not _elementwise(run):
            yield run
            run = []
    if run:
        yield run


def _follows(ckpt: io.Checkpoint, before: str, name: str) -> bool:
    a, b = ckpt.tensors[before], ckpt.tensors[name]
    return a.file == b.file and a.dtype == b.dtype and b.offset == a.offset + io.nbytes(a.shape, a.dtype)


def _merge_slice(plan: MergePlan, run: list[TensorPlan], start: int, stop: int, fd: int, offset: int) -> int:
    """Elements [start, stop) of a run, merged and written at their place in the shard (run at `offset`); returns
    the bytes written. Runs in a pool thread: NumPy and pread/pwrite release the GIL."""
    inputs, first, n = plan.inputs, run[0], stop - start
    if _elementwise(run):
        infos = [c.tensors[first.name] for c in inputs]
        rows = [io.read_at(c, i.file, i.offset + start * np.dtype(io.DTYPES[i.dtype]).itemsize, i.dtype, n, first.name,
                           _buffer(k, n * 8)) for k, (c, i) in enumerate(zip(inputs, infos))]
        chunk, finite = combine_rows(rows, [i.dtype for i in infos], list(range(len(inputs))), plan.recipe.alpha,
                                     plan.recipe.weights(), first.dtype, _buffer("fp32", n * 8).view(np.float32))
        if not finite:  # which tensor: merge each one in the slice by itself, which names it
            begin = 0
            for t in run:
                size, row = io.nbytes(t.shape, "U8"), io.row_numel(t.shape)
                if begin < stop and start < begin + size:
                    _merge_rows(inputs, t, max(0, start - begin) // row, -(-(min(stop, begin + size) - begin) // row),
                                plan.recipe)
                begin += size
            raise BAIError(f"non-finite values after merging {some(t.name for t in run)}")
    else:
        row = io.row_numel(first.shape)
        if first.merged:
            chunk = _merge_rows(inputs, first, start // row, stop // row, plan.recipe)
        else:
            chunk = io.read_rows(inputs[plan.config_src], first.name, start // row, stop // row)
    io.write_at(fd, chunk, offset + start * chunk.itemsize)
    return chunk.nbytes


_THREAD = threading.local()


def _buffer(key, nbytes: int) -> np.ndarray:
    """This thread's reusable buffer `key`, at least nbytes: a slice allocates nothing, since fresh memory from the
    OS (page faults, zeroing) costs more than the arithmetic on it."""
    buffers = _THREAD.__dict__
    if key not in buffers or buffers[key].nbytes < nbytes:
        buffers[key] = np.empty(nbytes, np.uint8)
    return buffers[key][:nbytes]


def _merge_rows(inputs, t: TensorPlan, start: int, stop: int, recipe: BAIRecipe) -> np.ndarray:
    """Merged rows [start, stop) of one tensor. Rows only some inputs have (a grown vocabulary) are merged
    over those inputs with their weights renormalized; the range is cut where the set of owners changes."""
    pieces, cut = [], start
    for edge in sorted({r for r in t.rows if start < r < stop} | {stop}):
        owners = [k for k, r in enumerate(t.rows) if r >= edge]
        chunk, finite = combine_rows(
            [io.read_rows(inputs[k], t.name, cut, edge) for k in owners],
            [inputs[k].tensors[t.name].dtype for k in owners], owners, recipe.alpha, recipe.weights(), t.dtype,
        )
        if not finite:
            _raise_non_finite(inputs, owners, t, cut, edge)
        pieces.append(chunk)
        cut = edge
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _raise_non_finite(inputs, owners, t: TensorPlan, start: int, stop: int):
    for k in owners:
        rows = io.read_rows(inputs[k], t.name, start, stop)
        if not np.isfinite(to_fp32(rows, inputs[k].tensors[t.name].dtype, np.empty(rows.size, np.float32))).all():
            raise BAIError(f"non-finite values (NaN or Inf) in tensor {t.name} of {inputs[k].label}")
    raise BAIError(f"tensor {t.name} overflows {t.dtype} after merging; choose a wider --dtype")
