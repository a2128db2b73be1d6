"""Checkpoints as huggingface_hub's cache stores them: sharded, each file of a snapshot a symlink into blobs/.
Given by hub id with HF_HUB_OFFLINE=1, they merge byte-identically to the same checkpoints given as directories,
through `merge`, `train-ppo --actor_init bai` and `probe`; the cache is never written, and no output may be in it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_bai.cli.main import main as cli
from openrlhf_bai.toy import put_in_hub_cache, write_family

HUB_IDS = {"base": "acme/tiny-base", "sft_instruct": "acme/tiny-instruct", "sft_reasoning": "acme/tiny-reasoning"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(plain directories, hub cache, snapshot directories): one sharded family (7 shards each), laid out twice."""
    root = tmp_path_factory.mktemp("hub")
    plain = write_family(root / "plain", "llama", max_shard_size="40KB")
    cache = root / "cache"
    snapshots = {k: put_in_hub_cache(plain[k], cache, repo) for k, repo in HUB_IDS.items()}
    return plain, cache, snapshots


@pytest.fixture
def offline(hub, monkeypatch):
    """This process (and its children) resolve hub ids from the test cache only."""
    import huggingface_hub.constants as hc

    cache = hub[1]
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return cache


def tree_state(root: Path) -> dict:
    """Every entry under root: link target, or bytes and mtime: what a command must not change in its inputs."""
    state = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            state[str(p)] = ("link", os.readlink(p))
        elif p.is_file():
            state[str(p)] = ("file", p.read_bytes(), p.stat().st_mtime_ns)
        else:
            state[str(p)] = ("dir",)
    return state


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every file byte-identical but the provenance record, which names the inputs as given."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n != "bai_recipe.json":
            assert (a / n).read_bytes() == (b / n).read_bytes(), n


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "openrlhf_bai.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_the_layout_is_huggingface_hubs_own(hub):
    from huggingface_hub import scan_cache_dir, snapshot_download

    plain, cache, snapshots = hub
    info = scan_cache_dir(cache)
    assert info.warnings == []
    assert {r.repo_id: [sorted(rev.refs) for rev in r.revisions] for r in info.repos} == {
        repo: [["main"]] for repo in HUB_IDS.values()}
    for k, snap in snapshots.items():
        shards = sorted(snap.glob("model-*.safetensors"))
        assert len(shards) == 7 and all(os.readlink(s).startswith("../../blobs/") for s in shards)
        assert snapshot_download(HUB_IDS[k], cache_dir=cache, local_files_only=True) == str(snap)


def test_merge_by_hub_id_is_byte_identical_to_directories_and_leaves_the_cache_alone(hub, tmp_path):
    plain, cache, snapshots = hub
    before = tree_state(cache)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    by_id = run("merge", "--base", HUB_IDS["base"], "--sft", HUB_IDS["sft_instruct"], HUB_IDS["sft_reasoning"],
                "--alpha", "0.3", "--max-shard-size", "60KB", "--output", tmp_path / "by_id", "--no-progress", env=env)
    assert by_id.returncode == 0, by_id.stderr
    by_dir = run("merge", "--base", plain["base"], "--sft", plain["sft_instruct"], plain["sft_reasoning"],
                 "--alpha", "0.3", "--max-shard-size", "60KB", "--output", tmp_path / "by_dir", "--no-progress")
    assert by_dir.returncode == 0, by_dir.stderr
    assert_same_checkpoint(tmp_path / "by_id", tmp_path / "by_dir")
    assert len(list((tmp_path / "by_id").glob("model-*.safetensors"))) > 1
    record = json.loads((tmp_path / "by_id" / "bai_recipe.json").read_text())
    assert [i["path"] for i in record["inputs"]] == list(HUB_IDS.values())
    assert [i["revision"] for i in record["inputs"]] == [s.name for s in snapshots.values()]
    # The same content, so the same recipe hash: a cached merge made from directories serves the hub ids too.
    assert record["recipe_hash"] == json.loads((tmp_path / "by_dir" / "bai_recipe.json").read_text())["recipe_hash"]
    assert tree_state(cache) == before


