"""The stability monitor: the built-in trainer callback (registered by hooks.install_hooks).

Each step PPOTrainer.fit logs, the detectors of openrlhf_bai.diagnostics.detectors (the ones `diagnose` runs) turn
rollout/response_length_mean and rollout/reward_mean into bai/* metrics, which are
- added to the step's logs, so OpenRLHF's own wandb and TensorBoard loggers write them as train/bai/...;
- appended, with the step's other numbers, to <ckpt.path>/bai_diagnostics.jsonl (`openrlhf-bai diagnose` reads it);
- kept in client_states, so a run resumed from an OpenRLHF checkpoint keeps its baseline.
When a detector fires: a warning through OpenRLHF's logger, then per --bai.on_collapse nothing more (warn),
an OpenRLHF checkpoint at that step (save), or that checkpoint and the end of training (stop).

Settings: the JSON object in $OPENRLHF_BAI_MONITOR (the launcher and --actor_init bai put it in the Ray runtime_env,
from the user's flags), else trainer.args.bai when a patched OpenRLHF parser holds the --bai.* flags; a missing
key takes its default.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict

from openrlhf_bai.diagnostics.detectors import STATE_VERSION, Thresholds, make_thresholds, new_state, observe
from openrlhf_bai.errors import BAIError

CONFIG_ENV = "OPENRLHF_BAI_MONITOR"
STATE_KEY = "bai_monitor"  # in OpenRLHF's client_states
JSONL_NAME = "bai_diagnostics.jsonl"
ON_COLLAPSE = ("warn", "save", "stop")
DEFAULTS = {"stability": "on", "on_collapse": "warn", **asdict(Thresholds())}


def monitor_config(bai) -> dict:
    """The monitor's settings from a namespace holding the --bai.* flags (args.bai), defaults filled in."""
    return {key: getattr(bai, key, default) for key, default in DEFAULTS.items()}


def check_config(config: dict) -> None:
    """Raise BAIError for settings the detectors cannot work with."""
    if config["stability"] not in ("on", "off"):
        raise BAIError(f"--bai.stability must be on or off, got {config['stability']!r}")
    if config["on_collapse"] not in ON_COLLAPSE:
        raise BAIError(f"--bai.on_collapse must be one of {', '.join(ON_COLLAPSE)}, got {config['on_collapse']!r}")
    make_thresholds(config)  # the detectors' own limits, named by flag


def stability_monitor(trainer, global_step: int, logs_dict: dict, client_states: dict) -> None:
    from openrlhf.utils.logging_utils import init_logger

    from openrlhf_bai.integration.hooks import request_checkpoint, request_stop

    logger = init_logger("openrlhf_bai")
    run = trainer.__dict__.get("_bai_monitor")
    if run is None:  # this trainer's first step, or the first after a resume
        args = trainer.args
        if CONFIG_ENV in os.environ:  # set from the user's flags by whoever started Ray (launcher or --actor_init)
            try:
                given = json.loads(os.environ[CONFIG_ENV])
            except json.JSONDecodeError:
                given = None
            if not isinstance(given, dict):
                raise BAIError(f"${CONFIG_ENV} must hold a JSON object, got {os.environ[CONFIG_ENV]!r}")
        else:  # a patched OpenRLHF parser holds the flags itself (or the defaults)
            given = monitor_config(args.bai) if hasattr(args, "bai") else {}
        config = {**DEFAULTS, **given}
        check_config(config)
        resumed = getattr(trainer, "bai_resumed_states", {}).get(STATE_KEY)
        if resumed and resumed.get("version") != STATE_VERSION:  # saved by 0.1's detectors: start afresh
            resumed = None
        run = trainer._bai_monitor = {
            "config": config,
            "thresholds": make_thresholds(config),
            "state": copy.deepcopy(resumed) if resumed else new_state(),
        }
        if resumed:
            logger.info(f"[openrlhf-bai] monitor resumed after {resumed['steps']} steps with its baselines")
    if run["config"]["stability"] == "off":
        return

    state, th = run["state"], run["thresholds"]
    seen = len(state.get("events", ()))  # a state saved by 0.1 has no events yet
    diagnostics = observe(state, global_step, logs_dict, th)
    logs_dict.update(diagnostics)
    client_states[STATE_KEY] = copy.deepcopy(state)

    row = {"step": global_step}
    for key, value in logs_dict.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = float(value) if math.isfinite(value) else None
    path = os.path.join(trainer.args.ckpt.path, JSONL_NAME)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")

    fired = []
    for event in state["events"][seen:]:
        if event["alarm"]:
            fired.append(event["message"])
        else:
            logger.info(f"[openrlhf-bai] step {global_step}: {event['message']}")
    if not fired or run.get("stopping"):
        return
    action = run["config"]["on_collapse"]
    consequence = {
        "warn": "training goes on", "save": "saving a checkpoint", "stop": "saving a checkpoint, then stopping"
    }
    for event in fired:
        logger.warning(f"[openrlhf-bai] step {global_step}: {event}; --bai.on_collapse {action}: {consequence[action]}")
    if action == "save":
        request_checkpoint(trainer)
    elif action == "stop":
        request_stop(trainer)
        run["stopping"] = True  # steps still logged before the loop ends (async queue) save nothing more
