"""The trainer callbacks and the stability monitor, driven through OpenRLHF's own trainer code; the monitor never
harms the training it watches, and alerts.

The same tests run on the two paths the plugin takes: OpenRLHF's trainer-callback API where the installed OpenRLHF has
it (patches/openrlhf-0.11.2-actor-init.patch; tests/test_upstream_patch.py runs this file on the patched files) and
the wrappers of backport.py where it does not (the venv's OpenRLHF 0.11.2 as released; tests/test_openrlhf_versions.py
runs the metrics, save, stop and resume tests on 0.10.4, 0.11.0 and 0.11.1 too).

BasePPOTrainer instances are built with OpenRLHF's real __init__ (strategy = a namespace holding args, as
DeepspeedStrategy does); their save_logs_and_checkpoints writes through OpenRLHF's real TensorboardLogger and the
event files are read back. What needs GPUs is stood in for: RecordingActorGroup, in place of the RayActorGroup of
PolicyModelActors whose save_checkpoint runs DeepSpeed, records each call and returns a real ObjectRef; in the fit
loops, train_step returns the series' metrics and SamplesGenerator's vLLM call turns each prompt into one rollout.
"""

import argparse
import http.server
import importlib.metadata
import itertools
import json
import logging
import os
import random
import socket
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from openrlhf_bai.errors import BAIError
from openrlhf_bai.integration import hooks, worker
from openrlhf_bai.integration.monitor import CONFIG_ENV, JSONL_NAME, STATE_KEY, stability_monitor

LENGTH = "rollout/response_length_mean"
REWARD = "rollout/reward_mean"
STEPS = 30
DROP_AT = 11  # first step of the collapse in collapsing_series


def collapsing_series(seed=0):
    """Length ~1000 tokens (5% noise) falling to ~350 from DROP_AT on; reward ~0.5 dropping to -1.0 at DROP_AT,
    then climbing back linearly to 0.6 by step 26: a sequence length collapse and a reward hockey stick."""
    rng = random.Random(seed)
    rows = []
    for step in range(1, STEPS + 1):
        length = (1000.0 if step < DROP_AT else 350.0) * (1 + rng.uniform(-0.05, 0.05))
        if step < DROP_AT:
            reward = 0.5 + rng.uniform(-0.02, 0.02)
        else:
            reward = min(0.6, -1.0 + 1.6 * (step - DROP_AT) / 15)
        rows.append({LENGTH: length, REWARD: reward, "policy_loss": 0.01})
    return rows


def healthy_series(seed=0):
    """A healthy noisy run: length noise of 5 percent around 1000 tokens, reward rising from 0.2 to 0.8."""
    rng = random.Random(seed)
    return [
        {LENGTH: 1000.0 * (1 + rng.uniform(-0.05, 0.05)), REWARD: 0.2 + 0.02 * step + rng.uniform(-0.02, 0.02),
         "policy_loss": 0.01}
        for step in range(1, STEPS + 1)
    ]


def openrlhf_args(root, run_name="run", **extra):
    """OpenRLHF 0.11 args as its CLI builds them (dotted dests, then openrlhf.utils.config.hierarchize)."""
    from openrlhf.utils.config import hierarchize

    flat = {
        "logger.logging_steps": 1, "logger.tensorboard_dir": str(root / "tb"), "logger.wandb.key": None,
        "logger.wandb.run_name": run_name, "ckpt.path": str(root / "ckpt" / run_name), "ckpt.save_steps": float("inf"),
        "ckpt.load_enable": False, "ckpt.best_metric_key": "", "algo.kl.target": None, "algo.kl.init_coef": 0.0,
        "algo.kl.horizon": 10000, "algo.advantage.estimator": "reinforce", "algo.dynamic_filtering_enable": False,
        "eval.steps": float("inf"), "train.num_episodes": 1, "rollout.batch_size": 1, "rollout.n_samples_per_prompt": 1,
        "rollout.vllm_generate_batch_size": 1, "vllm.enable_sleep": False, **extra,
    }
    return hierarchize(argparse.Namespace(**flat))


class RecordingActorGroup:
    """In place of the PolicyModelActor group (DeepSpeed on GPUs): records calls, returns real ObjectRefs."""

    def __init__(self):
        self.calls = []

    def async_run_method(self, method_name, *args, **kwargs):
        import ray

        self.calls.append((method_name, kwargs))
        return [ray.put(None)]


def make_trainer(args, trainer_class=None, actor_group=None):
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer

    trainer_class = trainer_class or BasePPOTrainer
    trainer = object.__new__(trainer_class)
    BasePPOTrainer.__init__(trainer, SimpleNamespace(args=args), actor_group, None, None, None, None, None)
    return trainer


def drive(trainer, rows, first_step=1):
    """Call OpenRLHF's save_logs_and_checkpoints once per step, as PPOTrainer.fit does; return what callbacks added."""
    added = []
    for step, metrics in enumerate(rows, first_step):
        logs = dict(metrics)
        states = {"episode": 0, "global_step": step, "total_consumed_prompts": step, "data_loader_state_dict": {}}
        trainer.save_logs_and_checkpoints(step, logs, states)
        added.append(({k: v for k, v in logs.items() if k not in metrics}, states))
    trainer.tensorboard_logger.close()
    return added


