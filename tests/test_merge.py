"""The BAI merge engine on small real checkpoints: arithmetic, formats, provenance, reuse, and every bad input."""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from openrlhf_bai import BAIRecipe, merge
from openrlhf_bai.cli.main import main as cli
from openrlhf_bai.errors import BAIError
from openrlhf_bai.toy import write_family, write_model


def state_dict(directory) -> dict:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def expected_bai(base, sfts, weights, alpha, dtype):
    """The paper's two stages written out plainly in fp32, cast once."""
    stage1 = sum(w * t.float() for w, t in zip(weights, sfts))
    return (alpha * base.float() + (1 - alpha) * stage1).to(dtype)


@pytest.fixture(scope="module")
def moe_family(tmp_path_factory):
    """Qwen2-MoE-like, tied embeddings, sharded into several files (the paper's models are MoE)."""
    return write_family(tmp_path_factory.mktemp("moe"), "qwen2_moe", tied=True, max_shard_size="100KB")


def copy_with(src: Path, dst: Path, edit) -> Path:
    """A copy of a single-file checkpoint whose state dict went through `edit`."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def run_cli(capsys, *args):
    code = cli(["merge", "--no-progress", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_each_element_is_the_two_stage_formula_cast_once(llama_family, tmp_path):
    f = llama_family
    recipe = BAIRecipe(base=f["base"], sft=(f["sft_instruct"], f["sft_reasoning"]), sft_weights=(0.7, 0.3), alpha=0.3)
    out = merge(recipe, tmp_path / "bai", progress=False)
    merged, base = state_dict(out), state_dict(f["base"])
    s1, s2 = state_dict(f["sft_instruct"]), state_dict(f["sft_reasoning"])
    assert merged.keys() == base.keys()
    for name, t in merged.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, expected_bai(base[name], [s1[name], s2[name]], [0.7, 0.3], 0.3, torch.bfloat16)), name
    # The result is a normal Hugging Face checkpoint: transformers loads it and it generates.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("Solve the equation", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


def test_sharded_tied_moe_merge_keeps_layout_and_loads(moe_family, tmp_path):
    f = moe_family
    recipe = BAIRecipe(base=f["base"], sft=(f["sft_instruct"], f["sft_reasoning"]), alpha=0.1, max_shard_size="100KB")
    out = merge(recipe, tmp_path / "bai", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        with safe_open(str(shard), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    merged = state_dict(out)
    assert "lm_head.weight" not in merged  # tied: lm_head is the embedding
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    base, s1, s2 = state_dict(f["base"]), state_dict(f["sft_instruct"]), state_dict(f["sft_reasoning"])
    name = next(n for n in merged if "experts" in n)
    assert torch.equal(merged[name], expected_bai(base[name], [s1[name], s2[name]], [0.5, 0.5], 0.1, torch.bfloat16))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.tie_word_embeddings and type(model).__name__ == "Qwen2MoeForCausalLM"


def test_tied_and_untied_inputs_merge_into_an_untied_model(tmp_path):
    # The paper's recipe on public 1.5B models: Qwen2.5-Math-1.5B (the base) and -Instruct tie lm_head to the
    # embedding, DeepSeek-R1-Distill-Qwen-1.5B stores its own. A tied model's output head is its embedding.
    from transformers import AutoModelForCausalLM

    from openrlhf_bai.toy import model_config, write_tokenizer

    vocab = write_tokenizer(tmp_path / "tok")
    tied, untied = model_config("qwen2", vocab, tied=True), model_config("qwen2", vocab, tied=False)
    base = write_model(tmp_path / "base", tied, tokenizer_dir=tmp_path / "tok")
    distill = write_model(tmp_path / "distill", untied, finetune_seed=1, tokenizer_dir=tmp_path / "tok")
    instruct = write_model(tmp_path / "instruct", tied, finetune_seed=2, tokenizer_dir=tmp_path / "tok")
    b, d, i = state_dict(base), state_dict(distill), state_dict(instruct)
    assert "lm_head.weight" not in b and "lm_head.weight" in d
    head = expected_bai(b["model.embed_tokens.weight"], [d["lm_head.weight"], i["model.embed_tokens.weight"]],
                        [0.5, 0.5], 0.5, torch.bfloat16)
    for sft in ((distill, instruct), (instruct, distill)):  # config from the untied model, then from a tied one
        out = merge(BAIRecipe(base=base, sft=sft, alpha=0.5), tmp_path / f"bai-{sft[0].name}", progress=False)
        assert torch.equal(state_dict(out)["lm_head.weight"], head)
        model = AutoModelForCausalLM.from_pretrained(str(out))
        assert not model.config.tie_word_embeddings and torch.equal(model.lm_head.weight.data, head)
        assert not torch.equal(model.lm_head.weight.data, model.model.embed_tokens.weight.data)

    # An untied head no input embedding can stand in for (here padded by a row): refused, not guessed.
    padded = edit(lambda sd: sd.update({"lm_head.weight": torch.cat([sd["lm_head.weight"], sd["lm_head.weight"][:1]])}))
    padded(distill)
    refused = (r"cannot tell the input embedding that is the output head of the tied inputs "
               r"\(base \(.*/base\), sft\[2\] \(.*/instruct\)\): no tensor has lm_head.weight's shape \[")
    with pytest.raises(BAIError, match=refused):
        merge(BAIRecipe(base=base, sft=(distill, instruct), alpha=0.5), tmp_path / "bai-padded", progress=False)
    assert not (tmp_path / "bai-padded").exists()


def test_dtype_option_and_provenance(llama_family, tmp_path):
    f = llama_family
    recipe = BAIRecipe(base=f["base"], sft=(f["sft_instruct"], f["sft_reasoning"]), alpha=0.5, dtype="fp32",
                       config_from=str(f["sft_reasoning"]))
    out = merge(recipe, tmp_path / "bai", progress=False)
    assert all(t.dtype == torch.float32 for t in state_dict(out).values())
    record = json.loads((out / "bai_recipe.json").read_text())
    assert record["recipe"]["coefficients"] == [0.5, 0.25, 0.25]
    assert record["output_dtype"] == "fp32" and record["openrlhf_bai_version"]
    assert [i["role"] for i in record["inputs"]] == ["base", "sft", "sft"]
    assert all(i["fingerprint"] and i["file_sizes"] for i in record["inputs"])
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


def test_same_inputs_give_byte_identical_outputs_and_reuse(llama_family, tmp_path):
    f = llama_family
    recipe = BAIRecipe(base=f["base"], sft=(f["sft_instruct"], f["sft_reasoning"]))
    a = merge(recipe, tmp_path / "a", progress=False)
    b = merge(recipe, tmp_path / "b", progress=False)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert merge(recipe, a, progress=False) == a  # a finished identical merge is reused, not rewritten
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp


def test_two_processes_merge_once(llama_family, tmp_path):
    f = llama_family
    cmd = [sys.executable, "-m", "openrlhf_bai.cli.main", "merge", "--base", f["base"], "--sft", f["sft_instruct"],
           f["sft_reasoning"], "--output", tmp_path / "bai", "--no-progress"]
    procs = [subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    last_lines = sorted(o.strip().splitlines()[-1].split()[0] for o in outs)
    assert last_lines == ["reused", "wrote"], outs
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["bai"]


def test_dry_run_writes_nothing_and_the_mergekit_yaml_comes_with_the_merge(llama_family, tmp_path, capsys):
    f = llama_family
    args = ["--base", f["base"], "--sft", f["sft_instruct"], f["sft_reasoning"], "--alpha", "0.1",
            "--output", tmp_path / "bai", "--export-mergekit", tmp_path / "mk.yml"]
    code, out, _ = run_cli(capsys, *args, "--dry-run")
    assert code == 0 and "dry run" in out and "disk needed" in out and "mergekit equivalent would go to" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not the merge, not the YAML, not a lock file
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "mergekit equivalent written to" in out
    yml = (tmp_path / "mk.yml").read_text()
    assert "merge_method: linear" in yml and "weight: 0.1" in yml and yml.count("weight: 0.45") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bai", "mk.yml"]


def test_vocabulary_grown_by_an_sft_model(llama_family, tmp_path, capsys):
    f = llama_family
    grown = tmp_path / "sft_grown"
    extra = 8

    def add_rows(sd):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[name] = torch.cat([sd[name], torch.full((extra, sd[name].shape[1]), 0.5, dtype=sd[name].dtype)])

    copy_with(f["sft_reasoning"], grown, add_rows)
    config = json.loads((grown / "config.json").read_text())
    vocab = config["vocab_size"]
    config["vocab_size"] = vocab + extra
    (grown / "config.json").write_text(json.dumps(config))

    code, _, err = run_cli(capsys, "--base", f["base"], "--sft", f["sft_instruct"], grown, "--output", tmp_path / "x")
    assert code == 1 and f"{vocab} in base" in err and f"{vocab + extra} in sft[2]" in err and "renormalize" in err
    assert not (tmp_path / "x").exists()

    recipe = BAIRecipe(base=f["base"], sft=(f["sft_instruct"], str(grown)), alpha=0.5, config_from=str(grown),
                       vocab_mismatch="renormalize")
    out = merge(recipe, tmp_path / "bai", progress=False)
    merged, g = state_dict(out), state_dict(grown)
    emb = merged["model.embed_tokens.weight"]
    assert emb.shape[0] == vocab + extra
    assert torch.equal(emb[vocab:], g["model.embed_tokens.weight"][vocab:])  # rows only the grown model has
    base, s1 = state_dict(f["base"]), state_dict(f["sft_instruct"])
    shared = expected_bai(base["model.embed_tokens.weight"], [s1["model.embed_tokens.weight"],
                          g["model.embed_tokens.weight"][:vocab]], [0.5, 0.5], 0.5, torch.bfloat16)
    assert torch.equal(emb[:vocab], shared)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab + extra


# --- bad input: exit 1, one line naming the problem, nothing at --output -----------------------------------------


def truncate(d: Path):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def corrupt_header(d: Path):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 40) + b"{not json at all, really not json!!!!!}"
                                          + data[48:])


def escape_index(d: Path):
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    save_file(sd, str(d / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00001.safetensors" for n in sd}
    weight_map["model.norm.weight"] = "../elsewhere/model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def pickle_only(d: Path):
    (d / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")


def edit(fn):
    def apply(d: Path):
        sd = load_file(str(d / "model.safetensors"))
        fn(sd)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})

    return apply


def put_nan(sd):
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")


def reshape(sd):
    sd["model.layers.0.self_attn.o_proj.weight"] = sd["model.layers.0.self_attn.o_proj.weight"][:, :-1].contiguous()


def another_pretraining(d: Path):  # what a wrong --base looks like: the same architecture, another initialization
    write_model(d, AutoConfig.from_pretrained(d), seed=7)


BAD_FILES = {
    "truncated": (truncate, ["truncated or corrupt", "model.safetensors"]),
    "corrupt": (corrupt_header, ["corrupt", "model.safetensors"]),
    "outside": (escape_index, ["outside the checkpoint directory", "model.norm.weight"]),
    "pickle": (pickle_only, ["pickle", "safetensors only", "save_pretrained"]),
    "nan": (edit(put_nan), ["NaN", "model.layers.1.mlp.up_proj.weight", "sft[2]"]),
    "shape": (edit(reshape), ["shape mismatch", "model.layers.0.self_attn.o_proj.weight"]),
    "names": (edit(lambda sd: sd.pop("model.layers.1.post_attention_layernorm.weight")),
              ["names differ", "model.layers.1.post_attention_layernorm.weight"]),
    "not a fine-tune": (another_pretraining, ["sft[2]", "is not a fine-tune of base", "cosine similarity", "--base"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_checkpoint_files(case, llama_family, tmp_path, capsys):
    damage, words = BAD_FILES[case]
    bad = tmp_path / "bad"
    shutil.copytree(llama_family["sft_reasoning"], bad)
    damage(bad)
    code, _, err = run_cli(capsys, "--base", llama_family["base"], "--sft", llama_family["sft_instruct"], bad,
                           "--output", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1 and err.startswith("openrlhf-bai: error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] in ([], [".out.lock"])


BAD_ARGS = {
    "missing path": (["--sft", "/no/such/model"], "checkpoint not found: /no/such/model"),
    "alpha": (["--alpha", "1.5"], "alpha must be in [0, 1], got 1.5"),
    "weight count": (["--sft-weights", "1.0"], "1 SFT weights given for 2 SFT models"),
    "weight sum": (["--sft-weights", "0.6", "0.6"], "sum to 1.2, not 1; pass --normalize"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_arguments(case, llama_family, tmp_path, capsys):
    args, message = BAD_ARGS[case]
    f = llama_family
    sft = [] if "--sft" in args else ["--sft", f["sft_instruct"], f["sft_reasoning"]]
    code, _, err = run_cli(capsys, "--base", f["base"], *sft, *args, "--output", tmp_path / "out")
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_normalize_rescales_weights(llama_family, tmp_path, capsys):
    f = llama_family
    code, _, _ = run_cli(capsys, "--base", f["base"], "--sft", f["sft_instruct"], f["sft_reasoning"],
                         "--sft-weights", "3", "1", "--normalize", "--output", tmp_path / "out")
    assert code == 0
    assert json.loads((tmp_path / "out" / "bai_recipe.json").read_text())["recipe"]["sft_weights"] == [0.75, 0.25]


def test_existing_output_is_kept_without_overwrite(llama_family, tmp_path, capsys):
    f = llama_family
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["--base", f["base"], "--sft", f["sft_instruct"], f["sft_reasoning"], "--output", out]
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and "not empty; pass --overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
    code, _, _ = run_cli(capsys, *args, "--overwrite")
    assert code == 0 and not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()


def test_cli_error_is_one_line_without_traceback(tmp_path):
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("openrlhf-bai")
    proc = subprocess.run([str(exe), "merge", "--base", "/no/base", "--sft", "/no/sft",
                           "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["openrlhf-bai: error: checkpoint not found: /no/base"]


# --- threads, and merges that are killed or run out of disk ---------------------------------------------------------


def test_output_is_the_same_for_any_thread_count(moe_family, llama_family, tmp_path, monkeypatch):
    """Slices cut inside tensors and across tensor boundaries, finished in any order, give the same bytes."""
    import openrlhf_bai.merge_stream as merge_stream

    f = moe_family
    recipe = BAIRecipe(base=f["base"], sft=(f["sft_instruct"], f["sft_reasoning"]), alpha=0.3, max_shard_size="100KB")
    one = merge(recipe, tmp_path / "one", progress=False, threads=1)
    monkeypatch.setattr(merge_stream, "CHUNK_ELEMENTS", 1000)  # many slices per tensor, many tensors per run
    four = merge(recipe, tmp_path / "four", progress=False, threads=4)
    names = sorted(p.name for p in one.iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) > 1 and names == sorted(p.name for p in four.iterdir())
    assert all((one / n).read_bytes() == (four / n).read_bytes() for n in names)


# A merge subprocess that stops itself (SIGSTOP) once a pool thread has written its first slice into the shard,
# so a test can signal it at a known point mid-write.
PAUSE_MID_WRITE = """
import os, signal, sys, threading
import openrlhf_bai.checkpoint_io as io
write_at = io.write_at
def pausing_write_at(fd, data, offset):
    write_at(fd, data, offset)
    if threading.current_thread() is not threading.main_thread():
        os.kill(os.getpid(), signal.SIGSTOP)
