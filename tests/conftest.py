"""Shared test set-up: offline, a private merge cache, flash-attn importable on CPU, small real checkpoints."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OPENRLHF_BAI_CACHE", tempfile.mkdtemp(prefix="bai-test-cache-"))

import pytest  # noqa: E402

from openrlhf_bai.integration.flash_attn_cpu import make_flash_attn_importable  # noqa: E402

make_flash_attn_importable()


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """base, sft_instruct, sft_reasoning: tiny untied Llama checkpoints, single-file bf16, one shared tokenizer."""
    from openrlhf_bai.toy import write_family

    return write_family(tmp_path_factory.mktemp("llama"), "llama")
