"""`openrlhf-bai probe` on tiny real checkpoints: every number is checked against an independent computation."""

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from openrlhf_bai.cli.main import main as cli
from openrlhf_bai.errors import BAIError
from openrlhf_bai.merger import cache_dir_for
from openrlhf_bai.probe import load_model, load_prompts, run_probe, suggest
from openrlhf_bai.recipe import BAIRecipe
from openrlhf_bai.toy import _CORPUS

MAX_NEW = 12
EOS = 0  # the toy family's eos_token_id
# With the chat template the toy models stop after 2 tokens on the first prompt and run to the limit on others.
PROMPTS = [_CORPUS[5][:40], _CORPUS[9][:40], "What is the capital of France?", _CORPUS[0][:40]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe-files")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"question": p}) + "\n" for p in PROMPTS))
    (d / "heldout.txt").write_text(" ".join(_CORPUS) * 4)  # longer than one 512-token block
    return d


@pytest.fixture(scope="module")
def probed(llama_family, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe-out")
    recipe = BAIRecipe(base=str(llama_family["base"]),
                       sft=(str(llama_family["sft_instruct"]), str(llama_family["sft_reasoning"])))
    result = run_probe(
        recipe, [0.5, 1.0, 0.0], files / "prompts.jsonl", input_key="question", apply_chat_template=True,
        max_new_tokens=MAX_NEW, engine="hf", batch_size=3, heldout=files / "heldout.txt",
        plot_path=out / "probe.png", json_path=out / "probe.json",
    )
    return result, out


def _chat_prompt_ids(tokenizer):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def _greedy(model, prompt):
    """One prompt at a time, no padding, no generate(): argmax until EOS or the limit."""
    seq, out = list(prompt), []
    while len(out) < MAX_NEW and (not out or out[-1] != EOS):
        out.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        seq.append(out[-1])
    return out


def test_rows_cover_parents_and_candidates_in_the_shared_cache(probed, llama_family):
    result, _ = probed
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["base", "alpha=1", "alpha=0.5", "alpha=0", "reasoning sft"]
    assert result["rows"][-1]["path"] == str(llama_family["sft_reasoning"].resolve())
    sft = (str(llama_family["sft_instruct"]), str(llama_family["sft_reasoning"]))
    for row in result["rows"][1:4]:
        assert row["path"] == str(cache_dir_for(BAIRecipe(base=str(llama_family["base"]), sft=sft, alpha=row["alpha"])))
        assert (cache_dir_for(BAIRecipe(base=str(llama_family["base"]), sft=sft, alpha=row["alpha"]))
                / "model.safetensors").is_file()


def test_generation_lengths_and_eos_rate_match_an_independent_greedy_loop(probed, llama_family):
    result, _ = probed
    tokenizer = AutoTokenizer.from_pretrained(str(llama_family["sft_instruct"]))
    prompt_ids = _chat_prompt_ids(tokenizer)
    stopped = 0
    for row in result["rows"]:
        model = load_model(row["path"])
        expected = [_greedy(model, p) for p in prompt_ids]
        assert [g["response"] for g in row["generations"]] == expected, row["label"]
        lengths = [len(e) for e in expected]
        eos = [e[-1] == EOS for e in expected]
        assert row["mean_length"] == pytest.approx(sum(lengths) / len(lengths))
        middle = sorted(lengths)[1:3]  # four prompts: the median is the mean of the middle two
        assert row["median_length"] == pytest.approx(sum(middle) / 2)
        assert row["eos_rate"] == pytest.approx(sum(eos) / len(eos))
        stopped += sum(eos)
    # both outcomes occur, so the EOS count is not trivially 0 or 1
    assert 0 < stopped < len(PROMPTS) * len(result["rows"])


def test_kl_is_zero_to_itself_and_matches_kl_div_per_sequence(probed, llama_family):
    result, _ = probed
    rows = {r["label"]: r for r in result["rows"]}
    assert rows["alpha=1"]["kl"]["base"] == pytest.approx(0.0, abs=1e-6)  # alpha 1 is the base
    assert rows["base"]["kl"]["base"] == 0.0 and rows["reasoning sft"]["kl"]["sft[2]"] == 0.0
    assert all(v > 0 for v in rows["alpha=0.5"]["kl"].values())

    tokenizer = AutoTokenizer.from_pretrained(str(llama_family["sft_instruct"]))
    model, parent = load_model(rows["alpha=0.5"]["path"]), load_model(llama_family["sft_reasoning"])
    total, count = 0.0, 0
    with torch.no_grad():
        for p, g in zip(_chat_prompt_ids(tokenizer), rows["alpha=0.5"]["generations"]):
            ids = torch.tensor([p + g["response"]])
            span = slice(len(p) - 1, ids.shape[1] - 1)  # positions predicting the response tokens
            logp = torch.log_softmax(model(input_ids=ids).logits[0, span].float(), -1)
            logq = torch.log_softmax(parent(input_ids=ids).logits[0, span].float(), -1)
            total += F.kl_div(logq, logp, log_target=True, reduction="sum").item()
            count += len(g["response"])
    assert rows["alpha=0.5"]["kl"]["sft[2]"] == pytest.approx(total / count, rel=1e-4)


def test_perplexity_matches_the_models_own_loss(probed, llama_family, files):
    result, _ = probed
    tokenizer = AutoTokenizer.from_pretrained(str(llama_family["sft_instruct"]))
    ids = tokenizer((files / "heldout.txt").read_text())["input_ids"]
    assert len(ids) > 512
    for row in (result["rows"][0], result["rows"][2]):
        model = load_model(row["path"])
        nll, n = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(ids), 512):
                block = torch.tensor([ids[start:start + 512]])
                if block.shape[1] > 1:
                    nll += model(input_ids=block, labels=block).loss.item() * (block.shape[1] - 1)
                    n += block.shape[1] - 1
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert row["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-3)


def test_report_json_plot_and_suggestion_follow_the_rule(probed):
    result, out = probed
    saved = json.loads((out / "probe.json").read_text())
    assert [r["label"] for r in saved["rows"]] == [r["label"] for r in result["rows"]]
    assert "generations" not in saved["rows"][0] and saved["rows"][2]["kl"] == result["rows"][2]["kl"]
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("base", "alpha=0.5", "reasoning sft", "kl[sft[2]]", "ppl"):
        assert label in result["table"]

    s, reasoning = saved["suggestion"], saved["rows"][-1]
    candidates = sorted((r for r in saved["rows"] if r["kind"] == "candidate"), key=lambda r: r["alpha"])
    ok = [r["alpha"] for r in candidates if r["mean_length"] >= 0.8 * reasoning["mean_length"]
          and r["kl"]["base"] <= 0.5 * reasoning["kl"]["base"]]
    assert s["alpha"] == (ok[0] if ok else None)


def _row(alpha, length, kl_base):
    return {"alpha": alpha, "mean_length": length, "kl": {"base": kl_base}}


def test_suggest_picks_the_most_sft_heavy_alpha_within_both_bounds():
    reasoning = _row(None, 1000.0, 0.40)
    rows = [_row(0.1, 980, 0.30), _row(0.3, 900, 0.18), _row(0.5, 820, 0.09), _row(0.7, 500, 0.03),
            _row(0.9, 300, 0.01)]
    s = suggest(rows, reasoning)  # defaults: length >= 800, KL <= 0.20
    assert (s["alpha"], s["min_length"], s["max_kl_base"]) == (0.3, 800.0, 0.20)
    assert suggest(rows, reasoning, max_kl_base_share=0.25)["alpha"] == 0.5  # KL <= 0.10
    assert suggest(rows, reasoning, max_kl_base_share=0.2)["alpha"] is None  # KL <= 0.08: only 0.7, 0.9; too short
    assert suggest([_row(0.2, 800, 0.2)], reasoning)["alpha"] == 0.2  # the bounds are inclusive
    assert suggest(rows, reasoning, min_length_share=0.95)["alpha"] is None  # only 0.1 is long enough; its KL is high
    s = suggest(rows[::-1], reasoning, min_length_share=0.95, max_kl_base_share=0.8)  # input order does not matter
    assert s["alpha"] == 0.1
    none = suggest(rows, reasoning, min_length_share=0.99, max_kl_base_share=0.01)
    assert none["alpha"] is None and "alpha 0.1: length too short, KL to base too high" in none["message"]


def test_prompts_follow_openrlhf_preprocessing(llama_family, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(llama_family["sft_instruct"]))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"input": "hello"}) + "\n\n" + json.dumps({"input": messages}) + "\n"
                 + json.dumps({"input": "third"}) + "\n")
    assert load_prompts(f, "input", tok, True, limit=2) == [
        "<|user|>hello<|end|><|assistant|>", "<|system|>Be brief.<|end|><|user|>2+2?<|end|><|assistant|>"]
    g = tmp_path / "q.jsonl"
    g.write_text(json.dumps({"input": "x"}) + "\n")
    assert load_prompts(g, "input", tok, False, input_template="Q: {}\nA:") == ["Q: x\nA:"]
    with pytest.raises(BAIError, match=r"p.jsonl:3: 'input' is a list of messages; pass --apply-chat-template"):
        load_prompts(f, "input", tok, False)
    g.write_text('{"input": "x"}\n{oops\n')
    with pytest.raises(BAIError, match=r"q.jsonl:2: not valid JSON"):
        load_prompts(g, "input", tok, False)