def tensorboard_scalars(args):
    accumulator = EventAccumulator(os.path.join(args.logger.tensorboard_dir, args.logger.wandb.run_name),
                                   size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def first_step_at_1(series: dict) -> int | None:
    return min((step for step, value in series.items() if value == 1.0), default=None)


def first_alarm(tb) -> int:
    """The first step either detector raised."""
    return min(step for step in (first_step_at_1(tb.get("train/bai/length_collapse", {})),
                                 first_step_at_1(tb.get("train/bai/hockey_stick", {}))) if step is not None)


def sustained_step(series: dict, patience: int = 3, strength: float = 1.0) -> int | None:
    """The first step a detection's bai/<detector>_strength has been >= strength at patience steps in a row: where
    --bai.on_collapse save/stop acts (strong and sustained)."""
    steps = sorted(series)
    return next((s for i, s in enumerate(steps) if i + 1 >= patience
                 and all(series[t] >= strength for t in steps[i + 1 - patience:i + 1])), None)


def first_action(tb, patience: int = 3) -> int:
    """The first step save/stop acted on: the first sustained detection of either detector."""
    return min(step for step in (sustained_step(tb.get("train/bai/length_collapse_strength", {}), patience),
                                 sustained_step(tb.get("train/bai/hockey_stick_strength", {}), patience))
               if step is not None)


@pytest.fixture
def hooked(monkeypatch):
    """The plugin's callbacks installed as in a trainer's process, in a registry that is restored after the test."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setattr(hooks, "CALLBACKS", [])
    monkeypatch.setattr(hooks, "BUILTIN", [])
    worker.install_hooks()


def callback_path() -> str:
    return "api" if hooks.has_callback_api() else "backport"


def test_the_monitor_takes_openrlhfs_callback_api_where_it_has_one_and_wraps_nothing(tmp_path, hooked, record_property):
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    from openrlhf_bai.integration import upstream

    import openrlhf

    path = callback_path()
    # Read by the tests that run this file on other OpenRLHF files: which path, which OpenRLHF.
    record_property("callback_path", path)
    record_property("openrlhf", f"{importlib.metadata.version('openrlhf')} {os.path.dirname(openrlhf.__file__)}")
    methods = (BasePPOTrainer.save_logs_and_checkpoints, BasePPOTrainer.restore_best_checkpoint_state,
               SamplesGenerator.generate_samples)
    trainer = make_trainer(openrlhf_args(tmp_path))
    if path == "api":
        # An ordinary callback of OpenRLHF's entry-point group; OpenRLHF's own methods, not one wrapped.
        assert trainer.trainer_callbacks == [upstream.trainer_callback]
        assert {method.__module__ for method in methods} == {"openrlhf.trainer.ppo_trainer",
                                                             "openrlhf.trainer.ppo_utils.samples_generator"}
        assert "openrlhf_bai.integration.backport" not in sys.modules
        assert "worker_process_setup_hook" not in worker.ray_runtime_env({})
    else:
        assert {method.__module__ for method in methods} == {"openrlhf_bai.integration.backport"}
        assert worker.ray_runtime_env({})["worker_process_setup_hook"] == worker.SETUP_HOOK
    drive(trainer, healthy_series()[:3])
    assert [json.loads(line)["step"] for line in open(os.path.join(trainer.args.ckpt.path, JSONL_NAME))] == [1, 2, 3]


@pytest.fixture
def monitor_log(caplog):
    """What the monitor logs through OpenRLHF's logger (which does not propagate to pytest's root handler)."""
    logger = logging.getLogger("openrlhf_bai")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_collapse_and_hockey_stick_reach_tensorboard_and_jsonl(tmp_path, hooked, monitor_log):
    args = openrlhf_args(tmp_path)
    drive(make_trainer(args), collapsing_series())
    tb = tensorboard_scalars(args)

    collapse_step = first_step_at_1(tb["train/bai/length_collapse"])
    hockey_step = first_step_at_1(tb["train/bai/hockey_stick"])
    assert collapse_step is not None and DROP_AT <= collapse_step <= DROP_AT + 4
    assert hockey_step is not None and DROP_AT <= hockey_step <= DROP_AT + 4
    assert set(tb["train/bai/length_collapse_step"].values()) == {float(collapse_step)}
    assert tb["train/bai/response_length_ratio"][STEPS] == pytest.approx(0.35, abs=0.04)
    assert max(tb["train/bai/reward_drawdown"].values()) > 10  # -1.0 against a 0.5 +- 0.01 baseline
    assert tb["train/bai/length_collapse_strength"][collapse_step] > 0  # how far past the threshold, noise units
    assert all(v < 0 for s, v in tb["train/bai/length_collapse_strength"].items() if s < DROP_AT)
    recovery = tb["train/bai/reward_recovery_steps"]
    assert min(recovery) > DROP_AT + 10 and len(set(recovery.values())) == 1  # the climb back takes ~15 steps
    assert all(tb["train/bai/length_collapse"][s] == 0 for s in range(1, DROP_AT))  # judged from the first step
    assert tb["train/rollout/reward_mean"][1] == pytest.approx(collapsing_series()[0][REWARD])  # OpenRLHF's own logs

    rows = [json.loads(line) for line in open(os.path.join(args.ckpt.path, JSONL_NAME))]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[collapse_step - 1]["bai/length_collapse_step"] == collapse_step and LENGTH in rows[0]

    warnings = [r.getMessage() for r in monitor_log.records if r.levelname == "WARNING"]
    assert len(warnings) == 2  # --bai.on_collapse warn: the raise is warned; being sustained changes nothing
    assert f"step {collapse_step}: sequence length collapse" in " ".join(warnings)
    assert f"step {hockey_step}: reward hockey stick" in " ".join(warnings)
    assert all("noise units past the threshold" in w for w in warnings)


def test_a_collapse_that_comes_back_is_reported_ended_and_raised_and_saved_again_when_it_returns(
        tmp_path, hooked, monitor_log, monkeypatch, ray_with_hooks):  # Ray: OpenRLHF's save path ray.get()s
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"on_collapse": "save"}))
    rng = random.Random(2)
    shape = [1000.0] * 10 + [100.0] * 10 + [1000.0] * 10 + [100.0] * 10
    rows = [{LENGTH: v * (1 + rng.uniform(-0.03, 0.03)), REWARD: 0.5, "policy_loss": 0.01} for v in shape]
    args, group = openrlhf_args(tmp_path), RecordingActorGroup()
    drive(make_trainer(args, actor_group=group), rows)
    tb = tensorboard_scalars(args)
    flagged = [s for s, v in sorted(tb["train/bai/length_collapse"].items()) if v == 1.0]
    first, second = flagged[0], next(s for s in flagged if s > 30)
    assert 11 <= first <= 15 and 31 <= second <= 35 and not any(23 <= s <= 30 for s in flagged)
    messages = [(r.levelname, r.getMessage()) for r in monitor_log.records if "length collapse" in r.getMessage()]
    # raised, sustained (saved), ended, raised again, sustained again (saved again)
    assert [level for level, _ in messages] == ["WARNING", "WARNING", "INFO", "WARNING", "WARNING"]
    assert f"raised at step {first} has ended" in messages[2][1] and "again: the last one ended" in messages[3][1]
    sustained = [sustained_step({s: v for s, v in tb["train/bai/length_collapse_strength"].items() if s > after})
                 for after in (0, 30)]
    assert [kw["tag"] for name, kw in group.calls if name == "save_checkpoint"] == [
        f"global_step{s}" for s in sustained]


def test_healthy_noisy_runs_stay_silent(tmp_path, hooked, monitor_log):
    for seed in range(5):
        args = openrlhf_args(tmp_path, run_name=f"healthy{seed}")
        drive(make_trainer(args), healthy_series(seed))
        tb = tensorboard_scalars(args)
        assert set(tb["train/bai/length_collapse"].values()) == {0.0}
        assert set(tb["train/bai/hockey_stick"].values()) == {0.0}
        assert "train/bai/length_collapse_step" not in tb and "train/bai/reward_recovery_steps" not in tb
        assert min(tb["train/bai/response_length_ratio"].values()) > 0.9
    assert monitor_log.records == []


def test_entropy_collapse_and_kl_blowup_reach_tensorboard_and_a_healthy_noisy_entropy_stays_silent(
        tmp_path, hooked, monitor_log):
    rng = random.Random(0)
    # OpenRLHF 0.11 logs the mean token entropy as entropy_loss (with --actor.entropy_coef, 0 included).
    collapsing = [{**row, "entropy_loss": (1.0 if step < 12 else 0.05) * (1 + rng.uniform(-0.03, 0.03)),
                   "kl": 0.002 if step < 20 else 1.5}
                  for step, row in enumerate(healthy_series(1), 1)]
    args = openrlhf_args(tmp_path, run_name="entropy")
    drive(make_trainer(args), collapsing)
    tb = tensorboard_scalars(args)
    assert 12 <= first_step_at_1(tb["train/bai/entropy_collapse"]) <= 12 + 4
    assert min(tb["train/bai/entropy_ratio"].values()) < 0.1
    assert 20 <= first_step_at_1(tb["train/bai/kl_blowup"]) <= 20 + 4
    warnings = [r.getMessage() for r in monitor_log.records if r.levelname == "WARNING"]
    assert any("entropy collapse" in m for m in warnings) and any("KL blow-up" in m for m in warnings)

    healthy = [{**row, "entropy_loss": (0.6 - 0.005 * step) * (1 + rng.gauss(0, 0.1)), "kl": 0.0005 * step}
               for step, row in enumerate(healthy_series(2), 1)]
    args = openrlhf_args(tmp_path, run_name="entropy-healthy")
    drive(make_trainer(args), healthy)
    tb = tensorboard_scalars(args)
    assert set(tb["train/bai/entropy_collapse"].values()) == {0.0} and set(tb["train/bai/kl_blowup"].values()) == {0.0}


def test_resumed_run_keeps_its_baseline_through_client_states(tmp_path, hooked):
    rows = collapsing_series(seed=3)
    whole = drive(make_trainer(openrlhf_args(tmp_path, run_name="whole")), rows)

    first = drive(make_trainer(openrlhf_args(tmp_path, run_name="first")), rows[:8])
    saved = json.loads(json.dumps(first[-1][1]))  # client_states as a checkpoint stores them
    assert saved[STATE_KEY]["signals"]["length"]["points"]  # the values its reference is taken from
    resumed = make_trainer(openrlhf_args(tmp_path, run_name="resumed"))
    resumed.restore_best_checkpoint_state(saved)  # what PPOTrainer.fit does with the checkpoint's states
    second = drive(resumed, rows[8:], first_step=9)
    assert [added for added, _ in second] == [added for added, _ in whole[8:]]


def test_stability_off_and_thresholds_from_the_environment(tmp_path, hooked, monkeypatch, monitor_log):
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"stability": "off"}))
    args = openrlhf_args(tmp_path, run_name="off")
    added = drive(make_trainer(args), collapsing_series())
    assert all(not a for a, _ in added) and not os.path.exists(os.path.join(args.ckpt.path, JSONL_NAME))

    # A collapse_ratio below the collapsed length's ratio (~0.35) never fires; patience 1 judges the reward on its
    # last point alone, so the hockey stick fires at the drop itself.
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"collapse_ratio": 0.2, "patience": 1}))
    args = openrlhf_args(tmp_path, run_name="strict")
    drive(make_trainer(args), collapsing_series())
    tb = tensorboard_scalars(args)
    assert set(tb["train/bai/length_collapse"].values()) == {0.0}
    assert first_step_at_1(tb["train/bai/hockey_stick"]) in (DROP_AT, DROP_AT + 1)

    # Settings the monitor cannot use (the launcher refuses them; here they come straight from the environment):
    # reported, not raised, and the steps are logged without the monitor.
    for bad, message in (({"collapse_ratio": 0}, "--bai.collapse_ratio must be in"),
                         ({"smoothing": 0.5}, "--bai.smoothing was removed in 0.3: use --bai.patience"),
                         ("on", "must hold a JSON object")):
        monkeypatch.setenv(CONFIG_ENV, json.dumps(bad) if isinstance(bad, dict) else bad)
        monitor_log.clear()
        args = openrlhf_args(tmp_path, run_name=f"bad-{bad}")
        drive(make_trainer(args), collapsing_series()[:3])
        tb = tensorboard_scalars(args)
        assert tb["train/bai/monitor_errors"] == {1: 1.0, 2: 2.0, 3: 3.0} and len(tb[f"train/{REWARD}"]) == 3
        assert [r.getMessage() for r in monitor_log.records if message in r.getMessage()] != []
        assert len(monitor_log.records) == 1


def test_install_is_idempotent_and_user_callbacks_come_from_the_registry_and_entry_points(
        tmp_path, hooked, monkeypatch):
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer

    worker.install_hooks()
    method = BasePPOTrainer.save_logs_and_checkpoints
    assert not getattr(getattr(method, "__wrapped__", None), "_openrlhf_bai", False)  # wrapped once at most
    assert hooks.CALLBACKS == hooks.BUILTIN == [stability_monitor]  # registered once

    site = write_callback_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    worker.install_hooks()
    seen = []
    hooks.register_callback(lambda trainer, step, logs, states: seen.append(step))
    with pytest.raises(BAIError, match="must be callable"):
        hooks.register_callback("not a function")

    args = openrlhf_args(tmp_path)
    drive(make_trainer(args), healthy_series()[:6])
    assert seen == [1, 2, 3, 4, 5, 6]
    assert tensorboard_scalars(args)["train/user/steps_seen"] == {s: float(s) for s in range(1, 7)}


def write_callback_distribution(site):
    """A user's package that declares a callback in the `openrlhf_bai.callbacks` entry-point group."""
    dist = site / "user_bai_callbacks-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: user-bai-callbacks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[openrlhf_bai.callbacks]\nsteps = user_bai_callbacks:count_steps\n")
    (site / "user_bai_callbacks.py").write_text(textwrap.dedent("""
        def count_steps(trainer, global_step, logs_dict, client_states):
            trainer.user_steps = getattr(trainer, "user_steps", 0) + 1
            logs_dict["user/steps_seen"] = trainer.user_steps
    """))
    return site


