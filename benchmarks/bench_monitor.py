"""The stability monitor's cost per training step, in the trainer's process, on the two paths the plugin takes.

api       OpenRLHF with the trainer-callback API (patches/openrlhf-0.11.2-actor-init.patch, applied here to a copy of
          the installed 0.11.2): the monitor is an ordinary callback of openrlhf.trainer_callbacks.
backport  OpenRLHF 0.11.2 as released: backport.py's wrappers run it; they also look up a stop in Ray's key-value
          store once per rollout batch (timed apart, with a local Ray).

On each path, in a process of its own, OpenRLHF's real BasePPOTrainer.save_logs_and_checkpoints is called once per
step on two trainers built alike: one with the monitor (every detector, the client_states copy, the JSONL row,
--bai.alert_url configured but idle: a healthy run fires nothing), one without (api: no callback, as OpenRLHF runs
without plugins; backport: the unwrapped method). Both loggers are off (wandb and TensorBoard cost the same with or
without the plugin), no checkpoint is due, so the difference is the plugin's. The two are timed in alternation, step
by step, so that both see the same machine.

    python benchmarks/bench_monitor.py [--steps 3000] [--json results.json]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "openrlhf-0.11.2-actor-init.patch"


def openrlhf_metrics(step: int, rng: random.Random) -> dict:
    """What PPOTrainer.fit hands save_logs_and_checkpoints in 0.11: rollout stats and the actor's merged status."""
    noise = lambda scale: 1 + rng.uniform(-scale, scale)  # noqa: E731
    return {
        "rollout/reward_mean": 0.2 + 0.001 * step + rng.uniform(-0.02, 0.02), "rollout/reward_std": 0.3 * noise(0.1),
        "rollout/response_length_mean": 1000.0 * noise(0.05), "rollout/truncated_rate": 0.05 * noise(0.2),
        "rollout/num_samples": 1024.0, "policy_loss": 0.01 * noise(0.5), "actor_lr": 1e-6,
        "clip_ratio": 0.1 * noise(0.2),
        "kl": 0.01 * noise(0.3), "entropy_loss": 1.0 * noise(0.05), "policy_entropy": 1.0 * noise(0.05),
        "actor_grad_norm": 0.5 * noise(0.3), "response_length": 1000.0 * noise(0.05), "total_length": 1300.0,
        "return": 0.2, "reward": 0.2, "ppo_clip_count": 3.0, "policy_update_steps": 4.0,
        **{f"timing/{name}": rng.uniform(1, 10) for name in ("generate", "make_experience", "ppo_train", "broadcast")},
    }


def p99(xs):
    return statistics.quantiles(xs, n=100)[98]


def summary(xs) -> dict:
    return {"median_ms": statistics.median(xs), "p99_ms": p99(xs)}


def measure(path: str, steps: int) -> dict:
    """One path, in this process: {"plain", "monitored", "monitor" (the difference, step by step)[, "stop_check"]}."""
    from openrlhf_bai.integration.flash_attn_cpu import make_flash_attn_importable

    make_flash_attn_importable()
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer
    from openrlhf.utils.config import hierarchize

    from openrlhf_bai.integration import hooks, worker
    from openrlhf_bai.integration.monitor import CONFIG_ENV, JSONL_NAME

    assert hooks.has_callback_api() == (path == "api"), f"the {path} path, but has_callback_api() disagrees"
    # An address nothing is sent to: the alert path is configured, and idle because nothing fires.
    os.environ[CONFIG_ENV] = json.dumps({"alert_url": "http://127.0.0.1:9/", "on_collapse": "warn"})
    root = tempfile.mkdtemp(prefix="bai-bench-monitor-")

    def trainer(name):
        args = hierarchize(argparse.Namespace(**{
            "logger.logging_steps": 1, "logger.tensorboard_dir": None, "logger.wandb.key": None,
            "logger.wandb.run_name": name, "ckpt.path": os.path.join(root, name), "ckpt.save_steps": float("inf"),
            "ckpt.load_enable": False, "ckpt.best_metric_key": "", "algo.kl.target": None, "algo.kl.init_coef": 0.0,
            "algo.kl.horizon": 10000, "algo.advantage.estimator": "reinforce", "algo.dynamic_filtering_enable": False,
            "eval.steps": float("inf"), "train.num_episodes": 1, "rollout.batch_size": 1,
            "rollout.n_samples_per_prompt": 1, "rollout.vllm_generate_batch_size": 1, "vllm.enable_sleep": False,
        }))
        t = object.__new__(BasePPOTrainer)
        BasePPOTrainer.__init__(t, SimpleNamespace(args=args), None, None, None, None, None, None)
        return t

    original = BasePPOTrainer.save_logs_and_checkpoints
    plain, monitored = trainer("plain"), trainer("monitored")
    if path == "api":  # the monitor from OpenRLHF's entry points; the plain trainer as OpenRLHF without plugins
        assert [c.__name__ for c in monitored.trainer_callbacks] == ["trainer_callback"]
        plain.trainer_callbacks = []
        methods = {"plain": original, "monitored": original}
    else:
        worker.install_hooks()
        methods = {"plain": original, "monitored": BasePPOTrainer.save_logs_and_checkpoints}
        assert methods["monitored"] is not original
    rng = random.Random(0)
    times = {"plain": [], "monitored": []}
    clock = time.perf_counter_ns
    for step in range(1, steps + 1):
        metrics = openrlhf_metrics(step, rng)
        for name, t in (("plain", plain), ("monitored", monitored)):
            logs = dict(metrics)
            states = {"episode": 0, "global_step": step, "total_consumed_prompts": step, "data_loader_state_dict": {}}
            start = clock()
            methods[name](t, step, logs, states)
            times[name].append((clock() - start) / 1e6)
    with open(os.path.join(root, "monitored", JSONL_NAME)) as f:
        assert sum(1 for _ in f) == steps  # the monitor really ran, once per step
    assert not os.path.exists(os.path.join(root, "plain", JSONL_NAME))
    assert not monitored.__dict__.get("_bai_errors"), "the monitor failed during the benchmark"
    assert "events" in monitored._bai_monitor["state"] and not monitored._bai_monitor["state"]["events"]
    result = {name: summary(xs) for name, xs in times.items()}
    result["monitor"] = summary([m - p for m, p in zip(times["monitored"], times["plain"])])

    if path == "backport":  # what its generate_samples wrapper adds to every rollout batch, with Ray running
        import ray

        from openrlhf_bai.integration.backport import stop_published

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            checks = []
            for _ in range(min(steps, 1000)):
                start = clock()
                stop_published(monitored.args)
                checks.append((clock() - start) / 1e6)
        finally:
            ray.shutdown()
        result["stop_check"] = summary(checks)
    shutil.rmtree(root, ignore_errors=True)
    return result


