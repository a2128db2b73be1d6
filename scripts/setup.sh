#!/usr/bin/env bash
# Builds the pinned environment (OpenRLHF 0.11.2 stack, CPU-only) once per constraints hash in a cache
# outside the clone, then gives this clone its own small .venv on top of it with this package installed
# (editable). Clones and CI runs on one machine share the 6 GB of dependencies, never each other's code.
# The recipe is ../shared/notes/openrlhf-on-cpu.md; each step says why.
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(cat constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
cache=${OPENRLHF_BAI_ENV_CACHE:-$HOME/.cache/openrlhf-bai}
env="$cache/venv-$key"
pip_in() { "$env/bin/pip" install --quiet -c constraints.txt "$@"; }

if [ ! -f "$env/.complete" ]; then
  echo "building environment $env (about 8 minutes on a fresh machine)"
  rm -rf "$env"; mkdir -p "$cache"
  python3 -m venv "$env"
  pip_in --upgrade pip==25.3 setuptools==80.9.0 wheel==0.45.1
  pip_in torch==2.13.0                      # the CPU build on these machines; other pins pull CUDA wheels
  pip_in vllm==0.29.0
  "$env/bin/pip" uninstall --quiet -y torchvision torchaudio  # CUDA builds that break transformers' lazy imports
  pip_in transformers==5.15.0 "ray[default]==2.55.0" accelerate datasets einops jsonlines loralib optree \
    peft pylatexenc tensorboard torchdata torchmetrics tqdm wandb isort optimum bitsandbytes pynvml \
    transformers-stream-generator safetensors huggingface_hub filelock matplotlib pytest
  DS_BUILD_OPS=0 pip_in --no-build-isolation deepspeed==0.19.6   # sdist; isolation would pull a CUDA torch
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    pip_in --no-deps --no-build-isolation flash-attn==2.8.3      # Python part only (bert_padding)
  pip_in --no-deps openrlhf==0.11.2                              # its pins are met by hand above
  touch "$env/.complete"
fi

# This clone's .venv: the same interpreter, whose site-packages reads the shared one through a .pth line.
# An editable install into the shared environment would point every clone at the last one set up.
shared_site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
layer=".venv/shared-env.pth"   # where this clone's .venv names the environment it sits on
if [ -L .venv ] || [ "$(cat "$layer" 2>/dev/null)" != "$shared_site" ]; then
  rm -rf .venv                 # a link to the shared environment (before 0.3) or a .venv on another one
  "$env/bin/python" -m venv --without-pip .venv
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; site.addsitedir('$shared_site')" > "$site/_openrlhf_bai_shared_env.pth"
  echo "$shared_site" > "$layer"
fi
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
echo "environment ready: .venv on $env"