io.write_at = pausing_write_at
from openrlhf_bai.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def merge_cmd(f, out, *extra):
    return [str(a) for a in ("merge", "--base", f["base"], "--sft", f["sft_instruct"], f["sft_reasoning"],
                             "--output", out, "--no-progress", *extra)]


def paused_merge(f, out):
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_MID_WRITE, *merge_cmd(f, out, "--threads", "2")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), proc.communicate()
    (tmp,) = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    assert (tmp / "model.safetensors").stat().st_size > 0  # mid-write: a partial shard on disk
    return proc, tmp


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.suffix != ".lock")


def test_a_merge_killed_mid_write_leaves_nothing_once_it_runs_again(llama_family, tmp_path):
    out = tmp_path / "bai"
    proc, tmp = paused_merge(llama_family, out)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.communicate()
    assert tmp.is_dir() and not out.exists()

    rerun = subprocess.run([sys.executable, "-m", "openrlhf_bai.cli.main", *merge_cmd(llama_family, out)],
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(out) == [] and (out / "model.safetensors").is_file()
    assert f"removed 1 temporary directory of killed merges into {out}" in rerun.stderr
    assert " MB freed" in rerun.stderr


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_remove_the_temporary_directory(sig, code, llama_family, tmp_path):
    out = tmp_path / "bai"
    proc, tmp = paused_merge(llama_family, out)
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert leftovers(out) == [] and not out.exists()
    assert "interrupted" in err and "Traceback" not in err


def test_a_disk_that_fills_mid_write_gives_one_line_and_leaves_nothing(llama_family, tmp_path, capsys, monkeypatch):
    """The disk fills after part of the shard is written: the OS writes what fits, then refuses with ENOSPC."""
    room = [50_000]
    pwrite = os.pwrite

    def full_disk_pwrite(fd, data, offset):
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = pwrite(fd, memoryview(data)[: room[0]], offset)
        room[0] -= n
        return n

    monkeypatch.setattr(os, "pwrite", full_disk_pwrite)
    f = llama_family
    out = tmp_path / "bai"
    code, _, err = run_cli(capsys, "--base", f["base"], "--sft", f["sft_instruct"], f["sft_reasoning"], "--output", out)
    assert code == 1 and err.count("\n") == 1, err
    assert f"disk full while writing {out}: the merge needs " in err and "nothing was left behind" in err
    assert leftovers(out) == [] and not out.exists()


def test_leftovers_of_other_hosts_are_removed_only_once_nothing_writes_them(llama_family, tmp_path):
    """A directory whose owner this host cannot check (another host on a shared filesystem, or a version that did
    not name its owner) is removed once it has been unwritten for long: a live merge writes continuously."""
    import openrlhf_bai.merger as merger

    out = tmp_path / "bai"
    old, recent = tmp_path / ".bai.tmp-x5k2j9q1", tmp_path / ".bai.tmp-gpu-node-7-d54a1bb4-4242-99-abcd1234"
    for d in (old, recent):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 4096)
    long_ago = time.time() - merger.STALE_FOREIGN_S - 60
    for p in (old / "model.safetensors", old):
        os.utime(p, (long_ago, long_ago))
    f = llama_family
    merge(BAIRecipe(base=f["base"], sft=(f["sft_instruct"], f["sft_reasoning"])), out, progress=False)
    assert leftovers(out) == [recent.name]
