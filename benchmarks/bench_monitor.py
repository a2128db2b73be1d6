"""The stability monitor's cost per training step, in the trainer's process.

OpenRLHF 0.11.2's real BasePPOTrainer.save_logs_and_checkpoints is called once per step on two trainers built
alike: one through the plugin's hooks (every detector, the client_states copy, the JSONL row, --bai.alert_url
configured but idle: a healthy run fires nothing), one through the unhooked original. Both loggers are off (wandb
and TensorBoard cost the same with or without the plugin), no checkpoint is due, so the difference is the plugin's.
The two are timed in alternation, step by step, so that both see the same machine.

    python benchmarks/bench_monitor.py [--steps 3000] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace


def openrlhf_metrics(step: int, rng: random.Random) -> dict:
    """What PPOTrainer.fit hands save_logs_and_checkpoints in 0.11: rollout stats and the actor's merged status."""
    noise = lambda scale: 1 + rng.uniform(-scale, scale)  # noqa: E731
    return {
        "rollout/reward_mean": 0.2 + 0.001 * step + rng.uniform(-0.02, 0.02), "rollout/reward_std": 0.3 * noise(0.1),
        "rollout/response_length_mean": 1000.0 * noise(0.05), "rollout/truncated_rate": 0.05 * noise(0.2),
        "rollout/num_samples": 1024.0, "policy_loss": 0.01 * noise(0.5), "actor_lr": 1e-6, "clip_ratio": 0.1 * noise(0.2),
        "kl": 0.01 * noise(0.3), "entropy_loss": 1.0 * noise(0.05), "policy_entropy": 1.0 * noise(0.05),
        "actor_grad_norm": 0.5 * noise(0.3), "response_length": 1000.0 * noise(0.05), "total_length": 1300.0,
        "return": 0.2, "reward": 0.2, "ppo_clip_count": 3.0, "policy_update_steps": 4.0,
        **{f"timing/{name}": rng.uniform(1, 10) for name in ("generate", "make_experience", "ppo_train", "broadcast")},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--json", default=None, metavar="FILE")
    opts = parser.parse_args(argv)

    from openrlhf_bai.integration.flash_attn_cpu import make_flash_attn_importable

    make_flash_attn_importable()
    import argparse as ap

    from openrlhf.trainer.ppo_trainer import BasePPOTrainer
    from openrlhf.utils.config import hierarchize

    from openrlhf_bai.integration import worker
    from openrlhf_bai.integration.monitor import CONFIG_ENV, JSONL_NAME

    # An address nothing is sent to: the alert path is configured, and idle because nothing fires.
    os.environ[CONFIG_ENV] = json.dumps({"alert_url": "http://127.0.0.1:9/", "on_collapse": "warn"})
    root = tempfile.mkdtemp(prefix="bai-bench-monitor-")

    def trainer(name):
        args = hierarchize(ap.Namespace(**{
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
    worker.install_hooks()
    hooked = BasePPOTrainer.save_logs_and_checkpoints
    assert hooked is not original
    plain, monitored = trainer("plain"), trainer("monitored")
    rng = random.Random(0)
    times = {"unhooked": [], "hooked": []}
    clock = time.perf_counter_ns
    for step in range(1, opts.steps + 1):
        metrics = openrlhf_metrics(step, rng)
        for name, method, t in (("unhooked", original, plain), ("hooked", hooked, monitored)):
            logs = dict(metrics)
            states = {"episode": 0, "global_step": step, "total_consumed_prompts": step, "data_loader_state_dict": {}}
            start = clock()
            method(t, step, logs, states)
            times[name].append((clock() - start) / 1e6)
    with open(os.path.join(root, "monitored", JSONL_NAME)) as f:
        assert sum(1 for _ in f) == opts.steps  # the monitor really ran, once per step
    assert not monitored.__dict__.get("_bai_errors"), "the monitor failed during the benchmark"
    assert "events" in monitored._bai_monitor["state"] and not monitored._bai_monitor["state"]["events"]

    def p99(xs):
        return statistics.quantiles(xs, n=100)[98]

    result = {"steps": opts.steps, "python": sys.version.split()[0], "metrics_per_step": len(openrlhf_metrics(1, rng))}
    for name, xs in times.items():
        result[name] = {"median_ms": statistics.median(xs), "p99_ms": p99(xs)}
    diffs = [h - u for h, u in zip(times["hooked"], times["unhooked"])]
    result["monitor"] = {"median_ms": statistics.median(diffs), "p99_ms": p99(diffs)}
    print(f"{opts.steps} steps, {result['metrics_per_step']} metrics a step (ms per step)")
    print(f"{'':>26} {'median':>8} {'p99':>8}")
    for name, label in (("unhooked", "OpenRLHF, unhooked"), ("hooked", "OpenRLHF + openrlhf-bai"),
                        ("monitor", "monitor (hooked - unhooked)")):
        print(f"{label:>26} {result[name]['median_ms']:8.3f} {result[name]['p99_ms']:8.3f}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