def test_ray_runtime_env_keeps_the_users_env_and_refuses_a_second_hook():
    user = {"env_vars": {"A": "1"}, "pip": ["x"]}
    env = worker.ray_runtime_env(user)
    assert user == {"env_vars": {"A": "1"}, "pip": ["x"]}
    assert worker.ray_runtime_env(env) == env
    if callback_path() == "api":  # OpenRLHF's entry point runs the callbacks: nothing to set up in the workers
        assert env == user and env["env_vars"] is not user["env_vars"]
        return
    assert env == {"env_vars": {"A": "1"}, "pip": ["x"], "worker_process_setup_hook": worker.SETUP_HOOK}
    with pytest.raises(BAIError, match="already has worker_process_setup_hook"):
        worker.ray_runtime_env({"worker_process_setup_hook": "my.hook"})


# ------------------------------------------------------------------ inside Ray workers that got only ray_runtime_env()


@pytest.fixture(scope="module")
def ray_with_hooks(tmp_path_factory):
    import ray

    site = write_callback_distribution(tmp_path_factory.mktemp("ray-site"))
    # Functions of this test module travel by value: the workers cannot import it (`tests` is OpenRLHF's there).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
                CONFIG_ENV: json.dumps({"on_collapse": "stop"})}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=worker.ray_runtime_env({"env_vars": env_vars}))
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def drive_in_worker(root, run_name, rows, bai=None):
    """Runs in a Ray worker: nothing here installs hooks; the worker setup hook must have done it."""
    deepspeed_before = "deepspeed" in sys.modules
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer

    args = openrlhf_args(root, run_name)
    saved_env = os.environ.get(CONFIG_ENV)
    if bai is not None:  # a patched OpenRLHF parser holding the --bai.* flags, in a job started without the variable
        args.bai = SimpleNamespace(**bai)
        os.environ.pop(CONFIG_ENV, None)
    group = RecordingActorGroup()
    try:
        added = drive(make_trainer(args, actor_group=group), rows)
    finally:
        if saved_env is not None:
            os.environ[CONFIG_ENV] = saved_env
    return {
        "deepspeed_before": deepspeed_before,
        "path": callback_path(),
        "wrapped": getattr(BasePPOTrainer.save_logs_and_checkpoints, "_openrlhf_bai", False),
        "saves": [(kwargs["tag"], kwargs["client_states"])
                  for name, kwargs in group.calls if name == "save_checkpoint"],
        "added": [a for a, _ in added],
    }


