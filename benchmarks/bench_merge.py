"""Merge speed and memory: `openrlhf-bai merge` against mergekit and against the raw I/O floor, and its scaling
with threads.

Four cases, each three bf16 checkpoints (a base and two "SFT" models of it) written once and cached:

- dense: Qwen2-like, ~250M parameters (hidden 1024, 16 layers, 16 heads, 4 KV heads, intermediate 2816, vocab
  32000, untied), 290 tensors, 492 MB per input, one file;
- moe: Qwen3-MoE-like, ~264M parameters (hidden 384, 32 layers, 48 experts of intermediate 128, 4 active,
  vocab 32000), each expert's projections a tensor of its own as hub checkpoints store them: ~4,900 tensors,
  528 MB per input, one file;
- moe-hub: the moe model as the hub serves large models: save_pretrained shards (100 MB here, 5 GB on the hub,
  scaled to this size) with an index, laid out in a huggingface_hub cache (snapshots/ symlinks into blobs/) and
  merged by hub id with HF_HUB_OFFLINE=1;
- many: DeepSeek-V3's tensor count, 47,217 tensors in 163 shards with an index, tiny shapes (4.5 MB of data in
  all), in the hub cache and merged by hub id: the cost of planning and of finding a finished merge, not of I/O.

The first three are written with transformers (toy.write_family), the last with safetensors directly.

Each contender runs as a whole process (wall clock and peak RSS of the child) on warm page cache:

- raw I/O: read the three inputs and write one output of the merged size (the floor for any merge);
- openrlhf-bai: `openrlhf-bai merge ... --alpha 0.5` (weights base 0.5, SFTs 0.25 / 0.25), default threads;
- its plan alone (`--dry-run`), and a repeat of a finished merge (the output is found and reused: a cache hit);
- mergekit 0.1.5: `mergekit-yaml` on the equivalent linear config (`--export-mergekit`), in its own venv,
  built on first use (pip, about a minute) unless --skip-mergekit; not on the many case;
- then openrlhf-bai with --threads 1, 2, 4 ... up to the usable cores: the scaling table.

Last, the time for 7B, 70B and 235B-A22B merges projected from the measured throughput per core and an assumed
disk bandwidth (--disk-gbps).

    python benchmarks/bench_merge.py [--repeats 5] [--mergekit-repeats 1] [--cases dense moe moe-hub many]
                                     [--skip-mergekit] [--disk-gbps 5] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("OPENRLHF_BAI_BENCH_DIR", Path.home() / ".cache" / "openrlhf-bai" / "bench"))
MERGEKIT_VENV = CACHE.parent / "mergekit-0.1.5"
EXE = Path(sys.executable).with_name("openrlhf-bai")
CASES = {"dense": ("qwen2-250m", "qwen2"), "moe": ("qwen3moe-264m", "qwen3_moe"),
         "moe-hub": ("qwen3moe-264m-100mb-shards", "qwen3_moe"), "many": ("deepseek-v3-tensors", None)}
HUB = CACHE / "hub"  # a huggingface_hub cache: the hub cases' inputs
SHARD_SIZE = "100MB"  # moe-hub: 5 GB on the hub, scaled to these 528 MB models
NAMES = ("base", "sft_instruct", "sft_reasoning")
# Per-input bf16 size of the projected models: parameters x 2 bytes.
PROJECTED = {"7B (dense)": (7.6e9 * 2, "dense"), "70B (dense)": (70.6e9 * 2, "dense"),
             "235B-A22B (MoE)": (235e9 * 2, "moe")}

RAW_IO = """
import sys
files, out, size = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
buf = bytearray(64 << 20)
for f in files:
    with open(f, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
with open(out, "wb") as fh:
    left = size
    while left:
        n = min(left, len(buf))
        fh.write(memoryview(buf)[:n])
        left -= n
"""


def timed(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds (user + system) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def ensure_checkpoints(case: str) -> tuple[list[str], dict[str, Path]]:
    """(what `merge` is given: directories or hub ids, the directory of each input)."""
    folder, arch = CASES[case]
    root = CACHE / folder
    written_before = case in ("dense", "moe") and all(list((root / n).glob("*.safetensors")) for n in NAMES)
    if not ((root / ".complete").exists() or written_before):
        print(f"writing three {case} bf16 checkpoints under {root} (a few minutes, once)", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # In a child: torch in this process would inflate every measured child's peak RSS (inherited at fork).
        write = {"many": f"import bench_merge; bench_merge.write_many({str(tmp)!r})"}.get(
            case, f"from openrlhf_bai.toy import write_family; write_family({str(tmp)!r}, {arch!r}, size='bench', "
                  f"max_shard_size={SHARD_SIZE if case == 'moe-hub' else None!r})")
        subprocess.run([sys.executable, "-c",
                        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); {write}"],
                       check=True)
        if case in ("moe-hub", "many"):  # into the hub cache, as a download leaves them; the plain copies go
            subprocess.run([sys.executable, "-c", "import sys; from openrlhf_bai.toy import put_in_hub_cache; "
                            "[put_in_hub_cache(f'{sys.argv[1]}/{n}', sys.argv[2], f'bench/{sys.argv[3]}-{n}') "
                            "for n in sys.argv[4:]]", str(tmp), str(HUB), folder, *NAMES], check=True)
            shutil.rmtree(tmp)
            tmp.mkdir()
        tmp.rename(root)
        (root / ".complete").touch()
    if case in ("moe-hub", "many"):
        ids = [f"bench/{folder}-{n}" for n in NAMES]
        refs = [HUB / f"models--bench--{i.split('/')[1]}" for i in ids]
        return ids, {n: r / "snapshots" / (r / "refs" / "main").read_text() for n, r in zip(NAMES, refs)}
    return [str(root / n) for n in NAMES], {n: root / n for n in NAMES}


def deepseek_v3_names() -> list[str]:
    """DeepSeek-V3's tensor names (61 layers, the first 3 dense, then 256 routed experts and a shared one), and
    the multi-token-prediction layers after them, to 47,217 in all."""
    attn = ["self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight",
            "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight", "self_attn.kv_b_proj.weight",
            "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
    names = ["model.embed_tokens.weight"]
    for layer in range(64):
        p = f"model.layers.{layer}."
        names += [p + a for a in attn]
        if layer < 3:
            names += [p + f"mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
        else:
            names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
            names += [p + f"mlp.shared_experts.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
            names += [p + f"mlp.experts.{e}.{m}.weight"
                      for e in range(256) for m in ("gate_proj", "up_proj", "down_proj")]
    return names[:47215] + ["model.norm.weight", "lm_head.weight"]


def write_many(root: str, shards: int = 163) -> None:
    """Three checkpoints of DeepSeek-V3's tensor count in `shards` shards with an index; 4 x 4 bf16 tensors."""
    import torch
    from safetensors.torch import save_file

    names = deepseek_v3_names()
    per = -(-len(names) // shards)
    for seed, name in enumerate(NAMES):
        d = Path(root) / name
        d.mkdir(parents=True)
        gen, weight_map = torch.Generator().manual_seed(seed), {}
        for i in range(shards):
            part, file = names[i * per:(i + 1) * per], f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            rows = {n: 8 if n in ("model.embed_tokens.weight", "lm_head.weight") else 4 for n in part}
            save_file({n: torch.randn((r, 4), generator=gen).to(torch.bfloat16) for n, r in rows.items()},
                      str(d / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(2 * 4 * (8 if "embed" in n or "lm_head" in n else 4) for n in names)},
             "weight_map": weight_map}, indent=2))
        (d / "config.json").write_text(json.dumps(
            {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 8,
             "hidden_size": 4, "num_hidden_layers": 61, "n_routed_experts": 256, "torch_dtype": "bfloat16"}, indent=2))