def patched_openrlhf(into: Path) -> Path:
    """The installed OpenRLHF 0.11.2's release files (checked against its RECORD), patched, under `into`."""
    dist = importlib.metadata.distribution("openrlhf")
    assert dist.version == "0.11.2", f"the patch is against OpenRLHF 0.11.2, found {dist.version}"
    for file in dist.files:
        if file.parts[0] not in ("openrlhf", "tests") or file.hash is None:
            continue
        data = file.locate().read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.new(file.hash.mode, data).digest()).rstrip(b"=").decode()
        assert digest == file.hash.value, f"{file} differs from the openrlhf 0.11.2 wheel"
        (into / file).parent.mkdir(parents=True, exist_ok=True)
        (into / file).write_bytes(data)
    subprocess.run(["patch", "-s", "-p1", "-d", str(into), "-i", str(PATCH)], check=True)
    return into


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--path", choices=("api", "backport"), default=None, help=argparse.SUPPRESS)  # one, here
    opts = parser.parse_args(argv)
    if opts.path:
        print(json.dumps(measure(opts.path, opts.steps)))
        return 0

    results = {"steps": opts.steps, "python": sys.version.split()[0],
               "metrics_per_step": len(openrlhf_metrics(1, random.Random(0))), "patch_lines": patch_size()}
    with tempfile.TemporaryDirectory(prefix="bai-bench-patched-") as tmp:
        for path, pythonpath in (("api", [str(patched_openrlhf(Path(tmp)))]), ("backport", [])):
            pythonpath += [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
            done = subprocess.run([sys.executable, __file__, "--path", path, "--steps", str(opts.steps)], env=env,
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"bench_monitor: the {path} path failed:\n{done.stderr[-3000:]}")
            results[path] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"{opts.steps} steps, {results['metrics_per_step']} metrics a step, ms per step (median, p99)")
    rows = [("api: OpenRLHF (patched), no plugin", results["api"]["plain"]),
            ("api: + openrlhf-bai callback", results["api"]["monitored"]),
            ("api: monitor cost", results["api"]["monitor"]),
            ("backport: OpenRLHF 0.11.2, unwrapped", results["backport"]["plain"]),
            ("backport: + wrappers", results["backport"]["monitored"]),
            ("backport: monitor cost", results["backport"]["monitor"]),
            ("backport: stop check a rollout batch", results["backport"]["stop_check"])]
    for label, row in rows:
        print(f"{label:>38} {row['median_ms']:8.3f} {row['p99_ms']:8.3f}")
    lines = results["patch_lines"]
    print(f"patch: {lines['added']} lines added, {lines['removed']} removed; "
          f"{lines['added_code']} of the added lines outside OpenRLHF's tests/")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def patch_size() -> dict:
    """Lines the patch adds and removes, and those it adds outside OpenRLHF's tests/."""
    added = removed = added_code = 0
    in_tests = None  # before the first file's diff: the commit message
    for line in PATCH.read_text().splitlines():
        if line.startswith("diff --git "):
            in_tests = line.split()[-1].startswith("b/tests/")
        elif in_tests is None:
            continue
        elif line.startswith("+") and not line.startswith("+++"):
            added += 1
            added_code += not in_tests
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    return {"added": added, "removed": removed, "added_code": added_code}


if __name__ == "__main__":
    sys.exit(main())