def cpu_samples_generator(args, prompts_dataloader):
    """OpenRLHF's SamplesGenerator, its vLLM call (_generate_vllm) replaced: each prompt becomes one rollout, counted in
    .generated. The release's own generate_samples (batching, buffer, exhaustion) runs as it is."""
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    class CPUSamplesGenerator(SamplesGenerator):
        generated = 0

        def _generate_vllm(self, dataloader_iter, num_prompts, dynamic_filtering, **generate_kwargs):
            prompts = list(itertools.islice(dataloader_iter, num_prompts))
            self.generated += len(prompts)
            return [f"rollout {prompt}" for prompt in prompts], len(prompts), len(prompts) < num_prompts

    return CPUSamplesGenerator(SimpleNamespace(args=args), prompts_dataloader, None, None, None)


def series_trainer(root, name, trainer_actor, rows):
    """(args, actor group, trainer): OpenRLHF's trainer Ray actor class `trainer_actor` as a plain object whose
    train_step returns the series' metrics (the PPO update needs GPUs) and records the steps it trained."""

    class CPUTrainer(trainer_actor.__ray_actor_class__):
        def train_step(self, rollout_samples, global_step):
            self.trained.append(global_step + 1)
            return dict(rows[global_step]), global_step + 1

    args, group = openrlhf_args(root, name), RecordingActorGroup()
    trainer = make_trainer(args, CPUTrainer, group)
    trainer.trained = []
    return args, group, trainer


