"""The BAI merge, read top to bottom: plan (every check, before any tensor is read), then stream.

plan_merge(recipe)      open each input's headers, check architecture / names / shapes / vocab rows, lay out shards
merge(recipe, out)      take a file lock, remove what killed merges into `out` left behind, reuse a finished
                        identical merge, else stream slices of the tensors through `recipe.combine_rows` on a thread
                        pool into shards in a temporary directory beside `out`, then rename it in
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openrlhf_bai import checkpoint_io as io
from openrlhf_bai.errors import BAIError
from openrlhf_bai.recipe import DTYPES, BAIRecipe, combine_rows, to_fp32

PROVENANCE = "bai_recipe.json"
CHUNK_ELEMENTS = 1 << 19  # slices of 512K elements: ~7 MB per thread stays in L3, and few enough slices that
# the per-slice Python cost stays small (measured best of 128K..1M on the benchmark)
# Each thread holds ~14 bytes per slice element (its reads and fp32 work space): 64 threads stay under 0.5 GiB,
# and 64 cores merge faster than any disk delivers the inputs.
MAX_THREADS = 64
FORMAT_VERSION = 1  # bump when the output bytes for the same recipe would change


@dataclass
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

    @property
    def bytes_to_read(self) -> int:
        return sum(io.nbytes((r, *t.shape[1:]) if t.shape else (), c.tensors[t.name].dtype)
                   for t in self.tensors for c, r in zip(self.inputs, t.rows))

    @property
    def bytes_to_write(self) -> int:
        return sum(io.nbytes(t.shape, t.dtype) for t in self.tensors)


def _labels(recipe: BAIRecipe) -> list[str]:
    return [f"base ({recipe.base})"] + [f"sft[{i + 1}] ({p})" for i, p in enumerate(recipe.sft)]


def _some(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _is_vocab_tensor(name: str, shapes: list[tuple], inputs: list[io.Checkpoint]) -> bool:
    """A tensor whose row count is each input's vocab_size (embeddings, lm_head) and whose other dims agree."""
    return all(s[1:] == shapes[0][1:] and len(s) == len(shapes[0]) for s in shapes) and all(
        s and s[0] == c.config.get("vocab_size") for s, c in zip(shapes, inputs)
    )


def plan_merge(recipe: BAIRecipe) -> MergePlan:
    """Every check the merge needs, reading only configs and safetensors headers."""
    recipe.validate()
    labels = _labels(recipe)
    paths = recipe.inputs()
    inputs = [io.open_checkpoint(p, label) for p, label in zip(paths, labels)]
    config_src = paths.index(recipe.config_from or recipe.sft[0])
    tokenizer_src = paths.index(recipe.tokenizer_from or recipe.sft[0])

    base = inputs[0]
    arch = (base.config.get("architectures"), base.config.get("model_type"))
    for c in inputs[1:]:
        other = (c.config.get("architectures"), c.config.get("model_type"))
        if other != arch:
            raise BAIError(f"architecture differs: {base.label} is {arch[0]} ({arch[1]}), {c.label} is {other[0]} ({other[1]})")

    # Tied embeddings: lm_head is the embedding, so a copy that only some inputs saved is dropped.
    names_per_input = [set(c.tensors) for c in inputs]
    if inputs[config_src].config.get("tie_word_embeddings", False):
        names_per_input = [n - {"lm_head.weight"} for n in names_per_input]
    for c, names in zip(inputs[1:], names_per_input[1:]):
        if names != names_per_input[0]:
            raise BAIError(
                f"tensor names differ between {base.label} and {c.label}: "
                f"only in base: {_some(names_per_input[0] - names) or '-'}; only in {c.label.split()[0]}: {_some(names - names_per_input[0]) or '-'}"
            )

    if recipe.dtype == "auto":
        float_dtypes = [t.dtype for t in base.tensors.values() if t.dtype in io.FLOATS]
        out_dtype = {v: k for k, v in DTYPES.items()}.get(max(set(float_dtypes), key=float_dtypes.count), "fp32")
    else:
        out_dtype = recipe.dtype

    tensors = []
    for name in sorted(names_per_input[0]):
        infos = [c.tensors[name] for c in inputs]
        shapes = [i.shape for i in infos]
        if any(s != shapes[0] for s in shapes):
            if not _is_vocab_tensor(name, shapes, inputs):
                k = next(k for k, s in enumerate(shapes) if s != shapes[0])
                raise BAIError(f"shape mismatch for tensor {name}: {list(shapes[0])} in {base.label}, {list(shapes[k])} in {inputs[k].label}")
            if recipe.vocab_mismatch == "error":
                rows = ", ".join(f"{s[0]} in {c.label.split()[0]}" for s, c in zip(shapes, inputs))
                raise BAIError(
                    f"vocabulary sizes differ: {name} has {rows} rows (an SFT model added tokens); pass "
                    "--vocab-mismatch renormalize (launcher: --bai.vocab_mismatch) to merge each row over the inputs "
                    "that have it"
                )
        merged = all(i.dtype in io.FLOATS for i in infos)
        out_shape = shapes[config_src]
        tensors.append(TensorPlan(name, out_shape, DTYPES[out_dtype] if merged else infos[config_src].dtype,
                                  tuple(io.rows_of(s) for s in shapes), merged))

    # Shards as transformers lays them out: close a shard when the next tensor would pass the limit.
    limit, shards, current, size = io.parse_size(recipe.max_shard_size), [], [], 0
    for t in tensors:
        n = io.nbytes(t.shape, t.dtype)
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
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return MergePlan(recipe, inputs, tensors, list(zip(names, shards)), out_dtype, config_src, tokenizer_src, digest)


