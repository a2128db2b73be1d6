#!/usr/bin/env bash
# The environment of `make demo` / `make test`: the pinned OpenRLHF stack (scripts/build_env.sh), built once per
# hash of the pins and that recipe in a cache outside the clone, and this clone's own small .venv on top of it with
# this package installed (editable). Clones and CI runs on one machine share the 6 GB of dependencies, never each
# other's code.
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(cat constraints.txt scripts/build_env.sh | sha256sum | cut -c1-16)
cache=${OPENRLHF_BAI_ENV_CACHE:-$HOME/.cache/openrlhf-bai}
env="$cache/venv-$key"
if [ ! -f "$env/.complete" ]; then
  echo "building environment $env (about 8 minutes on a fresh machine)"
  bash scripts/build_env.sh "$env"
fi

# This clone's .venv: the same interpreter, whose site-packages reads the shared one through a .pth line.
# An editable install into the shared environment would point every clone at the last one set up.
shared_site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
layer=".venv/shared-env.pth"   # where this clone's .venv names the environment it sits on
if [ -L .venv ]; then
  rm .venv                     # before 0.3: a link to the shared environment
elif [ -e .venv ] && [ ! -f "$layer" ]; then
  echo "scripts/setup.sh: error: $PWD/.venv exists and was not made by this script; move it away" >&2
  exit 1
fi
if [ "$(cat "$layer" 2>/dev/null)" != "$shared_site" ]; then
  rm -rf .venv                 # none yet, or one on the shared environment of other pins
  "$env/bin/python" -m venv --without-pip .venv
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; site.addsitedir('$shared_site')" > "$site/_openrlhf_bai_shared_env.pth"
  echo "$shared_site" > "$layer"
fi
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
echo "environment ready: .venv on $env"
