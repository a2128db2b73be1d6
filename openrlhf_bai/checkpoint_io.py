"""Checkpoint I/O, kept apart from the merge arithmetic.

- `open_checkpoint`: resolve a local directory or hub id and read config.json and every safetensors header
  (no tensor data), refusing pickle-only checkpoints, truncated shards and index entries that leave the directory.
- `read_rows` / `read_at`: rows of one tensor, or elements at a byte offset, read on demand with pread; nothing else
  of the model is in memory. `write_at`: pwrite, so several threads fill one output shard.
- `safetensors_header`: a shard is written as its header followed by tensor bytes in order, so
  the writer never holds a whole tensor, let alone a whole model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from openrlhf_bai.errors import BAIError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt", "chat_template.jinja", "chat_template.json",
)
HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
# safetensors dtype -> numpy storage type. bf16 has no numpy type: its values travel as their raw 16 bits.
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FLOATS = ("F64", "F32", "F16", "BF16")
_ITEMSIZE = {k: np.dtype(v).itemsize for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_SAMPLE = 64 * 1024  # bytes of tensor data hashed at each end of a shard for the fingerprint
_OPEN_LOCK = threading.Lock()


@dataclass(slots=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors name: BF16, F16, F32, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`


@dataclass
class Checkpoint:
    label: str  # e.g. "sft[2] (/models/reasoning)": how errors name this input
    path: str  # as the user gave it
    directory: Path
    revision: str | None  # hub commit, for hub ids
    config: dict
    tensors: dict[str, TensorInfo]
    file_sizes: dict[str, int]
    fingerprint: str = ""
    _files: dict = field(default_factory=dict, repr=False)  # open descriptors, by path


def resolve_directory(path: str) -> tuple[Path, str | None]:
    """A local checkpoint directory (a symlink to one is followed), or a hub id resolved with huggingface_hub, which
    with HF_HUB_OFFLINE=1 serves its local cache: the snapshot directory, whose files are symlinks into blobs/."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local.resolve(), None
    if local.exists():
        raise BAIError(f"{path} is a file; expected a checkpoint directory")
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise BAIError(f"checkpoint not found: {path}")
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(path, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline without a cached copy, unknown repo, no network: all "not found" to the user
        raise BAIError(f"checkpoint not found: {path} is no local directory and no reachable hub id "
                       f"({type(e).__name__})")
    return snapshot, snapshot.name


def read_json_object(file: Path, what: str) -> dict:
    """A JSON object in UTF-8 (config.json, the shard index), or one BAIError line naming the file."""
    try:
        value = json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise BAIError(f"no {file.name} in {file.parent}") from None
    except UnicodeDecodeError:
        raise BAIError(f"{file}: corrupt {what} (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise BAIError(f"{file}: corrupt {what} (not JSON: {e.msg} at line {e.lineno})") from None
    if not isinstance(value, dict):
        raise BAIError(f"{file}: corrupt {what} (a JSON {type(value).__name__}, not an object)")
    return value


def read_header(file: Path) -> tuple[dict, bytes, int]:
    """(header dict without metadata, raw header bytes, data start offset), after `check_header`."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise BAIError(f"{file}: truncated or corrupt safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > min(_MAX_HEADER, size - 8):
            raise BAIError(f"{file}: truncated or corrupt safetensors file (header length {n} exceeds the file)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BAIError(f"{file}: corrupt safetensors header (not JSON)") from None
    check_header(file, header, size - 8 - n)
    header.pop("__metadata__", None)
    return header, raw, 8 + n


def check_header(file: Path, header, data_size: int) -> None:
    """What the safetensors format guarantees, checked before a byte of data is read (one BAIError line naming the
    file and the tensor): a JSON object of entries, each with a known string dtype, a shape of non-negative ints and
    two int data_offsets; each tensor's byte span equal to its numel x itemsize; the spans, in offset order, tiling
    the data from 0 to the end of the file without gap or overlap."""
    if not isinstance(header, dict):
        raise BAIError(f"{file}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BAIError(f"{file}: corrupt safetensors header (__metadata__ is not an object of strings)")
    spans = []
    for name, v in header.items():
        if name == "__metadata__":
            continue
        # The common, well-formed entry costs a few type tests (a 47k-tensor checkpoint is planned in well under a
        # second); anything else goes to _check_entry, which names what is wrong.
        try:
            begin, end = v["data_offsets"]
            size = _ITEMSIZE[v["dtype"]]
            for d in v["shape"]:
                if type(d) is not int or d < 0:
                    raise TypeError
                size *= d
            if type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= data_size:
                raise TypeError
            if end - begin != size:
                raise TypeError
        except (TypeError, KeyError, ValueError):
            _check_entry(file, name, v, data_size)
            raise BAIError(f"{file}: tensor {name}: corrupt header entry {v!r}")
        spans.append((begin, end, name))
    spans.sort()
    position, previous = 0, None
    for begin, end, name in spans:
        if begin < position:
            raise BAIError(f"{file}: tensor {name}: data_offsets [{begin}, {end}] overlap tensor {previous}")
        if begin > position:
            raise BAIError(f"{file}: tensor {name}: {begin - position} bytes before its data_offsets "
                           "belong to no tensor")
        position, previous = end, name
    if position != data_size:
        raise BAIError(f"{file}: truncated or corrupt safetensors file (header describes {position} data bytes, "
                       f"file has {data_size})")


def _check_entry(file: Path, name: str, v, data_size: int) -> None:
    """Raise the BAIError that says what is wrong with one header entry."""
    where = f"{file}: tensor {name}"
    if not isinstance(v, dict):
        raise BAIError(f"{where}: corrupt header entry (a JSON {type(v).__name__}, not an object)")
    dtype, shape, offsets = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if not isinstance(dtype, str):
        raise BAIError(f"{where}: corrupt header entry (dtype {dtype!r} is not a string)")
    if dtype not in DTYPES:
        raise BAIError(f"{where} has unsupported dtype {dtype} (readable: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise BAIError(f"{where}: corrupt header entry (shape {shape!r} is not a list of non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise BAIError(f"{where}: corrupt header entry (data_offsets {offsets!r} are not two integers)")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise BAIError(f"{where}: corrupt header entry (data_offsets [{begin}, {end}] are not a byte range)")
    if end > data_size:
        raise BAIError(f"{file}: truncated or corrupt safetensors file (tensor {name} ends at data byte {end}, "
                       f"the file has {data_size})")
    if end - begin != nbytes(tuple(shape), dtype):
        raise BAIError(f"{where}: shape {shape} of {dtype} is {nbytes(tuple(shape), dtype)} bytes, but its "
                       f"data_offsets span {end - begin}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shards(directory: Path, label: str) -> dict[Path, list[str] | None]:
    """Each shard file with the tensors the index assigns to it (None: a single-file checkpoint). An index entry must
    name a file of the checkpoint directory: a relative path without `..`. The file may be a symlink anywhere, as
    huggingface_hub's cache keeps them (snapshots/<commit>/NAME -> ../../blobs/<sha256>): the check is about what
    the index names, not where the bytes live. Each shard is looked up once, whatever the number of tensors."""
    index_file = directory / INDEX_NAME
    if index_file.exists():
        weight_map = read_json_object(index_file, "index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise BAIError(f"{index_file}: corrupt index (no weight_map object)")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise BAIError(f"{index_file}: corrupt index (weight_map entry {name!r} is {shard!r}, not a file name)")
            by_shard.setdefault(shard, []).append(name)
        shards = {}
        for shard, names in by_shard.items():
            parts = PurePosixPath(shard).parts
            if not parts or os.path.isabs(shard) or ".." in parts or "\\" in shard:
                raise BAIError(f"{label}: index entry {names[0]!r} points outside the checkpoint directory: {shard}")
            if not (directory / shard).is_file():
                raise BAIError(f"{label}: shard {shard} listed in {INDEX_NAME} is missing")
            shards[directory / shard] = names
        return shards
    if (directory / SINGLE_NAME).exists():
        return {directory / SINGLE_NAME: None}
    if any((directory / n).exists() for n in PICKLE_NAMES) or list(directory.glob("*.bin")):
        raise BAIError(
            f"{label}: only pickle weights (*.bin / *.pt) in {directory}; openrlhf-bai reads safetensors only. "
            "Convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)"
        )
    raise BAIError(f"{label}: no {SINGLE_NAME} or {INDEX_NAME} in {directory}")


def open_checkpoint(path: str, label: str) -> Checkpoint:
    """Read config.json and all safetensors headers of one input; reads no tensor data except fingerprint samples.
    The tensors are those the shards hold (as transformers loads them); each one the index lists must be in the
    shard it names. A tensor stored in two shards is refused: the index names one copy, while transformers loads
    whichever shard comes later, so which one is the model is not defined."""
    directory, revision = resolve_directory(path)
    shards = _shards(directory, label)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise BAIError(f"{label}: no config.json in {directory}")
    config = read_json_object(config_file, "config.json")

    digest = hashlib.sha256(config_file.read_bytes())
    tensors, sizes = {}, {}
    for file in sorted(shards):
        header, raw, start = read_header(file)
        expected = shards[file]
        if expected is not None and not set(expected) <= header.keys():
            missing = sorted(set(expected) - header.keys())
            raise BAIError(f"{file}: tensor {missing[0]} is listed in the index for this shard but missing from it"
                           + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        for name, v in header.items():
            if name in tensors:
                raise BAIError(f"{label}: tensor {name} is stored twice, in {tensors[name].file.name} and {file.name};"
                               " which copy is the model is not defined")
            tensors[name] = TensorInfo(file, v["dtype"], tuple(v["shape"]), start + v["data_offsets"][0])
        sizes[file.name] = start + header_data_size(header)
        # Headers and sizes alone cannot tell a fine-tune from its base; a sample of the data can.
        with open(file, "rb") as f:
            digest.update(file.name.encode() + raw + f.read(_SAMPLE))
            f.seek(max(start, sizes[file.name] - _SAMPLE))
            digest.update(f.read(_SAMPLE))
    if not any(t.dtype in FLOATS for t in tensors.values()):
        raise BAIError(f"{label}: no floating-point tensor ({', '.join(FLOATS)}) in {directory}; nothing to merge")
    return Checkpoint(label, path, directory, revision, config, tensors, sizes, digest.hexdigest())


def header_data_size(header: dict) -> int:
    return max((v["data_offsets"][1] for v in header.values()), default=0)


def read_rows(ckpt: Checkpoint, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor (dim 0; a 0-d tensor is one row), flat."""
    info = ckpt.tensors[name]
    n = row_numel(info.shape)
    return read_at(ckpt, info.file, info.offset + start * n * np.dtype(DTYPES[info.dtype]).itemsize, info.dtype,
                   (stop - start) * n, name)


def read_at(ckpt: Checkpoint, file: Path, offset: int, dtype: str, count: int, name: str,
            buffer: np.ndarray | None = None) -> np.ndarray:
    """`count` elements of `dtype` at byte `offset` of one of the checkpoint's files, read with pread into `buffer`
    (uint8, large enough) or a new array. Plain reads rather than a memory map: mapped pages would count in the
    process's RSS for the whole merge. pread has no file position, so the merge's threads share one descriptor."""
    size = count * np.dtype(DTYPES[dtype]).itemsize
    out = np.empty(count, dtype=DTYPES[dtype]) if buffer is None else buffer[:size].view(DTYPES[dtype])
    if out.size:
        with _OPEN_LOCK:
            if file not in ckpt._files:
                ckpt._files[file] = os.open(file, os.O_RDONLY)
        if os.preadv(ckpt._files[file], [out], offset) != out.nbytes:
            raise BAIError(f"{file}: truncated while reading tensor {name} (file changed during the merge?)")
    return out


def write_at(fd: int, data, offset: int) -> None:
    """All of `data` at byte `offset` of an open file (pwrite: the merge's threads write one shard side by side)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def close(ckpt: Checkpoint) -> None:
    for fd in ckpt._files.values():
        os.close(fd)
    ckpt._files.clear()


def row_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def rows_of(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return _ITEMSIZE[dtype] * math.prod(shape)


def safetensors_header(entries: list[tuple[str, tuple[int, ...], str]]) -> bytes:
    """The 8-byte length and JSON header of a shard holding `entries` in order (metadata format=pt)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        size = nbytes(shape, dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns tensor data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 (decimal units as in transformers), '2GiB' -> 2**31, or plain bytes."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    s = str(text).strip().upper()
    for unit, factor in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise BAIError(f"bad size {text!r}: use e.g. 5GB, 500MB or 2GiB")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
