"""Trainer callbacks: functions that see every step OpenRLHF's PPO trainer logs, guarded so they never end the training.

A callback is fn(trainer, global_step, logs_dict, client_states), the signature of OpenRLHF's trainer-callback API
(patches/openrlhf-0.11.2-actor-init.patch): keys it adds to logs_dict are logged (wandb, TensorBoard), keys it adds to
client_states are checkpointed, and it may ask for a checkpoint at this step and for the end of training after it.

install_hooks(*builtin)    registers `builtin` (the caller's own callbacks, first), then the entry points of
                           `openrlhf_bai.callbacks`. Where OpenRLHF has the callback API (has_callback_api()), its
                           `openrlhf.trainer_callbacks` entry point (upstream.trainer_callback) runs them and nothing
                           is wrapped; elsewhere backport.install() wraps three of OpenRLHF's methods to do the same.
run_callbacks(...)         runs them; a callback that raises is reported (report_error) and the step goes on. Only
                           a user callback raises through, and only with trainer.bai_strict_callbacks set.
report_error(t, who, e)    logs a failure once per who-and-reason through OpenRLHF's logger, counts every one in
                           the step's bai/monitor_errors.
register_callback(fn)      adds a callback.
request_checkpoint(t)      trainer.should_save: OpenRLHF's own save code writes a checkpoint at this step.
request_stop(t)            trainer.should_save and trainer.should_stop: that checkpoint, then training ends.
resumed_states(t)          the client_states of the checkpoint the run resumed from ({} on a fresh start).
why_no_monitor()           None where the installed OpenRLHF can run the monitor, else the one line saying why.

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
# The OpenRLHF releases `make test` runs the monitor on (tests/test_openrlhf_versions.py); older ones are refused.
TESTED_OPENRLHF = ("0.10.4", "0.11.0", "0.11.1", "0.11.2")


def has_callback_api() -> bool:
    """Whether the installed OpenRLHF has the trainer-callback API (should_save, should_stop, checkpoint_states)."""
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer

    return hasattr(BasePPOTrainer, "should_stop")


def why_no_monitor() -> str | None:
    """None where the stability monitor runs in the installed OpenRLHF; else one line naming the reason."""
    try:
        version = importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        return "OpenRLHF is not installed"
    release = tuple(int(part) for part in version.split(".")[:3] if part.isdigit())
    oldest = TESTED_OPENRLHF[0]
    if release < tuple(map(int, oldest.split("."))):  # 0.10.0 and older: flat args (args.ckpt_path), other loops
        return (f"the stability monitor needs OpenRLHF {oldest} or later (tested: {', '.join(TESTED_OPENRLHF)}), "
                f"found {version}; training runs without it, `openrlhf-bai diagnose` reads its logs afterwards")
    return None


def register_callback(callback):
    """Add a trainer callback (once); returns it, so it also works as a decorator."""
    if not callable(callback):
        raise BAIError(f"a trainer callback must be callable, got {callback!r}")
    if callback not in CALLBACKS:
        CALLBACKS.append(callback)
    return callback


def install_hooks(*builtin) -> None:
    """Register `builtin`, then the entry-point callbacks; backport the callback API where OpenRLHF lacks it."""
    why = why_no_monitor()  # before importing OpenRLHF's trainer, which an older release may fail at
    if why:
        raise BAIError(why)
    if not has_callback_api():
        from openrlhf_bai.integration import backport

        backport.install()

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


def request_checkpoint(trainer) -> None:
    """Make the step being logged a checkpoint step (callbacks call this; the save follows the loggers)."""
    trainer.should_save = True


def request_stop(trainer) -> None:
    """Save a checkpoint at this step, then end training: no rollout batch is trained after this one."""
    trainer.should_save = True
    trainer.should_stop = True


def resumed_states(trainer) -> dict:
    """What the callbacks saved in client_states, read back from the checkpoint a run resumed from."""
    return getattr(trainer, "checkpoint_states", None) or {}
