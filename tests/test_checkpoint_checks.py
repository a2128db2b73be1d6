"""Each check on an input checkpoint, one test per rule, on real safetensors files whose headers were edited by hand:
`merge` exits 1 with one line naming the file (and the tensor), writes nothing, and leaves the input as it was.
Where the rule is one of the safetensors format's, the safetensors library refuses the same file."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from openrlhf_bai.cli.main import main as cli

BAD = "model.safetensors"
NAME = "model.layers.0.self_attn.q_proj.weight"  # 64 x 64 bf16: 8192 bytes
OTHER = "model.layers.0.self_attn.o_proj.weight"  # the same size, stored just before NAME


def edit_header(file: Path, edit) -> None:
    """Rewrite a real safetensors file's JSON header through edit(header) -> header (or raw bytes); data unchanged."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    new = edit(json.loads(data[8:8 + n]))
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def entry(name, **change):
    def edit(h):
        h[name] = {**h[name], **change} if change else h[name]
        return h

    return edit


def set_entry(name, value):
    def edit(h):
        h[name] = value
        return h

    return edit


def overlap(h):  # a tensor declared at the bytes of the one stored before it
    h[NAME]["data_offsets"] = h[OTHER]["data_offsets"]
    return h


def gap(h):  # a tensor dropped from the header: its bytes belong to no tensor
    del h[NAME]
    return h


def later(h):  # every tensor's data declared one element later than it is: the last one leaves the file
    for v in h.values():
        if isinstance(v, dict) and "data_offsets" in v:
            v["data_offsets"] = [o + 2 for o in v["data_offsets"]]
    return h


HEADER_RULES = {
    "header is a JSON object": (lambda h: list(h), ["model.safetensors", "a JSON list, not an object"]),
    "header is UTF-8 JSON": (lambda h: b'{"a": "\xff"}', ["model.safetensors", "not JSON"]),
    "metadata is an object of strings": (lambda h: {**h, "__metadata__": {"format": 1}}, ["__metadata__"]),
    "entry is an object": (set_entry(NAME, [1, 2]), [NAME, "a JSON list, not an object"]),
    "dtype is a string": (lambda h: {**h, NAME: {k: v for k, v in h[NAME].items() if k != "dtype"}},
                          [NAME, "dtype None is not a string"]),
    "dtype is known": (entry(NAME, dtype="X9"), [NAME, "unsupported dtype X9"]),
    "shape is a list of ints": (entry(NAME, shape="64x64"), [NAME, "shape '64x64' is not a list"]),
    "shape has no negative dims": (entry(NAME, shape=[-64, -64]), [NAME, "not a list of non-negative integers"]),
    "data_offsets are two ints": (entry(NAME, data_offsets=["0", "8192"]), [NAME, "are not two integers"]),
    "data_offsets are a byte range": (entry(NAME, data_offsets=[-8, 8184]), [NAME, "not a byte range"]),
    "size is numel x itemsize": (entry(NAME, shape=[64, 32]), [NAME, "is 4096 bytes, but its data_offsets span 8192"]),
    "offsets do not overlap": (overlap, [NAME, f"overlap tensor {OTHER}"]),
    "offsets leave no gap": (gap, ["8192 bytes before its data_offsets belong to no tensor"]),
    "offsets stay in the file": (later, ["truncated or corrupt", "ends at data byte"]),
}