def _tokenizer_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for name in io.TOKENIZER_FILES + ("generation_config.json",):
        if (directory / name).is_file():
            h.update(name.encode() + (directory / name).read_bytes())
    return h.hexdigest()


def recipe_hash(recipe: BAIRecipe) -> str:
    """Identifies the output: the recipe's numbers and a content fingerprint of every input."""
    return plan_merge(recipe).recipe_hash


def cache_root() -> Path:
    return Path(os.environ.get("OPENRLHF_BAI_CACHE", Path.home() / ".cache" / "openrlhf_bai")).expanduser()


def cache_dir_for(recipe: BAIRecipe, plan: MergePlan | None = None) -> Path:
    """Where the launcher and `probe` keep merged checkpoints, one directory per recipe hash."""
    plan = plan or plan_merge(recipe)
    return cache_root() / "merged" / f"bai-{plan.recipe_hash[:16]}"


def existing_merge_hash(output_dir: Path) -> str | None:
    try:
        return json.loads((output_dir / PROVENANCE).read_text())["recipe_hash"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def check_destination(output_dir: Path, plan: MergePlan, overwrite: bool) -> bool:
    """True if output_dir already holds this merge; raise if it holds something else and overwrite is off."""
    if output_dir.exists() and not output_dir.is_dir():
        raise BAIError(f"output {output_dir} exists and is not a directory")
    if existing_merge_hash(output_dir) == plan.recipe_hash:
        return True
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise BAIError(f"output directory {output_dir} exists and is not empty; pass --overwrite to replace it")
    return False


def existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


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
    from filelock import FileLock

    plan = plan or plan_merge(recipe)
    threads = min(MAX_THREADS, default_threads() if threads is None else threads)
    if threads < 1:
        raise BAIError(f"threads must be at least 1, got {threads}")
    output_dir = Path(output_dir).expanduser().absolute()
    if check_destination(output_dir, plan, overwrite) and not _leftovers(output_dir):
        return output_dir, True
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(output_dir.parent / f".{output_dir.name}.lock")):
        remove_stale(output_dir)  # before the disk check: a killed merge's leftovers may be what fills the disk
        if check_destination(output_dir, plan, overwrite):  # another process finished it while we waited
            return output_dir, True
        free = shutil.disk_usage(existing_parent(output_dir)).free
        if free < plan.bytes_to_write:
            raise BAIError(f"not enough disk for {output_dir}: {_size(plan.bytes_to_write)} needed, {_size(free)} free")
        # The owner in the name lets the next merge tell a dead merge's directory from a live one (remove_stale).
        owner = _owner_tag()
        tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-{owner}-", dir=output_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the checkpoint from other users of a shared FS
        # SIGTERM's default action would end the process without the cleanup below; as an exception it runs it.
        on_term = None
        if threading.current_thread() is threading.main_thread():
            on_term = signal.signal(signal.SIGTERM, _exit_on_signal)
        try:
            _write_merge(plan, tmp, progress, threads)
            if output_dir.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-{owner}-", dir=output_dir.parent))
                os.replace(output_dir, old / "d")
                os.replace(tmp, output_dir)
                shutil.rmtree(old)
            else:
                os.replace(tmp, output_dir)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(existing_parent(output_dir)).free
                raise BAIError(f"disk full while writing {output_dir}: the merge needs {_size(plan.bytes_to_write)}, "
                               f"{_size(free)} are free; nothing was left behind") from None
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                print(f"openrlhf-bai: merge into {output_dir} interrupted; its temporary directory was removed",
                      file=sys.stderr)
            raise
        finally:
            if on_term is not None:
                signal.signal(signal.SIGTERM, on_term)
            for c in plan.inputs:
                io.close(c)
    return output_dir, False


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