def fit_in_worker(root, rows):
    """Runs in a Ray worker: OpenRLHF's own PPOTrainer.fit loop, with its SamplesGenerator (vLLM's part on CPU)."""
    from openrlhf.trainer.ppo_trainer import PPOTrainer
    from torchdata.stateful_dataloader import StatefulDataLoader

    args, group, trainer = series_trainer(root, "fit", PPOTrainer, rows)
    trainer.prompts_dataloader = StatefulDataLoader(list(range(len(rows))), batch_size=1)
    trainer.eval_dataloader = None
    trainer.generate_kwargs = {}
    trainer.samples_generator = cpu_samples_generator(args, trainer.prompts_dataloader)
    trainer.fit()
    return {"trained": trainer.trained, "saves": [kw["tag"] for name, kw in group.calls if name == "save_checkpoint"],
            "generated": trainer.samples_generator.generated}


def test_monitor_in_ray_workers_hooked_only_by_the_runtime_env(tmp_path, ray_with_hooks):
    ray = ray_with_hooks
    task = ray.remote(drive_in_worker)
    collapsing, healthy, saving = ray.get([
        task.remote(tmp_path, "collapsing", collapsing_series()),
        task.remote(tmp_path, "healthy", healthy_series()),
        task.remote(tmp_path, "saving", collapsing_series(seed=1), {"on_collapse": "save", "patience": 2}),
    ])
    assert not collapsing["deepspeed_before"]
    assert collapsing["path"] == callback_path() and collapsing["wrapped"] == (callback_path() == "backport")

    # on_collapse=stop from the runtime_env: the first detection that is strong and sustained is saved as an OpenRLHF
    # checkpoint (patience steps in a row at least action_strength noise units past its threshold).
    tb = tensorboard_scalars(openrlhf_args(tmp_path, "collapsing"))
    first = first_action(tb)
    assert DROP_AT <= first_alarm(tb) < first <= DROP_AT + 6
    assert [tag for tag, _ in collapsing["saves"]] == [f"global_step{first}"]
    assert collapsing["saves"][0][1][STATE_KEY]["detectors"]["length_collapse"]["reference"] == pytest.approx(1000,
                                                                                                             rel=0.1)
    assert tb["train/user/steps_seen"][STEPS] == STEPS  # the user's entry-point callback, in the worker

    tb = tensorboard_scalars(openrlhf_args(tmp_path, "healthy"))
    assert (set(tb["train/bai/length_collapse"].values()) == {0.0}
            and set(tb["train/bai/hockey_stick"].values()) == {0.0})
    assert healthy["saves"] == []

    # Without the variable, args.bai (a patched parser) is read: save, with patience 2, each detection saves once,
    # when it is sustained.
    tb = tensorboard_scalars(openrlhf_args(tmp_path, "saving"))
    steps = sorted({sustained_step(tb["train/bai/length_collapse_strength"], 2),
                    sustained_step(tb["train/bai/hockey_stick_strength"], 2)})
    assert [tag for tag, _ in saving["saves"]] == [f"global_step{s}" for s in steps]


