"""The plugin's entry points for an OpenRLHF with the two hook points of patches/openrlhf-0.11.2-actor-init.patch.

openrlhf.actor_init         bai = actor_init: OpenRLHF's own parser gets the --bai.* flags (actor_init.add_arguments),
                            and `--actor_init bai` runs the launcher's steps on OpenRLHF's parsed args, on the driver,
                            before any model is created.
openrlhf.trainer_callbacks  bai = trainer_callback: the plugin's trainer callbacks (the stability monitor first), in
                            the process that runs the PPO trainer; their save and stop requests are the API's
                            trainer.should_save and trainer.should_stop (hooks.request_checkpoint, request_stop).
"""

from __future__ import annotations

import argparse

from openrlhf_bai.errors import BAIError
from openrlhf_bai.integration import hooks, worker
from openrlhf_bai.integration.launcher import add_bai_arguments, init_actor, start_ray
from openrlhf_bai.integration.monitor import check_config, monitor_config


def actor_init(args) -> None:
    """`--actor_init bai`: merge (or reuse the cached merge) and point the actor, and a critic that is the actor, at
    it; then start Ray with the plugin's worker setup hook, as the launcher does, so OpenRLHF's train() joins it."""
    try:
        check_config(monitor_config(args.bai))  # bad thresholds fail here, not in a Ray worker after the first step
        init_actor(args)
        print(f"openrlhf-bai: actor initialized from {args.actor.model_name_or_path} (alpha {args.bai.alpha:g})")
        if args.bai.merge_only:  # the merged checkpoint is the last line of stdout
            print(args.actor.model_name_or_path)
            raise SystemExit(0)
        start_ray(args.bai)
    except BAIError as e:
        raise SystemExit(f"openrlhf-bai: error: {e}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --bai.* flags, in a group of their own; OpenRLHF's parser has its own --actor_init."""
    add_bai_arguments(parser.add_argument_group("openrlhf-bai (--actor_init bai, stability monitor)"), actor_init=False)


actor_init.add_arguments = add_arguments


def trainer_callback(trainer, global_step: int, logs_dict: dict, client_states: dict) -> None:
    """OpenRLHF's trainer-callback entry point: the plugin's callbacks (the stability monitor first) at every step,
    guarded by hooks.run_callbacks; the first call in a process registers them. A failure is reported, never raised
    into OpenRLHF's loop."""
    if not hooks.BUILTIN:
        try:
            worker.install_hooks()
        except Exception as e:
            hooks.report_error(trainer, "openrlhf_bai.install_hooks", e)
            return
    hooks.run_callbacks(trainer, global_step, logs_dict, client_states)
