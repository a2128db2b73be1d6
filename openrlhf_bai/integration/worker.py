"""The plugin in the trainer's process: the trainer callbacks (hooks.py) with the stability monitor (monitor.py) as
their built-in callback. The one module that imports both: monitor imports hooks, hooks imports neither.

install_hooks()            hooks.install_hooks(stability_monitor): in this process, idempotent.
ray_runtime_env(env)       the user's runtime_env; where OpenRLHF lacks the trainer-callback API, plus
                           `worker_process_setup_hook`, so every Ray worker of the job runs worker_setup():
                           flash-attn made importable, then install_hooks() once OpenRLHF's trainer module is
                           imported (a vLLM worker never imports it and never pays for it). Where OpenRLHF has the
                           API, its `openrlhf.trainer_callbacks` entry point (upstream.py) needs no setup hook.
"""

from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

from openrlhf_bai.errors import BAIError
from openrlhf_bai.integration import hooks
from openrlhf_bai.integration.monitor import stability_monitor

SETUP_HOOK = "openrlhf_bai.integration.worker.worker_setup"
TRAINER_MODULE = "openrlhf.trainer.ppo_trainer"


def install_hooks() -> None:
    """The trainer hooks with the stability monitor first, then the `openrlhf_bai.callbacks` entry points."""
    hooks.install_hooks(stability_monitor)


def ray_runtime_env(runtime_env: dict | None = None) -> dict:
    """`runtime_env` (not modified), plus the worker setup hook that installs the trainer hooks in every worker
    where OpenRLHF lacks the trainer-callback API."""
    env = {**(runtime_env or {})}
    if "env_vars" in env:
        env["env_vars"] = dict(env["env_vars"])
    if hooks.has_callback_api():
        return env
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
