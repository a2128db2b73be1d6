"""The stability monitor: the plugin's built-in trainer callback (worker.install_hooks registers it first).

Each step PPOTrainer.fit logs, the detectors of openrlhf_bai.diagnostics.detectors (the ones `diagnose` runs) turn
the step's metrics into bai/* metrics, which are
- added to the step's logs, so OpenRLHF's own wandb and TensorBoard loggers write them as train/bai/...;
- kept in client_states, so a run resumed from an OpenRLHF checkpoint keeps its baseline;
- appended, with the step's other numbers, to <ckpt.path>/bai_diagnostics.jsonl (`openrlhf-bai diagnose` reads it).
When a detector fires (any detector: an alarm event in the detectors' state), a warning through OpenRLHF's logger
and an alert, both with the detection's strength (noise units past its threshold): one JSON POST to
--bai.alert_url from a thread of its own, and wandb's alert on the run OpenRLHF's wandb logger opened. The step's
bai/<detector>_strength metric carries the same number. --bai.on_collapse save (an OpenRLHF checkpoint at that
step) or stop (that checkpoint and the end of training) acts only on a detection that is strong and sustained:
held at --bai.patience consecutive log points, each at least --bai.action_strength noise units past its
threshold (a "sustained" event in the detectors' state); with warn, nothing more happens.

Whatever fails in here is reported by hooks.run_callbacks (logged once, counted in bai/monitor_errors) and the step
goes on; the steps above run in that order so that a failure late (the JSONL file) spares what came before.

Settings: the JSON object in $OPENRLHF_BAI_MONITOR (the launcher and --actor_init bai put it in the Ray runtime_env,
from the user's flags), else trainer.args.bai when a patched OpenRLHF parser holds the --bai.* flags; a missing
key takes its default.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import pickle
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict

from openrlhf_bai.diagnostics.detectors import Thresholds, make_thresholds, new_state, observe, upgrade_state
from openrlhf_bai.errors import BAIError
from openrlhf_bai.integration.hooks import report_error, request_checkpoint, request_stop, resumed_states

CONFIG_ENV = "OPENRLHF_BAI_MONITOR"
STATE_KEY = "bai_monitor"  # in OpenRLHF's client_states
JSONL_NAME = "bai_diagnostics.jsonl"
ON_COLLAPSE = ("warn", "save", "stop")
DEFAULTS = {"stability": "on", "on_collapse": "warn", "strict_callbacks": False, "alert_url": None,
            "alert_timeout": 2.0, **asdict(Thresholds())}
CONSEQUENCE = {"warn": "training goes on", "save": "saving a checkpoint", "stop": "saving a checkpoint, then stopping"}


def monitor_config(bai) -> dict:
    """The monitor's settings from a namespace holding the --bai.* flags (args.bai), defaults filled in."""
    return {key: getattr(bai, key, default) for key, default in DEFAULTS.items()}


