"""Where `merge` may write: never over an input (whatever --overwrite says), and every output it cannot write
refused before any work with one line and exit 1, leaving nothing behind: no temporary directory, no lock file, no
parent directory it made, no mergekit YAML. Read-only filesystems and mount points are real tmpfs mounts (root)."""

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from openrlhf_bai import BAIRecipe
from openrlhf_bai.cli.main import main as cli
from openrlhf_bai.merger import output_size, plan_merge


def merge_args(f, output, *extra):
    return ["merge", "--no-progress", "--base", str(f["base"]), "--sft", str(f["sft_instruct"]),
            str(f["sft_reasoning"]), "--output", str(output), *map(str, extra)]


def refused(capsys, argv) -> str:
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("openrlhf-bai: error: "), err
    return err


def snapshot(directory: Path) -> dict:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.fixture
def family(llama_family, tmp_path):
    """A private copy of the toy family under tmp_path/models, so outputs can be put around it."""
    models = tmp_path / "models"
    return {k: Path(shutil.copytree(v, models / k)) for k, v in llama_family.items()}


@contextmanager
def tmpfs(path: Path, *options: str, size: int = 4 << 20):
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}", *options)), "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("where", ["the base", "inside the base", "the parent of the inputs", "a symlink to an sft"])
def test_output_is_never_an_input(where, family, tmp_path, capsys):
    output = {"the base": family["base"], "inside the base": family["base"] / "merged",
              "the parent of the inputs": tmp_path / "models", "a symlink to an sft": tmp_path / "link"}[where]
    if where == "a symlink to an sft":
        output.symlink_to(family["sft_instruct"])
    before = snapshot(tmp_path / "models")
    err = refused(capsys, merge_args(family, output, "--overwrite"))
    assert f"output {output} " in err and "a merge never writes over its inputs" in err
    assert snapshot(tmp_path / "models") == before
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")] == []


def test_output_under_a_regular_file(family, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = refused(capsys, merge_args(family, tmp_path / "file" / "sub" / "out"))
    assert f"{tmp_path / 'file'} is a file, not a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "models"]


def test_output_is_a_dangling_symlink(family, tmp_path, capsys):
    (tmp_path / "out").symlink_to(tmp_path / "gone" / "out")
    err = refused(capsys, merge_args(family, tmp_path / "out"))
    assert "is a symlink to" in err and "which does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "out"] and not (tmp_path / "gone").exists()


def test_output_is_a_symlink_to_a_directory_writes_its_target(family, tmp_path, capsys):
    (tmp_path / "disk").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "disk")
    assert cli(merge_args(family, tmp_path / "out")) == 0
    assert (tmp_path / "out").is_symlink() and (tmp_path / "disk" / "model.safetensors").is_file()


def test_output_on_a_read_only_filesystem(family, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permission bits: mount a really read-only filesystem
        context = tmpfs(tmp_path / "ro", "ro")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        context = open(os.devnull)
    with context:
        err = refused(capsys, merge_args(family, tmp_path / "ro" / "a" / "out"))
        assert f"output {tmp_path / 'ro' / 'a' / 'out'}: {tmp_path / 'ro'} " in err
        assert "read-only file system" in err or "not writable" in err
        assert list((tmp_path / "ro").iterdir()) == []


def test_output_is_a_mount_point(family, tmp_path, capsys):
    with tmpfs(tmp_path / "mnt"):
        (tmp_path / "mnt" / "old.txt").write_text("keep")
        err = refused(capsys, merge_args(family, tmp_path / "mnt", "--overwrite"))
        assert "is a mount point" in err and "give a directory inside it" in err
        assert [p.name for p in (tmp_path / "mnt").iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt", "models"]  # no .mnt.old-* nor .mnt.lock


def test_export_mergekit_into_a_missing_directory_is_refused_before_the_merge(family, tmp_path, capsys):
    err = refused(capsys, merge_args(family, tmp_path / "out", "--export-mergekit", tmp_path / "no" / "mk.yml"))
    assert "--export-mergekit" in err and f"directory {tmp_path / 'no'} does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_export_mergekit_over_an_input_file_is_refused(family, tmp_path, capsys):
    before = snapshot(tmp_path / "models")
    err = refused(capsys, merge_args(family, tmp_path / "out", "--export-mergekit", family["base"] / "config.json"))
    assert "is one of the inputs" in err
    assert snapshot(tmp_path / "models") == before and not (tmp_path / "out").exists()


def put_nan(directory: Path) -> None:
    sd = load_file(str(directory / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_a_merge_that_fails_leaves_no_yaml_no_parents_no_lock(family, tmp_path, capsys):
    """It fails mid-write (a NaN is found while streaming): a/b/ was made for it, and goes again."""
    put_nan(family["sft_reasoning"])
    out = tmp_path / "a" / "b" / "out"
    err = refused(capsys, merge_args(family, out, "--export-mergekit", tmp_path / "mk.yml"))
    assert "NaN" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_a_merge_leaves_no_lock_file(family, tmp_path, capsys):
    assert cli(merge_args(family, tmp_path / "a" / "out")) == 0
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["out"]


def test_the_disk_check_counts_every_file_of_the_output(family, tmp_path, capsys):
    """The space needed is exactly what the merge writes: shards with their headers, config, tokenizer,
    provenance. A filesystem with room for the tensors but not for the rest is refused before anything is written."""
    recipe = BAIRecipe(base=str(family["base"]), sft=(str(family["sft_instruct"]), str(family["sft_reasoning"])))
    plan = plan_merge(recipe)
    assert cli(merge_args(family, tmp_path / "full")) == 0
    assert output_size(plan) == sum(p.stat().st_size for p in (tmp_path / "full").iterdir())
    pages = -(-(plan.bytes_to_write + 4096) // 4096)  # tmpfs space comes in pages
    assert plan.bytes_to_write < pages * 4096 < output_size(plan)
    with tmpfs(tmp_path / "small", size=pages * 4096):
        err = refused(capsys, merge_args(family, tmp_path / "small" / "out"))
        assert f"not enough disk for {tmp_path / 'small' / 'out'}" in err
        assert list((tmp_path / "small").iterdir()) == []


def test_launcher_output_dir_is_never_an_input(family, tmp_path, capsys):
    """The same refusal through `train-ppo --actor_init bai --bai.output_dir`, --bai.overwrite or not."""
    before = snapshot(tmp_path / "models")
    code = cli(["train-ppo", "--actor.model_name_or_path", str(family["sft_reasoning"]), "--actor_init", "bai",
                "--bai.base", str(family["base"]), "--bai.output_dir", str(family["sft_reasoning"]), "--bai.overwrite",
                "--bai.merge_only"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # warnings may come first
    assert code == 1 and len(errors) == 1, errors
    assert f"output {family['sft_reasoning']} is " in errors[0] and "a merge never writes over its inputs" in errors[0]
    assert snapshot(tmp_path / "models") == before
