"""Trainer hooks: callbacks that see every step OpenRLHF's PPO trainer logs, in every Ray worker.

install_hooks()            wraps BasePPOTrainer.save_logs_and_checkpoints, the one method both PPOTrainer.fit and
                           the async TrainingActor.fit call once per step, so each registered callback sees the step's
                           logs before wandb and TensorBoard do (and may add keys to them).
ray_runtime_env(env)       the user's runtime_env plus `worker_process_setup_hook`, so every Ray worker of the job
                           runs worker_setup(): flash-attn made importable, then install_hooks() once OpenRLHF's
                           trainer module is imported (a vLLM worker never imports it and never pays for it).
register_callback(fn)      fn(trainer, global_step, logs_dict, client_states) -> None; users' callbacks can also
                           come from the entry-point group `openrlhf_bai.callbacks`.
request_checkpoint(t)      ask for an OpenRLHF checkpoint at this step (OpenRLHF's own save code runs it).
request_stop(t)            end PPOTrainer.fit / the async generator loop as if the prompts had run out.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from types import SimpleNamespace

from openrlhf_bai.errors import BAIError

SETUP_HOOK = "openrlhf_bai.integration.hooks.worker_setup"
ENTRY_POINT_GROUP = "openrlhf_bai.callbacks"
TRAINER_MODULE = "openrlhf.trainer.ppo_trainer"
CALLBACKS: list = []  # called in order; the built-in stability monitor is first


def register_callback(callback):
    """Add a trainer callback (once); returns it, so it also works as a decorator."""
    if not callable(callback):
        raise BAIError(f"a trainer callback must be callable, got {callback!r}")
    if callback not in CALLBACKS:
        CALLBACKS.append(callback)
    return callback


def install_hooks() -> None:
    """Wrap OpenRLHF's trainer methods (once per process) and register the built-in and entry-point callbacks."""
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer

    from openrlhf_bai.integration.monitor import stability_monitor

    if not hasattr(BasePPOTrainer, "restore_best_checkpoint_state"):
        raise BAIError(
            f"the trainer hooks need OpenRLHF 0.11, found {importlib.metadata.version('openrlhf')}; "
            "--actor_init bai works with older releases, the live monitor does not (use `openrlhf-bai diagnose`)"
        )
    if not getattr(BasePPOTrainer.save_logs_and_checkpoints, "_openrlhf_bai", False):
        BasePPOTrainer.save_logs_and_checkpoints = _wrap_save_logs(BasePPOTrainer.save_logs_and_checkpoints)
        # Resume (0.11): the checkpoint's client_states reach the trainer here, in PPOTrainer.fit and in the
        # async PPOTrainerAsync.fit alike; callbacks read them back from trainer.bai_resumed_states.
        BasePPOTrainer.restore_best_checkpoint_state = _wrap_restore(BasePPOTrainer.restore_best_checkpoint_state)
        # Stop (0.11): every rollout batch of the sync trainer and of the async generator actor comes from here.
        from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

        SamplesGenerator.generate_samples = _wrap_generate_samples(SamplesGenerator.generate_samples)

    register_callback(stability_monitor)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_callback(entry_point.load())
        except Exception as e:
            raise BAIError(f"trainer callback {entry_point.name} = {entry_point.value} failed to load: {e}") from e


def _wrap_save_logs(original):
    def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
        # Fresh dicts where the caller passed none, so that callbacks' additions reach the loggers and the save.
        logs_dict = {} if logs_dict is None else logs_dict
        client_states = {} if client_states is None else client_states
        for callback in list(CALLBACKS):
            callback(self, global_step, logs_dict, client_states)
        if not self.__dict__.pop("_bai_checkpoint_requested", False):
            return original(self, global_step, logs_dict, client_states)
        # A save step for this one call: OpenRLHF's own code writes the checkpoint (tag, client_states, critic,
        # --ckpt.max_num rotation) exactly as at --ckpt.save_steps.
        save_steps, self.args.ckpt.save_steps = self.args.ckpt.save_steps, 1
        try:
            return original(self, global_step, logs_dict, client_states)
        finally:
            self.args.ckpt.save_steps = save_steps

    save_logs_and_checkpoints._openrlhf_bai = True
    save_logs_and_checkpoints.__wrapped__ = original
    return save_logs_and_checkpoints


def _wrap_restore(original):
    def restore_best_checkpoint_state(self, checkpoint_states):
        self.bai_resumed_states = dict(checkpoint_states or {})
        return original(self, checkpoint_states)

    restore_best_checkpoint_state.__wrapped__ = original
    return restore_best_checkpoint_state


def _wrap_generate_samples(original):
    def generate_samples(self, **generate_kwargs):
        if stop_requested(self.args):
            # What generate_samples returns once the prompts are used up: fit leaves its loops, closes its
            # loggers, and train() saves the final model, as at a normal end.
            return [], None, 0, True
        return original(self, **generate_kwargs)

    generate_samples.__wrapped__ = original
    return generate_samples


def request_checkpoint(trainer) -> None:
    """Make the step being logged a checkpoint step (callbacks call this; the save follows the loggers)."""
    trainer._bai_checkpoint_requested = True


def _stop_key(args) -> bytes:
    # The trainer and (in async mode) the generator are different Ray actors of one job sharing one args;
    # Ray's key-value store reaches both.
    import ray

    return f"openrlhf_bai:stop:{ray.get_runtime_context().get_job_id()}:{args.ckpt.path}".encode()


def request_stop(trainer) -> None:
    """Save a checkpoint at this step, then end training: no rollout batch is generated after this one."""
    from ray.experimental.internal_kv import _internal_kv_put

    request_checkpoint(trainer)
    _internal_kv_put(_stop_key(trainer.args), b"1", overwrite=True)


def stop_requested(args) -> bool:
    import ray
    from ray.experimental.internal_kv import _internal_kv_get

    return ray.is_initialized() and _internal_kv_get(_stop_key(args)) is not None


def ray_runtime_env(runtime_env: dict | None = None) -> dict:
    """`runtime_env` (not modified) plus the worker setup hook that installs the trainer hooks in every worker."""
    env = {**(runtime_env or {})}
    if "env_vars" in env:
        env["env_vars"] = dict(env["env_vars"])
    existing = env.get("worker_process_setup_hook")
    if existing not in (None, SETUP_HOOK):
        raise BAIError(f"runtime_env already has worker_process_setup_hook {existing!r}; "
                       f"Ray takes one, so call {SETUP_HOOK}() from it")
    env["worker_process_setup_hook"] = SETUP_HOOK
    return env


def worker_setup() -> None:
    """Ray's worker_process_setup_hook (see ray_runtime_env)."""
    from openrlhf_bai.integration.flash_attn_cpu import make_flash_attn_importable

    make_flash_attn_importable()
    if TRAINER_MODULE in sys.modules:
        install_hooks()
        return

    # Install right after the trainer module is first imported. Importing it here would pull deepspeed into
    # every worker, vLLM's included, which OpenRLHF keeps apart on purpose (see openrlhf/trainer/__init__.py).
    def find_spec(name, path=None, target=None):
        if name != TRAINER_MODULE:
            return None
        sys.meta_path.remove(finder)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            install_hooks()

        spec.loader.exec_module = exec_then_install
        return spec

    finder = SimpleNamespace(find_spec=find_spec)
    sys.meta_path.insert(0, finder)
