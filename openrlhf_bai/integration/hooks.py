"""Trainer hooks: callbacks that see every step OpenRLHF's PPO trainer logs, guarded so they never end the training.

install_hooks(*builtin)    wraps BasePPOTrainer.save_logs_and_checkpoints, the one method both PPOTrainer.fit and
                           the async TrainingActor.fit call once per step, so each registered callback sees the step's
                           logs before wandb and TensorBoard do (and may add keys to them); registers `builtin` (the
                           caller's own callbacks, first), then the entry points of `openrlhf_bai.callbacks`.
run_callbacks(...)         runs them; a callback that raises is reported (report_error) and the step goes on. Only
                           a user callback raises through, and only with trainer.bai_strict_callbacks set.
report_error(t, who, e)    logs a failure once per who-and-reason through OpenRLHF's logger, counts every one in
                           the step's bai/monitor_errors.
register_callback(fn)      fn(trainer, global_step, logs_dict, client_states) -> None.
request_checkpoint(t)      ask for an OpenRLHF checkpoint at this step (OpenRLHF's own save code runs it).
request_stop(t)            end PPOTrainer.fit / the async generator loop as if the prompts had run out.

This module knows no particular callback: worker.py installs it with the stability monitor (monitor.py), which
imports it for the requests and report_error.
"""

from __future__ import annotations

import importlib.metadata
import os

from openrlhf_bai.errors import BAIError

ENTRY_POINT_GROUP = "openrlhf_bai.callbacks"
CALLBACKS: list = []  # called in order; install_hooks' built-in callbacks first
BUILTIN: list = []  # the plugin's own: their failures are never fatal, --bai.strict_callbacks or not
ERRORS_METRIC = "bai/monitor_errors"


def register_callback(callback):
    """Add a trainer callback (once); returns it, so it also works as a decorator."""
    if not callable(callback):
        raise BAIError(f"a trainer callback must be callable, got {callback!r}")
    if callback not in CALLBACKS:
        CALLBACKS.append(callback)
    return callback


def install_hooks(*builtin) -> None:
    """Wrap OpenRLHF's trainer methods (once per process); register `builtin`, then the entry-point callbacks."""
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer

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

    for callback in builtin:
        if callback not in CALLBACKS:
            CALLBACKS.insert(len(BUILTIN), callback)
            BUILTIN.append(callback)
    loaded = {getattr(callback, "__name__", None) for callback in CALLBACKS}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_callback(entry_point.load())
        except Exception as e:
            # Not raised here (a Ray worker's setup hook would die of it): a callback that raises it at every step,
            # so the guard reports it like any failing callback, or raises it under --bai.strict_callbacks.
            name = f"{entry_point.name} = {entry_point.value}"
            if name not in loaded:
                register_callback(_failed_to_load(name, e))


def _failed_to_load(name, error):
    def callback(trainer, global_step, logs_dict, client_states):
        raise BAIError(f"failed to load: {type(error).__name__}: {error}") from error

    callback.__name__ = callback.__qualname__ = name
    return callback


def run_callbacks(trainer, global_step, logs_dict, client_states) -> None:
    """Every registered callback on this step. A failure is reported and the next callback runs: the step's own
    metrics, checkpoint and stop requests go on. trainer.bai_strict_callbacks (the monitor sets it from
    --bai.strict_callbacks) lets a user callback's failure end the step; the plugin's own never does."""
    for callback in list(CALLBACKS):
        try:
            callback(trainer, global_step, logs_dict, client_states)
        except Exception as e:
            if callback not in BUILTIN and trainer.__dict__.get("bai_strict_callbacks"):
                raise
            report_error(trainer, getattr(callback, "__qualname__", repr(callback)), e)
    errors = trainer.__dict__.get("_bai_errors")
    if errors:  # cumulative, from the first failure on, so wandb and TensorBoard show it
        logs_dict[ERRORS_METRIC] = errors["count"]


def report_error(trainer, who: str, error: BaseException) -> None:
    """Count `error` in bai/monitor_errors; log it (with its traceback) the first time `who` fails this way, a way
    being the exception's type and the line that raised it, so a failure repeated at every step is logged once."""
    errors = trainer.__dict__.setdefault("_bai_errors", {"count": 0, "logged": set()})
    errors["count"] += 1
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}" if tb else "?"
    reason = (who, type(error).__name__, where)
    if reason in errors["logged"]:
        return
    errors["logged"].add(reason)
    from openrlhf.utils.logging_utils import init_logger

    init_logger("openrlhf_bai").error(
        f"[openrlhf-bai] {who} failed: {type(error).__name__}: {error} ({where}); training goes on, this failure is "
        f"not logged again, every failure is counted in {ERRORS_METRIC}", exc_info=error)


def _wrap_save_logs(original):
    def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
        # Fresh dicts where the caller passed none, so that callbacks' additions reach the loggers and the save.
        logs_dict = {} if logs_dict is None else logs_dict
        client_states = {} if client_states is None else client_states
        run_callbacks(self, global_step, logs_dict, client_states)
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
