"""Merge speed and memory: `openrlhf-bai merge` against mergekit and against the raw I/O floor.

Three ~250M-parameter bf16 checkpoints (Qwen2-like: hidden 1024, 16 layers, 16 heads, 4 KV heads,
intermediate 2816, vocab 32000, untied) are written once and cached. Each contender runs as a whole process
(`/usr/bin/time`-style: wall clock and peak RSS of the child) on warm page cache:

- raw I/O: read the three inputs and write one output of the merged size (the floor for any merge);
- openrlhf-bai: `openrlhf-bai merge ... --alpha 0.5` (weights base 0.5, SFTs 0.25 / 0.25);
- mergekit 0.1.5: `mergekit-yaml` on the equivalent linear config (`--export-mergekit`), in its own venv,
  built on first use (pip, about a minute) unless --skip-mergekit.

    python benchmarks/bench_merge.py [--repeats 3] [--skip-mergekit] [--json results.json]
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


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def ensure_checkpoints() -> dict[str, Path]:
    root = CACHE / "qwen2-250m"
    names = ("base", "sft_instruct", "sft_reasoning")
    if not all((root / n / "model.safetensors").is_file() for n in names):
        print(f"writing three ~250M-parameter bf16 checkpoints under {root} (a few minutes, once)")
        shutil.rmtree(root, ignore_errors=True)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # In a child: torch in this process would inflate every measured child's peak RSS (inherited at fork).
        subprocess.run([sys.executable, "-c", "import sys; from openrlhf_bai.toy import write_family; "
                        "write_family(sys.argv[1], 'qwen2', size='bench')", str(tmp)], check=True)
        tmp.rename(root)
    return {n: root / n for n in names}


def ensure_mergekit() -> Path:
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if not (MERGEKIT_VENV / ".complete").exists():
        print(f"installing mergekit 0.1.5 into {MERGEKIT_VENV} (once)")
        subprocess.run([sys._base_executable, "-m", "venv", "--clear", str(MERGEKIT_VENV)], check=True)
        subprocess.run([str(MERGEKIT_VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0", "mergekit==0.1.5"], check=True)
        (MERGEKIT_VENV / ".complete").touch()
    return exe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    ckpt = ensure_checkpoints()
    work = CACHE / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    inputs = [str(ckpt[n] / "model.safetensors") for n in ("base", "sft_instruct", "sft_reasoning")]
    out_size = os.path.getsize(inputs[0])
    merge_cmd = [str(EXE), "merge", "--base", str(ckpt["base"]), "--sft", str(ckpt["sft_instruct"]),
                 str(ckpt["sft_reasoning"]), "--alpha", "0.5", "--no-progress"]
    subprocess.run(merge_cmd + ["--output", str(work / "plan"), "--dry-run", "--export-mergekit",
                                str(work / "mergekit.yml")], check=True, stdout=subprocess.DEVNULL)
    # The same linear merge without tokenizer_source, whose embedding remapping is not part of a plain merge.
    yml = work / "mergekit.yml"
    yml.write_text("".join(line for line in yml.read_text().splitlines(True) if not line.startswith("tokenizer_source")))
    contenders = {
        "raw I/O (read 3 inputs, write 1 output)":
            lambda i: [sys.executable, "-c", RAW_IO, *inputs, str(work / f"raw{i}.bin"), str(out_size)],
        "openrlhf-bai merge": lambda i: merge_cmd + ["--output", str(work / f"bai{i}")],
    }
    if not a.skip_mergekit:
        mk = ensure_mergekit()
        contenders["mergekit 0.1.5 mergekit-yaml"] = lambda i: [str(mk), str(work / "mergekit.yml"), str(work / f"mk{i}"),
                                                                "--quiet"]
    for f in inputs:  # warm the page cache, as in the reference figures
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass

    results = {}
    for name, cmd in contenders.items():
        runs = []
        for i in range(a.repeats):
            runs.append(timed(cmd(i)))
            shutil.rmtree(work / f"bai{i}", ignore_errors=True)
            shutil.rmtree(work / f"mk{i}", ignore_errors=True)
            (work / f"raw{i}.bin").unlink(missing_ok=True)
        results[name] = {"median_s": statistics.median(r[0] for r in runs),
                         "peak_rss_gib": max(r[1] for r in runs) / 2**30, "runs_s": [r[0] for r in runs]}

    bai = results["openrlhf-bai merge"]["median_s"]
    print(f"\n{'contender':42} {'median wall':>12} {'peak RSS':>10} {'vs openrlhf-bai':>16}")
    for name, r in results.items():
        print(f"{name:42} {r['median_s']:>10.2f} s {r['peak_rss_gib']:>6.2f} GiB {r['median_s'] / bai:>15.2f}x")
    print(f"\n{os.cpu_count()} CPUs; inputs 3 x {out_size / 1e6:.0f} MB; {a.repeats} runs each, warm page cache")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