# --- leftovers of killed merges ------------------------------------------------------------------------------------
# A merge writes into .NAME.tmp-OWNER-XXXX beside the output (and moves a replaced output to .NAME.old-OWNER-XXXX);
# SIGKILL, an OOM kill or a power loss leaves them. OWNER = host-bootid-pid-starttime of the merging process.
STALE_FOREIGN_S = 600  # a directory of another host (or without owner) counts as dead after this long unwritten


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{_boot_id()}-{os.getpid()}-{_start_time(os.getpid())}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "0"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart); None if it is not running."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
    except IndexError:
        return "0"


def _leftovers(output_dir: Path) -> list[Path]:
    return [p for pattern in (".tmp-*", ".old-*") for p in output_dir.parent.glob(f".{output_dir.name}{pattern}")]


def _is_dead(leftover: Path, output_dir: Path) -> bool:
    """Called under the output's lock, which every merge into it holds while it writes: a leftover's owner is gone.
    Still checked, in case the lock does not reach across hosts (some shared filesystems keep locks node-local):
    on this host the owning process must be gone; of another host, the directory must have been unwritten for
    STALE_FOREIGN_S (a live merge writes continuously)."""
    host = socket.gethostname()
    for kind in (".tmp-", ".old-"):
        prefix = f".{output_dir.name}{kind}{host}-"
        owner = leftover.name[len(prefix):].split("-") if leftover.name.startswith(prefix) else []
        if len(owner) == 4:  # boot id, pid, start time, mkdtemp's random part
            if owner[0] != _boot_id():
                return True  # the host restarted since
            return not owner[1].isdigit() or _start_time(int(owner[1])) != owner[2]
    try:
        last_write = max([leftover.stat().st_mtime] + [f.stat().st_mtime for f in leftover.iterdir()])
    except OSError:
        return True
    return time.time() - last_write > STALE_FOREIGN_S


def remove_stale(output_dir: Path) -> None:
    """Remove the temporary directories of dead merges into output_dir (hold its lock); say how much was freed."""
    removed, freed = 0, 0
    for leftover in _leftovers(output_dir):
        if _is_dead(leftover, output_dir):
            freed += sum(f.stat().st_blocks * 512 for f in leftover.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(leftover, ignore_errors=True)
            removed += 1
    if removed:
        print(f"openrlhf-bai: removed {removed} temporary director{'y' if removed == 1 else 'ies'} of killed merges "
              f"into {output_dir}, {_size(freed)} freed", file=sys.stderr)


# --- the streaming write -------------------------------------------------------------------------------------------


def _write_merge(plan: MergePlan, out: Path, progress: bool, threads: int) -> None:
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
    weight_map, fds, pending = {}, [], deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="bai-merge")
    try:
        for shard_name, entries in plan.shards:
            fds.append(os.open(out / shard_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            header = io.safetensors_header([(t.name, t.shape, t.dtype) for t in entries])
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
            weight_map.update((t.name, shard_name) for t in entries)
        while pending:
            update(pending.popleft().result())
    finally:
        pool.shutdown(cancel_futures=True)  # waits for the running slices, so nothing writes after the cleanup
        for fd in fds:
            os.close(fd)
    close()

    if len(plan.shards) > 1:
        io.write_json(out / io.INDEX_NAME, {"metadata": {"total_size": plan.bytes_to_write}, "weight_map": weight_map})
    inputs = plan.inputs
    config = dict(inputs[plan.config_src].config)
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[plan.out_dtype]
    io.write_json(out / "config.json", config)
    src = inputs[plan.config_src].directory / "generation_config.json"
    if src.is_file():
        shutil.copyfile(src, out / "generation_config.json")
    for name in io.TOKENIZER_FILES:
        if (inputs[plan.tokenizer_src].directory / name).is_file():
            shutil.copyfile(inputs[plan.tokenizer_src].directory / name, out / name)
    io.write_json(out / PROVENANCE, provenance(plan))


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
            raise BAIError(f"non-finite values after merging {_some(t.name for t in run)}")
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
