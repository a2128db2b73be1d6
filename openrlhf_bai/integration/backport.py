"""The trainer-callback API of patches/openrlhf-0.11.2-actor-init.patch, for an OpenRLHF released without it (0.10.4
to 0.11.2): hooks.install_hooks calls install() only where hooks.has_callback_api() is false. It wraps three of
OpenRLHF's methods (once per process), so that the callbacks' requests take the effect the patch gives them:

BasePPOTrainer.save_logs_and_checkpoints     runs hooks.run_callbacks before OpenRLHF's loggers and save; a
                                             trainer.should_save makes this one call a save step (save_steps 1),
                                             a trainer.should_stop is published in Ray's key-value store.
BasePPOTrainer.restore_best_checkpoint_state keeps the checkpoint's client_states in trainer.checkpoint_states
                                             (PPOTrainer.fit and the async PPOTrainerAsync.fit both call it).
SamplesGenerator.generate_samples            once a stop is published, returns what it returns when the prompts
                                             have run out: PPOTrainer.fit, or the async generator actor (another
                                             process, hence the key-value store), ends as at a normal end.
"""

from __future__ import annotations

from openrlhf_bai.integration import hooks


def install() -> None:
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer

    if getattr(BasePPOTrainer.save_logs_and_checkpoints, "_openrlhf_bai", False):
        return
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    BasePPOTrainer.save_logs_and_checkpoints = _wrap_save_logs(BasePPOTrainer.save_logs_and_checkpoints)
    BasePPOTrainer.restore_best_checkpoint_state = _wrap_restore(BasePPOTrainer.restore_best_checkpoint_state)
    SamplesGenerator.generate_samples = _wrap_generate_samples(SamplesGenerator.generate_samples)


def _wrap_save_logs(original):
    def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
        # Fresh dicts where the caller passed none, so that callbacks' additions reach the loggers and the save.
        logs_dict = {} if logs_dict is None else logs_dict
        client_states = {} if client_states is None else client_states
        hooks.run_callbacks(self, global_step, logs_dict, client_states)
        if self.__dict__.get("should_stop"):
            try:
                _publish_stop(self.args)
            except Exception as e:  # reported like a callback's failure, never raised into OpenRLHF's loop
                hooks.report_error(self, "openrlhf_bai.request_stop", e)
        if not self.__dict__.pop("should_save", False):
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
        try:
            self.checkpoint_states = dict(checkpoint_states or {})
        except Exception as e:  # whatever OpenRLHF restored, its own restore below must still run
            hooks.report_error(self, "openrlhf_bai.resumed_states", e)
        return original(self, checkpoint_states)

    restore_best_checkpoint_state.__wrapped__ = original
    return restore_best_checkpoint_state


def _wrap_generate_samples(original):
    def generate_samples(self, **generate_kwargs):
        try:
            stop = stop_published(self.args)
        except Exception as e:  # a lookup that fails is no stop: the rollout goes on
            stop = False
            _log_once(e)
        if stop:
            # What generate_samples returns once the prompts are used up: fit leaves its loops, closes its
            # loggers, and train() saves the final model, as at a normal end.
            return [], None, 0, True
        return original(self, **generate_kwargs)

    generate_samples.__wrapped__ = original
    return generate_samples


def _log_once(error: Exception) -> None:
    # No trainer here (a SamplesGenerator) to count it in bai/monitor_errors: OpenRLHF's logger, once per process.
    if not _log_once.__dict__.get("done"):
        _log_once.done = True
        from openrlhf.utils.logging_utils import init_logger

        init_logger("openrlhf_bai").error(f"[openrlhf-bai] reading a stop request failed: {type(error).__name__}: "
                                          f"{error}; rollouts go on, a requested stop may not end the generator")


def _stop_key(args) -> bytes:
    # The trainer and (in async mode) the generator are different Ray actors of one job sharing one args;
    # Ray's key-value store reaches both.
    import ray

    return f"openrlhf_bai:stop:{ray.get_runtime_context().get_job_id()}:{args.ckpt.path}".encode()


def _publish_stop(args) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_stop_key(args), b"1", overwrite=True)


def stop_published(args) -> bool:
    import ray
    from ray.experimental.internal_kv import _internal_kv_get

    return ray.is_initialized() and _internal_kv_get(_stop_key(args)) is not None