def check_config(config: dict) -> None:
    """Raise BAIError for settings the detectors cannot work with."""
    if config["stability"] not in ("on", "off"):
        raise BAIError(f"--bai.stability must be on or off, got {config['stability']!r}")
    if config["on_collapse"] not in ON_COLLAPSE:
        raise BAIError(f"--bai.on_collapse must be one of {', '.join(ON_COLLAPSE)}, got {config['on_collapse']!r}")
    if not isinstance(config["strict_callbacks"], bool):
        raise BAIError(f"--bai.strict_callbacks must be true or false, got {config['strict_callbacks']!r}")
    url = config["alert_url"]
    if url is not None and (not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https")
                            or not urllib.parse.urlsplit(url).hostname):
        raise BAIError("--bai.alert_url must be an http:// or https:// URL")  # not echoed: webhook URLs are secrets
    timeout = config["alert_timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
        raise BAIError(f"--bai.alert_timeout must be in (0, 60] seconds, got {timeout!r}")
    make_thresholds(config)  # the detectors' own limits, named by flag


def stability_monitor(trainer, global_step: int, logs_dict: dict, client_states: dict) -> None:
    from openrlhf.utils.logging_utils import init_logger

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
        trainer.bai_strict_callbacks = config["strict_callbacks"]  # read by hooks.run_callbacks
        saved = resumed_states(trainer).get(STATE_KEY)
        th = make_thresholds(config)
        # 0.2's state (version 2) is carried over (its windows become the references, what it raised stays raised);
        # 0.1's has no version: start afresh.
        resumed = upgrade_state(copy.deepcopy(saved), th) if saved else None
        run = trainer._bai_monitor = {"config": config, "thresholds": th, "state": resumed or new_state()}
        # The run's response-length cap, so a length drop can be told from the cap letting go (0.11; older: 0.10).
        rollout = getattr(args, "rollout", None)
        cap = getattr(rollout, "max_new_tokens", None) or getattr(args, "generate_max_len", None)
        if isinstance(cap, numbers.Real) and not isinstance(cap, bool) and cap > 0:
            run["state"]["cap"] = float(cap)
        if resumed:
            logger.info(f"[openrlhf-bai] monitor resumed after {resumed['steps']} steps with its references"
                        + ("" if saved.get("version") == resumed["version"] else
                           f" (state of version {saved.get('version')} carried over)"))
        elif saved:
            logger.info("[openrlhf-bai] monitor state saved by an older version without references: starting afresh")
    if run["config"]["stability"] == "off":
        return

    state, th, config = run["state"], run["thresholds"], run["config"]
    seen = len(state.get("events", ()))  # a state saved by 0.1 has no events yet
    logs_dict.update(observe(state, global_step, logs_dict, th))
    # A snapshot, as the checkpoint must hold this step's state; the state is plain numbers and lists, which a
    # pickle round trip in memory copies 5x faster than deepcopy (nothing is read from disk here).
    client_states[STATE_KEY] = pickle.loads(pickle.dumps(state))

    fired, sustained = [], []
    for event in state["events"][seen:]:
        if event["alarm"]:
            fired.append(event)
        elif event.get("sustained"):
            sustained.append(event)
        else:
            logger.info(f"[openrlhf-bai] step {global_step}: {event['message']}")
    action = config["on_collapse"]  # one action for every detector
    if fired and not run.get("stopping"):
        for event in fired:
            logger.warning(f"[openrlhf-bai] step {global_step}: {event['message']}; --bai.on_collapse {action}: "
                           + (CONSEQUENCE[action] if action == "warn" else f"{action} once it is sustained"))
    if sustained and action != "warn" and not run.get("stopping"):  # with warn, the raise was the one message
        for event in sustained:
            logger.warning(f"[openrlhf-bai] step {global_step}: {event['message']}; --bai.on_collapse {action}: "
                           f"{CONSEQUENCE[action]}")
        if action == "save":
            request_checkpoint(trainer)
        elif action == "stop":
            request_stop(trainer)
            run["stopping"] = True  # steps still logged before the loop ends (async queue) save nothing more
    if fired or (sustained and action != "warn"):
        try:  # a failing alert must not cost the step its JSONL row
            for event in fired + (sustained if action != "warn" else []):
                alert(trainer, config, event, action)
        except Exception as e:
            report_error(trainer, "alert", e)

    row = {"step": global_step}
    for key, value in logs_dict.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy scalars too; not tensors, text
            row[key] = float(value) if math.isfinite(value) else None
    path = os.path.join(trainer.args.ckpt.path, JSONL_NAME)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def alert(trainer, config: dict, event: dict, action: str) -> None:
    """One detection to the outside: wandb's alert on OpenRLHF's wandb run, and a POST to --bai.alert_url."""
    args = trainer.args
    run_name = getattr(getattr(getattr(args, "logger", None), "wandb", None), "run_name", None)
    sustained = action == "warn" or event.get("sustained")
    consequence = CONSEQUENCE[action] if sustained else f"{action} once it is sustained"
    text = f"[openrlhf-bai] {run_name or args.ckpt.path}, step {event['step']}: {event['message']}; " \
           f"--bai.on_collapse {action}: {consequence}"
    wandb_logger = getattr(trainer, "wandb_logger", None)
    if wandb_logger is not None:  # its handle is the wandb module, whose run is the one OpenRLHF's logger opened
        wandb = wandb_logger.handle
        wandb.run.alert(title=f"openrlhf-bai: {event['detector']}", text=text, level=wandb.AlertLevel.WARN)
    if config["alert_url"] is None:
        return
    payload = {
        "text": text,  # Slack's incoming webhooks show `text`,
        "content": text[:2000],  # Discord's show `content` (at most 2000 characters)
        "run": run_name, "ckpt_path": args.ckpt.path, "step": event["step"], "detector": event["detector"],
        "message": event["message"], "action": action, "sustained": bool(event.get("sustained")),
        "strength": event["values"].get("strength"),
        "values": {k: v if isinstance(v, (int, float)) and math.isfinite(v) else None
                   for k, v in event["values"].items()},
    }
    # Its own thread: the step never waits for the network. Not a daemon, so an alert sent as training stops
    # (--bai.on_collapse stop) still leaves before the process exits: at most twice the timeout later.
    threading.Thread(target=_post, args=(trainer, config["alert_url"], config["alert_timeout"],
                                         json.dumps(payload).encode()), name="openrlhf-bai-alert").start()


def _post(trainer, url: str, timeout: float, body: bytes) -> None:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    for attempt in range(2):  # at most one retry
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return
        except Exception as e:
            if attempt:
                # Named by host only: the whole URL of a webhook is its secret.
                report_error(trainer, f"alert to {urllib.parse.urlsplit(url).hostname}", e)
            else:
                time.sleep(min(timeout, 1.0))