def _sparse_copy(src, dst, nbytes):
    """A checkpoint whose one tensor claims `nbytes` of bf16 data: a sparse file, so it takes no disk here."""
    shutil.copytree(src, dst)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [nbytes // 2 // 1024, 1024], "data_offsets": [0, nbytes]}})
    header = header.encode() + b" " * (-len(header) % 8)
    with open(dst / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + nbytes)
    return dst


def _args(family, files, *extra, alphas=("0.5",)):
    return ["probe", "--base", str(family["base"]), "--sft", str(family["sft_instruct"]), str(family["sft_reasoning"]),
            "--alphas", *alphas, "--prompts", str(files / "prompts.jsonl"), "--input-key", "question",
            "--engine", "hf", *extra]


def test_cli_reports_and_reuses_the_cached_candidate(probed, llama_family, files, tmp_path, capsys):
    merged = cache_dir_for(BAIRecipe(base=str(llama_family["base"]),
                                     sft=(str(llama_family["sft_instruct"]), str(llama_family["sft_reasoning"])),
                                     alpha=0.5)) / "model.safetensors"
    before = merged.stat().st_mtime_ns
    rc = cli(_args(llama_family, files, "--max-new-tokens", "4", "--num-prompts", "2", "--apply-chat-template",
                   "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "p.json")))
    out = capsys.readouterr().out
    assert rc == 0 and merged.stat().st_mtime_ns == before
    assert "mean_len" in out and "alpha=0.5" in out and "bounds: mean length >=" in out
    assert ("suggested alpha: 0.5" in out) or ("no alpha meets both bounds" in out)
    assert json.loads((tmp_path / "p.json").read_text())["settings"]["num_prompts"] == 2
    assert (tmp_path / "p.png").is_file()


@pytest.mark.parametrize("case, expected", [
    ("missing_prompts", "prompts file not found"),
    ("missing_key", "prompts.jsonl:1: no key 'input' (set --input-key)"),
    ("empty_prompts", "holds no prompts"),
    ("alpha_range", "alphas must be in [0, 1], got 1.5, -0.1"),
    ("missing_heldout", "held-out text file not found"),
    ("reasoning_index", "--reasoning-sft 3: there are 2 SFT models"),
    ("disk", "not enough disk for the candidates in"),
    ("prompts_not_utf8", "prompts.jsonl:2: not UTF-8 text (byte 0xe9 at offset 17); save the file as UTF-8"),
    ("heldout_not_utf8", "heldout.txt: not UTF-8 text (byte 0xff at offset 0)"),
    ("json_is_a_directory", "is a directory; give a file path"),
    ("json_is_the_prompts", "is one of the inputs"),
    ("plot_inside_a_checkpoint", "is inside the input directory"),
    ("plot_format", ".txt is not a figure format"),
    ("read_only_place", "cannot create a file in /sys"),
    ("input_template", "--input-template 'Q: {question}': a format string with one {} for the prompt"),
    ("prompt_not_text", "prompts.jsonl:1: 'question' is int, not text"),
    ("no_tokenizer", "cannot load the tokenizer of"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, expected, llama_family, files, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("OPENRLHF_BAI_CACHE", str(cache))
    family, alphas = llama_family, ("0.5",)
    args = ["--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "p.json")]
    if case == "missing_prompts":
        (tmp_path / "in").mkdir()
        files = tmp_path / "in"
    elif case == "missing_key":
        args += ["--input-key", "input"]  # the file's key is "question"
    elif case == "empty_prompts":
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "prompts.jsonl").write_text("\n\n")
        files = tmp_path / "in"
    elif case == "alpha_range":
        alphas = ("0.5", "1.5", "-0.1")
    elif case == "missing_heldout":
        args += ["--heldout", str(tmp_path / "nope.txt")]
    elif case == "reasoning_index":
        args += ["--reasoning-sft", "3"]
    elif case in ("prompts_not_utf8", "heldout_not_utf8"):  # Latin-1 text, as an old Windows editor saves it
        (tmp_path / "in").mkdir()
        files = tmp_path / "in"
        (files / "prompts.jsonl").write_bytes(b'{"question": "hi"}\n{"question": "caf\xe9"}\n')
        if case == "heldout_not_utf8":
            (files / "prompts.jsonl").write_text('{"question": "hi"}\n')
            (files / "heldout.txt").write_bytes(b"\xff\xfeh\x00i\x00")  # UTF-16
            args += ["--heldout", str(files / "heldout.txt")]
    elif case == "json_is_a_directory":
        args[-1] = str(tmp_path)
    elif case == "json_is_the_prompts":
        args[-1] = str(files / "prompts.jsonl")
    elif case == "plot_inside_a_checkpoint":
        args[1] = str(family["sft_reasoning"] / "probe.png")
    elif case == "plot_format":
        args[1] = str(tmp_path / "p.txt")
    elif case == "read_only_place":
        args[-1] = "/sys/p.json"
    elif case == "input_template":
        args += ["--input-template", "Q: {question}"]
    elif case == "prompt_not_text":
        (tmp_path / "in").mkdir()
        files = tmp_path / "in"
        (files / "prompts.jsonl").write_text('{"question": 5}\n')
    elif case == "no_tokenizer":  # the input the tokenizer comes from has none
        family = {**family, "base": tmp_path / "bare"}
        shutil.copytree(llama_family["base"], family["base"],
                        ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "chat_template*"))
        args += ["--tokenizer-from", str(family["base"])]
    elif case == "disk":  # 1 TiB per candidate in sparse files: more than this disk has free
        family = {k: _sparse_copy(family[k], tmp_path / k, 1 << 40) for k in ("base", "sft_instruct", "sft_reasoning")}
        assert shutil.disk_usage(tmp_path).free < 2 << 40
        alphas = ("0.3", "0.7")
    rc = cli(_args(family, files, *args, alphas=alphas))
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("openrlhf-bai: error: ") and "\n" not in err and expected in err, err
    assert not cache.exists() and not (tmp_path / "p.png").exists() and not (tmp_path / "p.json").exists()
    if case == "disk":
        assert "2199.02 GB needed" in err  # two candidates of 1 TiB each, said before anything is written


def test_vllm_engine_without_a_gpu_is_refused(llama_family, files, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OPENRLHF_BAI_CACHE": str(tmp_path / "cache")}
    args = _args(llama_family, files, "--engine", "vllm", "--plot", str(tmp_path / "p.png"))
    proc = subprocess.run([sys.executable, "-m", "openrlhf_bai.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "openrlhf-bai: error: --engine vllm needs a CUDA GPU and none is visible; use --engine hf")
    assert list(tmp_path.iterdir()) == []


PNG = b"\x89PNG\r\n\x1a\n"


def test_the_plot_goes_where_plot_says_or_beside_json_never_into_the_cwd(probed, llama_family, files, tmp_path,
                                                                          monkeypatch, capsys):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir(), out.mkdir()
    monkeypatch.chdir(cwd)
    small = ("--max-new-tokens", "2", "--num-prompts", "1")
    assert cli(_args(llama_family, files, *small, "--json", str(out / "r.json"))) == 0
    assert sorted(p.name for p in out.iterdir()) == ["r.json", "r.png"] and (out / "r.png").read_bytes()[:8] == PNG
    assert capsys.readouterr().out.splitlines()[-1] == f"plot: {out / 'r.png'}, numbers: {out / 'r.json'}"
    assert cli(_args(llama_family, files, *small, "--plot", str(out / "r.pdf"))) == 0
    assert (out / "r.pdf").read_bytes()[:5] == b"%PDF-"
    capsys.readouterr()
    assert cli(_args(llama_family, files, *small)) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("nothing written")
    assert list(cwd.iterdir()) == [] and len(list(out.iterdir())) == 3


def test_a_probe_candidate_is_the_merge_that_merge_and_actor_init_bai_reuse(llama_family, files, tmp_path,
                                                                             monkeypatch, capsys):
    """The README's promise: the same recipe through probe, merge and train-ppo is one recipe hash, one cached
    candidate, reused untouched, whatever recipe flags it takes (--normalize and --max-shard-size included)."""
    monkeypatch.setenv("OPENRLHF_BAI_CACHE", str(tmp_path / "cache"))
    base, instruct, reasoning = (str(llama_family[k]) for k in ("base", "sft_instruct", "sft_reasoning"))
    recipe = ["--base", base, "--sft", instruct, reasoning, "--sft-weights", "2", "1", "--normalize",
              "--max-shard-size", "100KB", "--dtype", "fp32", "--config-from", reasoning, "--tokenizer-from", base,
              "--vocab-mismatch", "renormalize"]
    assert cli(["probe", *recipe, "--alphas", "0.3", "--prompts", str(files / "prompts.jsonl"), "--input-key",
                "question", "--engine", "hf", "--max-new-tokens", "2", "--num-prompts", "1",
                "--json", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    candidate = Path(next(r["path"] for r in rows if r["kind"] == "candidate"))
    assert candidate.is_relative_to(tmp_path / "cache")  # the shared merge cache
    assert len(list(candidate.glob("model-*-of-*.safetensors"))) > 1  # --max-shard-size reached the merge
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in candidate.iterdir()}
    capsys.readouterr()

    assert cli(["merge", *recipe, "--alpha", "0.3", "--output", str(candidate), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"recipe hash {candidate.name.removeprefix('bai-')}" in out and "holds this merge already" in out

    bai = ["--bai.base", base, "--bai.sft", instruct, reasoning, "--bai.sft_weights", "2", "1", "--bai.normalize",
           "--bai.max_shard_size", "100KB", "--bai.dtype", "fp32", "--bai.config_from", reasoning,
           "--bai.tokenizer_from", base, "--bai.vocab_mismatch", "renormalize"]
    assert cli(["train-ppo", "--actor_init", "bai", *bai, "--bai.alpha", "0.3", "--bai.merge_only"]) == 0
    command = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert command[command.index("--actor.model_name_or_path") + 1] == str(candidate)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in candidate.iterdir()} == before