def ensure_mergekit() -> Path:
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if not (MERGEKIT_VENV / ".complete").exists():
        print(f"installing mergekit 0.1.5 into {MERGEKIT_VENV} (once)", flush=True)
        subprocess.run([sys._base_executable, "-m", "venv", "--clear", str(MERGEKIT_VENV)], check=True)
        subprocess.run([str(MERGEKIT_VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0", "mergekit==0.1.5"],
                       check=True)
        (MERGEKIT_VENV / ".complete").touch()
    return exe


def measure(cmd, repeats: int, work: Path) -> dict:
    runs = []
    for i in range(repeats):
        runs.append(timed(cmd(i)))
        for leftover in work.glob("out*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    return {"median_s": statistics.median(r[0] for r in runs), "best_s": min(r[0] for r in runs),
            "peak_rss_gib": max(r[1] for r in runs) / 2**30, "cpu_s": statistics.median(r[2] for r in runs),
            "runs_s": [r[0] for r in runs]}


def bench_case(case: str, a, cores: int) -> dict:
    given, dirs = ensure_checkpoints(case)
    work = CACHE / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    inputs = [str(f) for n in NAMES for f in sorted(dirs[n].glob("*.safetensors"))]
    out_size = sum(f.stat().st_size for f in dirs["base"].glob("*.safetensors"))
    merge_cmd = [str(EXE), "merge", "--base", given[0], "--sft", *given[1:], "--alpha", "0.5", "--no-progress"]
    # One merge first: it warms the page cache, exports the mergekit YAML, and is the finished merge that the
    # cache-hit runs find.
    plan = subprocess.run(merge_cmd + ["--output", str(work / "hit"), "--export-mergekit", str(work / "mergekit.yml")],
                          check=True, capture_output=True, text=True).stdout
    tensors = int(plan.split(" tensors in")[0].split()[-1])
    # The same linear merge without tokenizer_source, whose embedding remapping is not part of a plain merge;
    # mergekit reads the inputs' directories.
    yml = work / "mergekit.yml"
    text = "".join(line for line in yml.read_text().splitlines(True) if not line.startswith("tokenizer_source"))
    for g, n in zip(given, NAMES):
        text = text.replace(f"model: {g}\n", f"model: {dirs[n]}\n")
    yml.write_text(text)
    contenders = {
        "raw I/O (read 3 inputs, write 1 output)":
            lambda i: [sys.executable, "-c", RAW_IO, *inputs, str(work / f"out-raw{i}.bin"), str(out_size)],
        f"openrlhf-bai merge ({cores} threads)": lambda i: merge_cmd + ["--output", str(work / f"out-bai{i}")],
        "openrlhf-bai --dry-run (the plan alone)":
            lambda i: merge_cmd + ["--output", str(work / "out-dry"), "--dry-run"],
        "openrlhf-bai, finished merge found (cache hit)": lambda i: merge_cmd + ["--output", str(work / "hit")],
    }
    if not a.skip_mergekit and case != "many":  # many measures planning; mergekit's per-tensor cost is another story
        mk = ensure_mergekit()
        contenders["mergekit 0.1.5 mergekit-yaml"] = lambda i: [str(mk), str(yml), str(work / f"out-mk{i}"), "--quiet"]
    for f in inputs:  # warm the page cache, as in the reference figures
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass

    print(f"\n[{case}] 3 inputs x {out_size / 1e6:.0f} MB, {tensors} tensors each", flush=True)
    results = {"input_bytes": out_size, "tensors": tensors, "contenders": {}, "threads": {}}
    for name, cmd in contenders.items():
        results["contenders"][name] = measure(cmd, a.mergekit_repeats if name.startswith("mergekit") else a.repeats,
                                              work)
    counts = sorted({1, cores} | {2**k for k in range(cores.bit_length()) if 2**k <= cores})
    for n in counts:
        results["threads"][n] = measure(
            lambda i: merge_cmd + ["--output", str(work / f"out-t{i}"), "--threads", str(n)], a.repeats, work)

    floor = results["contenders"]["raw I/O (read 3 inputs, write 1 output)"]["median_s"]
    ours = results["contenders"][f"openrlhf-bai merge ({cores} threads)"]["median_s"]
    print(f"{'contender':42} {'median wall':>12} {'best':>8} {'CPU':>8} {'peak RSS':>10} {'vs I/O floor':>13} "
          f"{'vs openrlhf-bai':>16}")
    for name, r in results["contenders"].items():
        print(f"{name:42} {r['median_s']:>10.2f} s {r['best_s']:>6.2f} s {r['cpu_s']:>6.2f} s "
              f"{r['peak_rss_gib']:>6.2f} GiB {r['median_s'] / floor:>12.2f}x {r['median_s'] / ours:>15.2f}x")
    one = results["threads"][1]["median_s"]
    print(f"\n{'threads':>7} {'median wall':>12} {'best':>8} {'CPU':>8} {'peak RSS':>10} {'speed-up':>9} "
          f"{'vs I/O floor':>13}")
    for n, r in results["threads"].items():
        print(f"{n:>7} {r['median_s']:>10.2f} s {r['best_s']:>6.2f} s {r['cpu_s']:>6.2f} s "
              f"{r['peak_rss_gib']:>6.2f} GiB {one / r['median_s']:>8.2f}x {r['median_s'] / floor:>12.2f}x")
    return results


def projection(results: dict, disk_gbps: float) -> None:
    """Whole-merge time at S bytes per input: the arithmetic at the measured per-core rate (one thread, whole process,
    start-up included, so conservative) on C cores, or moving 4 S through the disk, whichever is longer (the threads
    overlap the two). Assumes the arithmetic scales with the cores, as the scaling table checks on this machine."""
    counts = (1, 2, 8, 32)
    print(f"\nprojected merge time, 3 bf16 inputs of S each: max(arithmetic at the 1-thread rate above / C cores, "
          f"4 S at {disk_gbps:g} GB/s)")
    print(f"{'model':18} {'S':>7} {'rate/core':>10} " + " ".join(f"{f'{c} cores':>9}" for c in counts)
          + f" {'disk alone':>10}")
    for model, (size, case) in PROJECTED.items():
        if case not in results:
            continue
        rate = results[case]["input_bytes"] / results[case]["threads"][1]["median_s"]  # bytes of one input per s
        io_s = 4 * size / (disk_gbps * 1e9)
        cells = [max(size / (rate * c), io_s) for c in counts]
        print(f"{model:18} {size / 1e9:>4.0f} GB {rate / 1e9:>5.2f} GB/s "
              + " ".join(f"{t / 60:>5.1f} min" for t in cells) + f" {io_s / 60:>6.1f} min")


def main() -> None:
    os.environ.update(HF_HUB_CACHE=str(HUB), HF_HUB_OFFLINE="1")  # the hub cases resolve their ids from HUB only
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mergekit-repeats", type=int, default=1,
                   help="mergekit is 10-100x slower: one run tells the ratio")
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--disk-gbps", type=float, default=5.0,
                   help="disk bandwidth the projection assumes, GB/s (default 5: a local NVMe SSD)")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    results = {case: bench_case(case, a, cores) for case in a.cases}
    projection(results, a.disk_gbps)
    # Timings are only as quiet as the machine: other processes' load shows in the wall times, not in CPU.
    print(f"\n{cores} usable cores; {a.repeats} runs each (mergekit {a.mergekit_repeats}); warm page cache; "
          f"load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
