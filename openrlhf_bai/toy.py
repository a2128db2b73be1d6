"""Small real checkpoints for the demo, the tests and the benchmark.

Real architectures from transformers with random weights, real safetensors files, and a real byte-level
BPE tokenizer trained here with `tokenizers`. Nothing is downloaded. The "SFT" models of a family are the
base plus seeded noise, so they sit near the base the way fine-tunes do.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
_CORPUS = [
    "Solve the equation step by step and explain the reasoning.",
    "The derivative of x squared is two x, so the slope at three is six.",
    "First, list what is known. Then check each case. Finally, state the answer.",
    "Write a short poem about the sea and the wind at night.",
    "Translate the sentence into French, then into German.",
    "A balanced actor starts between the pretrained model and the fine-tuned models.",
    "Reinforcement learning from human feedback aligns a language model with preferences.",
    "Let us think. If a train leaves at noon at sixty miles per hour, by three it has gone 180 miles.",
    "def add(a, b):\n    return a + b\n",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
]


def write_tokenizer(out_dir: str | Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE tokenizer on a built-in corpus, save it as a HF tokenizer; return its length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(fast)


def model_config(arch: str, vocab_size: int, tied: bool = False, size: str = "tiny"):
    """A transformers config: `llama`, `qwen2`, `qwen2_moe` or `qwen3_moe`; size `tiny` (tests) or `bench` (~250M:
    Qwen2-like, or for qwen3_moe Qwen3-MoE-like with 48 experts in each of 32 layers, ~4,900 tensors)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen2MoeConfig, Qwen3MoeConfig

    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    if size == "bench":
        dims = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=4)
    common = dict(vocab_size=vocab_size, tie_word_embeddings=tied, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1, **dims)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3_moe":
        if size == "bench":  # hub checkpoints store each expert's projections as tensors of their own
            common.update(hidden_size=384, num_hidden_layers=32, num_attention_heads=6, num_key_value_heads=2)
        return Qwen3MoeConfig(num_experts=48 if size == "bench" else 4, num_experts_per_tok=4,
                              moe_intermediate_size=128 if size == "bench" else 32,
                              head_dim=64 if size == "bench" else 16, **common)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=64, decoder_sparse_step=1, **common)
    raise ValueError(f"unknown toy architecture {arch!r}: use llama, qwen2, qwen2_moe or qwen3_moe")


def write_model(
    out_dir: str | Path,
    config,
    seed: int = 0,
    finetune_seed: int | None = None,
    noise: float = 0.05,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write a random-weight model with save_pretrained (safetensors). With `finetune_seed`, add seeded noise
    of `noise` times each tensor's spread to the `seed` model: a stand-in for a fine-tune of it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per tiny checkpoint is noise
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if finetune_seed is not None:
        gen = torch.Generator().manual_seed(finetune_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise * (p.std() if p.numel() > 1 else 1.0))
    model = model.to(dtype)
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), **kwargs)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out_dir))
    return out_dir


def write_family(
    root: str | Path,
    arch: str = "llama",
    tied: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int | None = None,
    size: str = "tiny",
) -> dict[str, Path]:
    """A pretrained base and two SFT models of it (instruct, reasoning) sharing one tokenizer."""
    root = Path(root)
    tok_dir = root / "tokenizer"
    vocab = write_tokenizer(tok_dir)
    if size == "bench":  # the benchmark's spec fixes the vocabulary; the small tokenizer stays real
        vocab = 32000
    config = model_config(arch, vocab, tied=tied, size=size)
    paths = {}
    for name, ft in (("base", None), ("sft_instruct", 1), ("sft_reasoning", 2)):
        paths[name] = write_model(root / name, config, seed=0, finetune_seed=ft, dtype=dtype,
                                  max_shard_size=max_shard_size, tokenizer_dir=tok_dir)
    return paths


def put_in_hub_cache(src_dir: str | Path, cache_dir: str | Path, repo_id: str, commit: str | None = None) -> Path:
    """Lay a checkpoint directory out in a huggingface_hub cache as a download leaves it, with huggingface_hub's
    own cache code: models--ORG--NAME/blobs/<sha256 of LFS files (*.safetensors), git sha1 of the others>,
    snapshots/<commit>/FILE -> ../../blobs/<...> (relative symlinks), refs/main, and trees/<commit>.json, the tree
    listing an offline snapshot_download checks the snapshot's completeness against. Returns the snapshot."""
    import hashlib
    import shutil

    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
    from huggingface_hub.file_download import (_cache_commit_hash_for_specific_revision, _create_symlink,
                                               repo_folder_name)
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    src = Path(src_dir)
    storage = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(f for f in src.rglob("*") if f.is_file())
    commit = commit or hashlib.sha1(b"".join(f.relative_to(src).as_posix().encode() for f in files)
                                    + repo_id.encode()).hexdigest()
    entries = {}
    for f in files:
        rel, size = f.relative_to(src).as_posix(), f.stat().st_size
        if f.suffix == ".safetensors":  # stored with git LFS on the hub: the blob is named by its sha256
            with open(f, "rb") as fh:
                sha256 = sha_fileobj(fh).hex()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
            entry, etag = TreeCacheEntry(size, git_hash(pointer), sha256, size), sha256
        else:
            entry = TreeCacheEntry(size, git_hash(f.read_bytes()))
            etag = entry.blob_id
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = storage / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(link), new_blob=False)
        entries[rel] = entry
    _cache_commit_hash_for_specific_revision(str(storage), "main", commit)
    write_tree_cache(str(storage), commit, entries)
    return storage / "snapshots" / commit
