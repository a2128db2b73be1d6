"""`make setup` (scripts/setup.sh) on a machine with two clones, as a developer with a second checkout or a CI
runner has it: they share the pinned environment, and each runs its own code."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER = Path(sys.prefix) / "shared-env.pth"  # written by scripts/setup.sh into the .venv it makes


def _where(python, snippet="import openrlhf_bai; print(openrlhf_bai.__file__)"):
    # From "/": `python -c` puts its working directory first on sys.path, and ours holds a package of that name.
    proc = subprocess.run([str(python), "-c", snippet], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@pytest.mark.skipif(not LAYER.is_file(), reason="not running in a .venv made by scripts/setup.sh")
def test_setting_up_a_second_clone_leaves_this_one_running_its_own_code(tmp_path):
    shared_site = Path(LAYER.read_text().strip())
    cache = shared_site.parents[3]  # <cache>/venv-<key>/lib/pythonX.Y/site-packages
    clone = tmp_path / "second-clone"
    for name in ("scripts", "openrlhf_bai"):
        shutil.copytree(REPO / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("constraints.txt", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, clone / name)

    def setup():
        return subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "OPENRLHF_BAI_ENV_CACHE": str(cache)})

    # A .venv the user made by hand is theirs: refused in one line and left as it was.
    (clone / ".venv").mkdir()
    (clone / ".venv" / "mine").write_text("kept")
    proc = setup()
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "was not made by this script" in proc.stderr
    assert (clone / ".venv" / "mine").read_text() == "kept"
    shutil.rmtree(clone / ".venv")

    proc = setup()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "building environment" not in proc.stdout  # the same pins reuse the shared environment
    assert f".venv on {shared_site.parents[2]}" in proc.stdout

    # Each clone imports its own package and finds its own entry points (OpenRLHF's patch looks them up) ...
    python = clone / ".venv" / "bin" / "python"
    assert Path(_where(python)).is_relative_to(clone)
    assert Path(_where(sys.executable)).is_relative_to(REPO)
    entry = "import importlib.metadata as m; print([e.value for e in m.entry_points(group='openrlhf.actor_init')])"
    assert _where(python, entry) == "['openrlhf_bai.integration.upstream:actor_init']"
    # ... its own command, and the shared dependencies.
    cli = subprocess.run([str(python.with_name("openrlhf-bai")), "--help"], capture_output=True, text=True)
    assert cli.returncode == 0 and "merge" in cli.stdout
    deps = ("openrlhf", "torch", "vllm", "deepspeed", "ray")
    found = _where(python, f"import importlib.util as u; print([m for m in {deps} if u.find_spec(m)])")
    assert found == str(list(deps))
