"""--bai.materialize per_node on a three-node Ray cluster simulated on one machine (ray.cluster_utils.Cluster).

Each node's raylet (and so each of its workers) gets its own HOME, standing for a node's own local disk: a
checkpoint given as ~/family/base is whatever that node holds there. The driver reaches the cluster through
RAY_ADDRESS, as under `ray job submit`.
"""

import shutil
from pathlib import Path

import pytest

from openrlhf_bai.cli.train_ppo_ray import main
from openrlhf_bai.errors import BAIError
from openrlhf_bai.merger import PROVENANCE, existing_merge_hash
from openrlhf_bai.toy import write_family


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    same, other = tmp_path_factory.mktemp("home-same"), tmp_path_factory.mktemp("home-other")
    write_family(same / "family", "llama")
    shutil.copytree(same / "family", other / "family")
    shutil.rmtree(other / "family" / "base")  # this node's "base" is another model of the same shape
    shutil.copytree(same / "family" / "sft_instruct", other / "family" / "base")

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False, "env_vars": {"HOME": str(same)}})
    cluster.add_node(num_cpus=1, env_vars={"HOME": str(same)})
    odd_node = cluster.add_node(num_cpus=1, env_vars={"HOME": str(other)})
    cluster.wait_for_nodes()
    yield {"address": cluster.address, "home": same, "odd_node": odd_node.node_id}
    ray.shutdown()
    cluster.shutdown()


def node_lines(out: str) -> dict[str, str]:
    """node id -> what the launcher reported for it."""
    return {line.split()[2].rstrip(":"): line for line in out.splitlines() if line.startswith("openrlhf-bai: node ")}


def test_per_node_merge_gives_every_node_the_same_checkpoint(cluster, monkeypatch, capsys):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", cluster["address"])
    family = cluster["home"] / "family"
    argv = ["--actor.model_name_or_path", str(family / "sft_reasoning"), "--actor_init", "bai",
            "--bai.base", str(family / "base"),
            "--bai.sft", str(family / "sft_instruct"), str(family / "sft_reasoning"),
            "--bai.materialize", "per_node", "--bai.merge_only"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    merged = Path(out.strip().splitlines()[-1].split()[4])
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(alive) == 3 and set(node_lines(out)) == alive
    digest = existing_merge_hash(merged)
    assert all(f"(recipe hash {digest[:16]})" in line for line in node_lines(out).values())
    assert (merged / PROVENANCE).is_file() and (merged / "config.json").is_file()

    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in merged.iterdir()}
    assert main(argv) == 0  # a repeat run: every node finds its copy
    out = capsys.readouterr().out
    assert Path(out.strip().splitlines()[-1].split()[4]) == merged and set(node_lines(out)) == alive
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in merged.iterdir()} == before


def test_a_node_whose_inputs_differ_is_named_and_writes_nothing(cluster, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_ADDRESS", cluster["address"])
    monkeypatch.setenv("HOME", str(cluster["home"]))  # the driver's node holds the same files as the head
    out = tmp_path / "actor"
    argv = ["--actor_init", "bai", "--bai.base", "~/family/base", "--bai.sft", "~/family/sft_reasoning",
            "--bai.materialize", "per_node", "--bai.output_dir", str(out), "--bai.merge_only"]
    with pytest.raises(BAIError, match="failed on 1 of 3 nodes") as error:
        main(argv)
    assert f"node {cluster['odd_node']}: recipe hash" in str(error.value) and "its inputs differ" in str(error.value)
    assert existing_merge_hash(out) is not None  # the two nodes that agree with the driver have their copy