def test_on_collapse_stop_ends_ppotrainer_fit_cleanly(tmp_path, ray_with_hooks):
    ray = ray_with_hooks
    result = ray.get(ray.remote(fit_in_worker).remote(tmp_path, collapsing_series()))
    tb = tensorboard_scalars(openrlhf_args(tmp_path, "fit"))
    stop = first_action(tb)
    assert result["trained"] == list(range(1, stop + 1))  # no step after the one that acted
    assert result["saves"] == [f"global_step{stop}"]
    assert result["generated"] == stop  # the loop ended at the stop, with prompts left, not by running out
    assert max(tb["train/rollout/reward_mean"]) == stop


def async_fit_in_worker(root, rows):
    """Runs in a Ray worker: OpenRLHF's async pair as PPOTrainerAsync.fit runs it, GenerateSamplesActor.fit (here in
    a thread) feeding TrainingActor.fit through two real Ray queues of one slot, with the vLLM lock actor; the
    SamplesGenerator's vLLM part on CPU, train_step returning the series' metrics."""
    import threading

    from openrlhf.trainer.ppo_trainer_async import GenerateSamplesActor, TrainingActor, VLLMLock
    from ray.util.queue import Queue
    from torchdata.stateful_dataloader import StatefulDataLoader

    args, group, trainer = series_trainer(root, "async", TrainingActor, rows)
    generator = object.__new__(GenerateSamplesActor.__ray_actor_class__)
    generator.args, generator.generate_kwargs, generator.eval_dataloader = args, {}, None
    generator.prompts_dataloader = StatefulDataLoader(list(range(len(rows))), batch_size=1)
    generator.samples_generator = cpu_samples_generator(args, generator.prompts_dataloader)
    generator.vllm_lock, generator._partial_rollout = VLLMLock.remote(), False
    generator._last_eval_step, generator._eval_just_done = -1, False
    rollout_queue, rollout_slots = (Queue(maxsize=1, actor_options={"num_cpus": 0}) for _ in range(2))
    rollout_slots.put(0)
    for actor in (trainer, generator):
        actor.rollout_queue, actor.rollout_slots = rollout_queue, rollout_slots
    thread = threading.Thread(target=generator.fit, args=(0, 0), daemon=True)
    thread.start()
    trainer.fit()
    thread.join(timeout=60)
    return {"trained": trainer.trained, "saves": [kw["tag"] for name, kw in group.calls if name == "save_checkpoint"],
            "generator_ended": not thread.is_alive(), "generated": generator.samples_generator.generated,
            "path": callback_path()}


def test_on_collapse_stop_ends_the_async_trainer_and_its_generator_cleanly(tmp_path, ray_with_hooks):
    ray = ray_with_hooks
    result = ray.get(ray.remote(async_fit_in_worker).remote(tmp_path, collapsing_series()))
    tb = tensorboard_scalars(openrlhf_args(tmp_path, "async"))
    stop = first_action(tb)  # stop acts on the first detection that is strong and sustained, not on the raise
    assert DROP_AT <= first_alarm(tb) < stop <= DROP_AT + 6
    assert result["generator_ended"] and result["saves"] == [f"global_step{stop}"]
    if result["path"] == "api":
        # The batch generated while the stop step trained is dropped: nothing is trained after the stop step.
        assert result["trained"] == list(range(1, stop + 1)) and result["generated"] == stop + 1
    else:
        # The backport stops the generator only (Ray's key-value store); the trainer still trains what was queued.
        assert result["trained"] in (list(range(1, stop + 1)), list(range(1, stop + 2)))
        assert result["generated"] == len(result["trained"])


# ------------------------------------------------------------------ never harm: failures are reported, steps go on
# The same real trainer, loggers (wandb offline, see conftest) and checkpoint stand-in; alerts over real HTTP to
# servers on 127.0.0.1.

SAFETY_STEPS = 16