@pytest.fixture
def damaged(llama_family, tmp_path):
    """A copy of sft_reasoning to damage, and a function merging base, sft_instruct and it: (code, stderr)."""
    bad = tmp_path / "bad"
    shutil.copytree(llama_family["sft_reasoning"], bad)

    def merge(capsys):
        before = {p.name: p.read_bytes() for p in bad.iterdir()}
        code = cli(["merge", "--no-progress", "--base", str(llama_family["base"]), "--sft",
                    str(llama_family["sft_instruct"]), str(bad), "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and err.startswith("openrlhf-bai: error: "), err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
        assert {p.name: p.read_bytes() for p in bad.iterdir()} == before  # the input is never written
        return err

    return bad, merge


@pytest.mark.parametrize("rule", sorted(HEADER_RULES))
def test_safetensors_header_rule(rule, damaged, capsys):
    bad, merge = damaged
    edit, words = HEADER_RULES[rule]
    edit_header(bad / BAD, edit)
    with pytest.raises(Exception):  # the format's own reader refuses the file too
        with safe_open(str(bad / BAD), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    err = merge(capsys)
    assert str(bad / BAD) in err and all(w in err for w in words), err


def test_data_past_what_the_header_describes(damaged, capsys):
    bad, merge = damaged
    with open(bad / BAD, "ab") as f:
        f.write(b"\0" * 16)
    err = merge(capsys)
    assert str(bad / BAD) in err and "header describes" in err and "file has" in err


# --- sharded checkpoints: the index --------------------------------------------------------------------------------


def shard_in_two(d: Path) -> tuple[Path, Path]:
    """d's single file split into two shards with an index, as transformers' save_pretrained lays them out."""
    sd = load_file(str(d / BAD))
    (d / BAD).unlink()
    names = list(sd)
    files = (d / "model-00001-of-00002.safetensors", d / "model-00002-of-00002.safetensors")
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    for f, half in zip(files, halves):
        save_file({n: sd[n] for n in half}, str(f), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
             "weight_map": {n: f.name for f, half in zip(files, halves) for n in half}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def edit_index(d: Path, edit) -> None:
    index_file = d / "model.safetensors.index.json"
    new = edit(json.loads(index_file.read_text()))
    index_file.write_bytes(new if isinstance(new, bytes) else json.dumps(new).encode())


def test_sharded_copy_merges(damaged, llama_family, tmp_path, capsys):
    """The two-shard layout the index tests start from is itself fine."""
    bad, _ = damaged
    shard_in_two(bad)
    assert cli(["merge", "--no-progress", "--base", str(llama_family["base"]), "--sft",
                str(llama_family["sft_instruct"]), str(bad), "--output", str(tmp_path / "ok")]) == 0


def test_weight_map_values_are_file_names(damaged, capsys):
    bad, merge = damaged
    shard_in_two(bad)
    edit_index(bad, lambda i: {**i, "weight_map": {**i["weight_map"], NAME: 1}})
    err = merge(capsys)
    assert "model.safetensors.index.json" in err and NAME in err and "not a file name" in err


def test_index_is_an_object_with_a_weight_map(damaged, capsys):
    bad, merge = damaged
    shard_in_two(bad)
    edit_index(bad, lambda i: {"metadata": i["metadata"]})
    err = merge(capsys)
    assert "model.safetensors.index.json" in err and "no weight_map object" in err


@pytest.mark.parametrize("shard", ["/etc/model.safetensors", "../elsewhere/model.safetensors"])
def test_index_names_a_file_inside_the_checkpoint(shard, damaged, capsys):
    bad, merge = damaged
    shard_in_two(bad)
    edit_index(bad, lambda i: {**i, "weight_map": {**i["weight_map"], NAME: shard}})
    err = merge(capsys)
    assert "outside the checkpoint directory" in err and NAME in err and shard in err


def test_every_index_entry_is_in_the_shard_it_names(damaged, capsys):
    bad, merge = damaged
    first, second = shard_in_two(bad)
    # The index moves a tensor of the first shard to the second, which does not hold it.
    name = next(n for n, f in json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"].items()
                if f == first.name)
    edit_index(bad, lambda i: {**i, "weight_map": {**i["weight_map"], name: second.name}})
    err = merge(capsys)
    assert str(second) in err and name in err and "listed in the index for this shard but missing" in err


def test_a_tensor_stored_in_two_shards_is_refused(damaged, capsys):
    """The index names one copy, transformers would load the later shard's: which one is the model is undefined."""
    bad, merge = damaged
    first, second = shard_in_two(bad)
    sd = load_file(str(second))
    name = next(iter(load_file(str(first))))
    sd[name] = torch.zeros_like(load_file(str(first))[name])
    save_file(sd, str(second), metadata={"format": "pt"})
    err = merge(capsys)
    assert name in err and "stored twice" in err and first.name in err and second.name in err


# --- config.json and dtypes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, words", [
    (b"[1, 2]", "a JSON list, not an object"),
    ('{"model_type": "llama\u00e9"}'.encode("latin-1"), "not UTF-8 text"),
    (b"{'model_type': 'llama'}", "not JSON"),
])
def test_config_json_is_a_json_object_in_utf8(content, words, damaged, capsys):
    bad, merge = damaged
    (bad / "config.json").write_bytes(content)
    err = merge(capsys)
    assert str(bad / "config.json") in err and words in err


def test_an_input_without_a_float_tensor_is_refused(damaged, capsys):
    bad, merge = damaged
    sd = load_file(str(bad / BAD))
    save_file({n: t.to(torch.int16) for n, t in sd.items()}, str(bad / BAD), metadata={"format": "pt"})
    err = merge(capsys)
    assert "sft[2]" in err and "no floating-point tensor" in err and str(bad) in err