def test_local_directories_that_are_symlinks(hub, tmp_path, capsys):
    """A symlink to a plain directory, and a symlink to a hub snapshot (whose files are symlinks themselves)."""
    plain, cache, snapshots = hub
    (tmp_path / "base").symlink_to(plain["base"])
    (tmp_path / "instruct").symlink_to(snapshots["sft_instruct"])
    args = ["merge", "--no-progress", "--sft", str(tmp_path / "instruct"), str(plain["sft_reasoning"])]
    assert cli([*args, "--base", str(tmp_path / "base"), "--output", str(tmp_path / "linked")]) == 0
    assert cli([*args[:3], str(plain["sft_instruct"]), str(plain["sft_reasoning"]), "--base", str(plain["base"]),
                "--output", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert_same_checkpoint(tmp_path / "linked", tmp_path / "plain")


def test_train_ppo_actor_init_bai_by_hub_id(hub, tmp_path):
    """The launcher, as a user runs it: the merged actor is byte-identical to `merge` of the directories."""
    plain, cache, snapshots = hub
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "OPENRLHF_BAI_CACHE": str(tmp_path / "bai-cache")}
    proc = run("train-ppo", "--actor.model_name_or_path", HUB_IDS["sft_reasoning"], "--actor_init", "bai",
               "--bai.base", HUB_IDS["base"], "--bai.sft", HUB_IDS["sft_instruct"], HUB_IDS["sft_reasoning"],
               "--bai.alpha", "0.5", "--bai.merge_only", env=env)
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip().splitlines()[-1].split()
    actor = Path(command[command.index("--actor.model_name_or_path") + 1])
    assert actor.parent == tmp_path / "bai-cache" / "merged"
    assert cli(["merge", "--no-progress", "--base", str(plain["base"]), "--sft", str(plain["sft_instruct"]),
                str(plain["sft_reasoning"]), "--output", str(tmp_path / "plain")]) == 0
    assert_same_checkpoint(actor, tmp_path / "plain")


def test_probe_by_hub_id(hub, offline, tmp_path, monkeypatch, capsys):
    plain, cache, snapshots = hub
    monkeypatch.setenv("OPENRLHF_BAI_CACHE", str(tmp_path / "bai-cache"))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"input": "Solve the equation"}) + "\n")
    assert cli(["probe", "--base", HUB_IDS["base"], "--sft", HUB_IDS["sft_instruct"], HUB_IDS["sft_reasoning"],
                "--alphas", "0.5", "--prompts", str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "2",
                "--engine", "hf", "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["base", "alpha=0.5", "reasoning sft"]
    assert rows[0]["path"] == str(snapshots["base"]) and rows[2]["path"] == str(snapshots["sft_reasoning"])
    assert cli(["merge", "--no-progress", "--base", str(plain["base"]), "--sft", str(plain["sft_instruct"]),
                str(plain["sft_reasoning"]), "--output", str(tmp_path / "plain")]) == 0
    assert_same_checkpoint(Path(rows[1]["path"]), tmp_path / "plain")


@pytest.mark.parametrize("place", ["snapshot", "inside the snapshot", "blobs", "inside blobs", "repo folder",
                                   "whole cache"])
def test_no_output_in_the_hub_cache_of_an_input(place, hub, offline, tmp_path, capsys):
    plain, cache, snapshots = hub
    snap = snapshots["base"]
    output = {"snapshot": snap, "inside the snapshot": snap / "merged", "blobs": snap.parent.parent / "blobs",
              "inside blobs": snap.parent.parent / "blobs" / "merged", "repo folder": snap.parent.parent,
              "whole cache": cache}[place]
    before = tree_state(cache)
    code = cli(["merge", "--no-progress", "--base", HUB_IDS["base"], "--sft", HUB_IDS["sft_instruct"],
                HUB_IDS["sft_reasoning"], "--output", str(output), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert f"output {output} " in err and "a merge never writes over its inputs" in err
    assert tree_state(cache) == before
