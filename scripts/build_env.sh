#!/usr/bin/env bash
# Builds the pinned environment (OpenRLHF 0.11.2 stack, CPU-only) into the directory $1. scripts/setup.sh calls it
# once per hash of constraints.txt and this file, so a change here (and only here or in the pins) rebuilds it.
# The recipe is ../shared/notes/openrlhf-on-cpu.md; each step says why.
set -euo pipefail
cd "$(dirname "$0")/.."
env=$1
pip_in() { "$env/bin/pip" install --quiet -c constraints.txt "$@"; }

rm -rf "$env"; mkdir -p "$(dirname "$env")"
python3 -m venv "$env"
pip_in --upgrade pip==25.3 setuptools==80.9.0 wheel==0.45.1
pip_in torch==2.13.0                      # the CPU build on these machines; other pins pull CUDA wheels
pip_in vllm==0.29.0
"$env/bin/pip" uninstall --quiet -y torchvision torchaudio  # CUDA builds that break transformers' lazy imports
pip_in transformers==5.15.0 "ray[default]==2.55.0" accelerate datasets einops jsonlines loralib optree \
  peft pylatexenc tensorboard torchdata torchmetrics tqdm wandb isort optimum bitsandbytes pynvml \
  transformers-stream-generator safetensors huggingface_hub filelock matplotlib pytest \
  ipython                                 # tests draw a notebook table with transformers.utils.notebook
DS_BUILD_OPS=0 pip_in --no-build-isolation deepspeed==0.19.6   # sdist; isolation would pull a CUDA torch
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
  pip_in --no-deps --no-build-isolation flash-attn==2.8.3      # Python part only (bert_padding)
pip_in --no-deps openrlhf==0.11.2                              # its pins are met by hand above
touch "$env/.complete"