def odd(rows):
    """The series with values of every type OpenRLHF's TensorboardLogger accepts, as a trainer may log them."""
    rows = [dict(r) for r in rows]
    rows[1][LENGTH] = np.float32(rows[1][LENGTH])
    rows[2][REWARD] = torch.tensor(rows[2][REWARD])
    rows[3][LENGTH] = torch.tensor([rows[3][LENGTH]])  # one element, one dimension
    for r in rows:
        r.update({"clip_ratio": np.float64(0.1), "tokens": np.int64(7), "truncated": True, "kl": float("inf"),
                  "lr": "1e-6", "eval_pass1": None, "generated_samples": ("an answer", 0.5)})
    return rows


def unwritable(tmp_path):
    """A ckpt.path below a regular file: not writable even by root."""
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "ckpt")


def broken_callbacks(site):
    """A user's package: one callback that raises at every step, one entry point that cannot be imported."""
    dist = site / "broken_bai_callbacks-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-bai-callbacks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[openrlhf_bai.callbacks]\nbuggy = broken_bai_callbacks:buggy\n"
                                           "missing = no_such_module_anywhere:callback\n")
    (site / "broken_bai_callbacks.py").write_text(textwrap.dedent("""
        def buggy(trainer, global_step, logs_dict, client_states):
            logs_dict["user/before_the_bug"] = global_step
            return 1 / 0
    """))
    return site


def test_unwritable_ckpt_path_odd_values_and_failing_callbacks_never_stop_a_step(
        tmp_path, hooked, monitor_log, monkeypatch, ray_with_hooks):  # Ray: OpenRLHF's save path ray.get()s
    monkeypatch.syspath_prepend(str(broken_callbacks(tmp_path / "site")))
    worker.install_hooks()
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"on_collapse": "save"}))
    args = openrlhf_args(tmp_path, run_name="odd", **{"ckpt.path": unwritable(tmp_path)})
    group = RecordingActorGroup()
    rows = odd(collapsing_series()[:SAFETY_STEPS])
    drive(make_trainer(args, actor_group=group), rows)  # raises nothing
    tb = tensorboard_scalars(args)

    every = set(range(1, SAFETY_STEPS + 1))
    for key in (LENGTH, REWARD, "clip_ratio", "tokens", "truncated", "kl", "lr", "policy_loss", "user/before_the_bug"):
        assert set(tb[f"train/{key}"]) == every, key  # OpenRLHF's own metrics and the user's, at every step
    assert tb[f"train/{LENGTH}"][2] == pytest.approx(float(rows[1][LENGTH]))
    # The monitor's metrics still reach TensorBoard although its JSONL file cannot be written ...
    assert set(tb["train/bai/length_collapse"]) == every
    # ... and each sustained detection still saves a checkpoint through OpenRLHF's own save code.
    detected = sorted({sustained_step(tb["train/bai/length_collapse_strength"]),
                       sustained_step(tb["train/bai/hockey_stick_strength"])})
    assert [kw["tag"] for name, kw in group.calls if name == "save_checkpoint"] == [f"global_step{s}" for s in detected]
    # Three failures a step (the JSONL file, the buggy callback, the entry point that does not load), counted.
    assert tb["train/bai/monitor_errors"] == {s: 3.0 * s for s in every}

    errors = [r.getMessage() for r in monitor_log.records if r.levelname == "ERROR"]
    assert len(errors) == 3  # each logged once, with its reason
    assert any(m.startswith("[openrlhf-bai] stability_monitor failed: NotADirectoryError") for m in errors)
    assert any(m.startswith("[openrlhf-bai] buggy failed: ZeroDivisionError") for m in errors)
    assert any(m.startswith("[openrlhf-bai] missing = no_such_module_anywhere:callback failed: "
                            "BAIError: failed to load: ModuleNotFoundError") for m in errors)


def test_values_the_detectors_cannot_read_are_skipped_not_failures(tmp_path, hooked):
    """Text, nested dicts, lists and multi-element tensors (wandb logs them; the monitor reads none of them)."""
    args = openrlhf_args(tmp_path, run_name="text", **{"logger.tensorboard_dir": None})
    rows = healthy_series()[:8]
    for row, value in zip(rows[5:], ("long", {"mean": 900.0}, torch.tensor([900.0, 950.0]))):
        row[LENGTH] = value
        row["samples"] = ["a", "b"]
    added = drive_without_tensorboard(make_trainer(args), rows)
    assert all("bai/monitor_errors" not in a for a in added)
    assert [("bai/length_collapse" in a) for a in added] == [True] * 5 + [False] * 3  # the unreadable: none
    jsonl = [json.loads(line) for line in open(os.path.join(args.ckpt.path, JSONL_NAME))]
    assert [r["step"] for r in jsonl] == list(range(1, 9)) and LENGTH not in jsonl[6] and "samples" not in jsonl[6]


def drive_without_tensorboard(trainer, rows):
    added = []
    for step, metrics in enumerate(rows, 1):
        logs = dict(metrics)
        trainer.save_logs_and_checkpoints(step, logs, {"global_step": step})
        added.append({k: v for k, v in logs.items() if k not in metrics})
    return added


