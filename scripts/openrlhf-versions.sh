#!/usr/bin/env bash
# The OpenRLHF releases the stability monitor is tested on (openrlhf_bai/integration/hooks.py: TESTED_OPENRLHF), each
# one's wheel alone (no dependencies: they run on the pinned stack of scripts/setup.sh) installed in a folder of its
# own, <cache>/openrlhf-<version>, which tests/test_openrlhf_versions.py puts first on PYTHONPATH. Prints the folders.
# Downloads from PyPI once; a folder is complete once it holds .complete (written last, then renamed into place).
#   bash scripts/openrlhf-versions.sh [VERSION ...]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
cache=${OPENRLHF_BAI_ENV_CACHE:-$HOME/.cache/openrlhf-bai}
if [ $# -eq 0 ]; then
  set -- $(PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$python" -c \
    'from openrlhf_bai.integration.hooks import TESTED_OPENRLHF; print(*TESTED_OPENRLHF)')
fi
mkdir -p "$cache"
for version in "$@"; do
  target="$cache/openrlhf-$version"
  if [ ! -f "$target/.complete" ]; then
    tmp=$(mktemp -d "$cache/.openrlhf-$version.XXXXXX")
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile --target "$tmp" \
      "openrlhf==$version" >&2 || { rm -rf "$tmp"; exit 1; }
    touch "$tmp/.complete"
    rm -rf "$target"
    mv "$tmp" "$target"
  fi
  echo "$target"
done