def test_strict_callbacks_makes_user_callbacks_fatal_but_not_the_monitor(tmp_path, hooked, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"strict_callbacks": True}))
    args = openrlhf_args(tmp_path, run_name="strict", **{"ckpt.path": unwritable(tmp_path)})
    trainer = make_trainer(args)
    trainer.save_logs_and_checkpoints(1, {LENGTH: 1000.0}, {})  # the monitor's own failure: reported, not raised
    assert trainer._bai_errors["count"] == 1

    hooks.register_callback(lambda trainer, step, logs, states: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trainer.save_logs_and_checkpoints(2, {LENGTH: 1000.0}, {})

    # An entry point that does not load is a user callback's failure too.
    monkeypatch.setattr(hooks, "CALLBACKS", list(hooks.BUILTIN))
    monkeypatch.syspath_prepend(str(broken_callbacks(tmp_path / "site")))
    worker.install_hooks()
    with pytest.raises((BAIError, ZeroDivisionError)):
        make_trainer(openrlhf_args(tmp_path, run_name="strict2")).save_logs_and_checkpoints(1, {}, {})


# ------------------------------------------------------------------------------------------------------- alerts


class Recorder(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.posts = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def wait_for_alerts():
    for thread in threading.enumerate():
        if thread.name == "openrlhf-bai-alert":
            thread.join(10)


def test_one_json_post_per_detection_and_a_wandb_alert_on_openrlhfs_run(tmp_path, hooked, monkeypatch, webhook):
    import wandb

    url = f"http://127.0.0.1:{webhook.server_address[1]}/hook"
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"alert_url": url, "on_collapse": "warn"}))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    # OpenRLHF's own WandbLogger (wandb offline, see conftest) opens the run; its alerts are recorded on the way.
    args = openrlhf_args(tmp_path, run_name="alerting", **{"logger.wandb.key": "offline-key", "logger.wandb.org": None,
                                                           "logger.wandb.project": "bai", "logger.wandb.group": None})
    trainer = make_trainer(args)
    run_alerts = []
    real_alert = wandb.run.alert
    monkeypatch.setattr(wandb.run, "alert", lambda **kw: run_alerts.append(kw) or real_alert(**kw))
    try:
        drive(trainer, collapsing_series())
    finally:
        trainer.wandb_logger.close()
    wait_for_alerts()

    tb = tensorboard_scalars(args)
    detections = {"length_collapse": tb["train/bai/length_collapse"], "hockey_stick": tb["train/bai/hockey_stick"]}
    expected = {name: min(s for s, v in series.items() if v == 1.0) for name, series in detections.items()}
    assert sorted((p["detector"], p["step"]) for _, p in webhook.posts) == sorted(expected.items())
    for content_type, post in webhook.posts:
        assert content_type == "application/json"
        assert post["text"] == post["content"] and post["text"].startswith(
            f"[openrlhf-bai] alerting, step {post['step']}: ")
        assert post["run"] == "alerting" and post["ckpt_path"] == args.ckpt.path and post["action"] == "warn"
        assert post["text"].endswith("--bai.on_collapse warn: training goes on")
        assert all(isinstance(v, float) for v in post["values"].values()) and post["values"]
    collapse = next(p for _, p in webhook.posts if p["detector"] == "length_collapse")
    assert collapse["values"]["response_length_ratio"] < 0.6

    assert [(a["title"], a["level"]) for a in run_alerts] == [
        (f"openrlhf-bai: {p['detector']}", wandb.AlertLevel.WARN)
        for _, p in sorted(webhook.posts, key=lambda x: x[1]["step"])]
    assert {a["text"] for a in run_alerts} == {p["text"] for _, p in webhook.posts}


def test_a_healthy_run_sends_no_alert(tmp_path, hooked, monkeypatch, webhook):
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"alert_url": f"http://127.0.0.1:{webhook.server_address[1]}/"}))
    drive(make_trainer(openrlhf_args(tmp_path, run_name="healthy")), healthy_series())
    wait_for_alerts()
    assert webhook.posts == []


@pytest.mark.parametrize("server", ["hangs", "refuses"])
def test_an_alert_server_that_hangs_or_refuses_does_not_hold_up_a_step(tmp_path, hooked, monkeypatch, monitor_log,
                                                                       server):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if server == "hangs":
        sock.listen(8)  # connections complete in the backlog, nobody ever answers
    else:
        sock.close()  # nothing listens: connection refused
    timeout = 0.5
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"alert_url": f"http://127.0.0.1:{port}/", "alert_timeout": timeout}))
    trainer = make_trainer(openrlhf_args(tmp_path, run_name=server))
    slowest = 0.0
    for step, metrics in enumerate(collapsing_series(), 1):
        start = time.perf_counter()
        trainer.save_logs_and_checkpoints(step, dict(metrics), {})
        slowest = max(slowest, time.perf_counter() - start)
    trainer.tensorboard_logger.close()
    assert slowest < timeout  # the POSTs wait in their own threads, not in the step
    wait_for_alerts()
    sock.close()
    assert trainer._bai_errors["count"] == 2  # both detections' alerts failed, after one retry each
    errors = [r.getMessage() for r in monitor_log.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("[openrlhf-bai] alert to 127.0.0.1 failed")
