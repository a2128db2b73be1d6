"""`--actor_init bai` for OpenRLHF's train_ppo_ray: merge on the driver, point the actor at the merge, run OpenRLHF.

run(argv), top to bottom:
  split argv        the --actor_init / --bai.* flags (add_bai_arguments) from OpenRLHF's, which pass through untouched;
                    a --bai.* flag we do not know is refused here, naming the closest (refuse_unknown_bai_flags)
  init_actor(args)  materialize the BAI checkpoint (merged into the shared cache, or on every node) and point the
                    actor, and a critic that is the actor, at it; a patched OpenRLHF parser calls the same function
  rewrite argv      --actor.model_name_or_path (0.10.2 on) or --pretrain (before), and the critic's flag
  merge_only        print the OpenRLHF command, shell-quoted, and stop
  start_ray         OpenRLHF's runtime_env env_vars + the worker setup hook (worker.py) + the monitor's settings
  runpy             OpenRLHF's own openrlhf.cli.train_ppo_ray as __main__: its parser, its checks, its train()

Everything happens before OpenRLHF creates a Ray actor, a vLLM engine or a DeepSpeed engine, so the actor, the
reference model, the vLLM engines, the tokenizer and a critic that defaults to the actor all load the merge.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import importlib.util
import json
import os
import runpy
import shlex
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from openrlhf_bai.diagnostics.detectors import HELP, RENAMED, Thresholds, renamed_message
from openrlhf_bai.errors import BAIError
from openrlhf_bai.integration.hooks import why_no_monitor
from openrlhf_bai.integration.monitor import CONFIG_ENV, ON_COLLAPSE, check_config, monitor_config
from openrlhf_bai.recipe import RECIPE_FLAGS, add_recipe_flags, bai_flag, recipe_from_flags

OPENRLHF_CLI = "openrlhf.cli.train_ppo_ray"
# The env_vars OpenRLHF's train() gives ray.init; a value set in the environment wins, as it does there.
OPENRLHF_ENV_VARS = {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
ACTOR_FLAGS = ("--actor.model_name_or_path", "--pretrain")  # OpenRLHF 0.10.2 on, before
CRITIC_FLAGS = ("--critic.model_name_or_path", "--critic_pretrain")


def add_bai_arguments(parser, actor_init: bool = True) -> None:
    """Add every --bai.* option (dests "bai.<name>") and, unless the parser has its own (a patched OpenRLHF),
    --actor_init (alias --actor.init, dest "actor.init")."""
    th = Thresholds()
    if actor_init:
        parser.add_argument("--actor_init", "--actor.init", dest="actor.init", choices=("none", "bai"),
                            default="none",
                            help="bai: initialize the actor with the BAI merge of --bai.base and --bai.sft "
                                 "(default none)")
    add_recipe_flags(parser, spell=bai_flag)  # the recipe's flags, as `merge` and `probe` have them
    parser.add_argument("--bai.output_dir", default=None, metavar="DIR",
                        help="directory for the merged actor (default: the shared cache, $OPENRLHF_BAI_CACHE/merged, "
                             "~/.cache/openrlhf-bai/merged when unset, one directory per recipe hash, reused by a "
                             "repeat run)")
    parser.add_argument("--bai.overwrite", action="store_true",
                        help="replace a --bai.output_dir that holds something else")
    parser.add_argument("--bai.materialize", choices=("shared", "per_node"), default="shared",
                        help="shared (default): merge once on the driver, into a path every node can read; "
                             "per_node: merge on every alive Ray node into the same local path, checked by recipe hash")
    parser.add_argument("--bai.threads", type=int, default=None, metavar="N",
                        help="threads of the merge (default: the cores the process may use); changes no byte of it")
    parser.add_argument("--bai.merge_only", action="store_true",
                        help="merge, print the OpenRLHF command (launcher) or the merged checkpoint (OpenRLHF's own "
                             "--actor_init) as the last line of stdout, exit")
    parser.add_argument("--bai.stability", choices=("on", "off"), default="on",
                        help="the stability monitor in the trainer (default on)")
    parser.add_argument("--bai.on_collapse", choices=ON_COLLAPSE, default="warn",
                        help="when a detector fires: warn (default), save an OpenRLHF checkpoint, "
                             "or stop (save, then end training); the same for every detector")
    parser.add_argument("--bai.alert_url", default=None, metavar="URL",
                        help="POST each detection as JSON from the trainer to this URL: a Slack or Discord incoming "
                             "webhook ({\"text\": ...}, {\"content\": ...}) or your own service (default: none)")
    parser.add_argument("--bai.alert_timeout", type=float, default=2.0, metavar="S",
                        help="seconds an alert POST may take, tried at most twice, never waited for by the step "
                             "(default 2)")
    parser.add_argument("--bai.strict_callbacks", action="store_true",
                        help="let a failing user callback (register_callback, openrlhf_bai.callbacks entry points) "
                             "end training; by default it is logged once and counted in bai/monitor_errors")
    parser.add_argument("--bai.entropy", choices=("on", "off"), default="on",
                        help="on (default): add --actor.entropy_coef 0 to an OpenRLHF command (0.10.2 on) that "
                             "does not set it, so OpenRLHF logs entropy_loss (the entropy detector's signal) without "
                             "changing the loss; off: leave the command as it is")
    for name, default in asdict(th).items():  # the detectors' thresholds (openrlhf_bai.diagnostics.detectors)
        parser.add_argument(f"--bai.{name}", type=type(default), default=default, metavar="X",
                            help=f"{HELP[name]} (default {default})")


def init_actor(args) -> None:
    """With args.actor.init == "bai": materialize the BAI checkpoint and point args.actor.model_name_or_path (and
    args.critic.model_name_or_path where it is the actor's path) at it. `args` is OpenRLHF's hierarchized namespace
    (args.actor, args.critic, args.bai); --bai.sft defaults to the actor path given."""
    if args.actor.init != "bai":
        return
    bai, previous = args.bai, args.actor.model_name_or_path
    if not bai.base:
        raise BAIError("--actor_init bai needs --bai.base, the pretrained model the SFT models were trained from")
    sft = bai.sft or ([previous] if previous else None)
    if not sft:
        raise BAIError("--actor_init bai needs --bai.sft or an actor path (taken as the one SFT model)")
    # The recipe table's fields only: threads change no byte of the output, so not its hash either.
    recipe = recipe_from_flags(bai, sft=sft)
    from openrlhf_bai.merger import cache_dir_for, plan_merge

    plan = plan_merge(recipe)  # every check, before any merging
    out = Path(bai.output_dir).expanduser().absolute() if bai.output_dir else cache_dir_for(recipe, plan)
    say_before_merge(args, plan, out)
    merged = str(materialize(recipe, bai, plan, out))
    args.actor.model_name_or_path = merged
    critic = getattr(args, "critic", None)
    if critic is not None and previous is not None and critic.model_name_or_path == previous:
        critic.model_name_or_path = merged


def say_before_merge(args, plan, out: Path) -> None:
    """Before the merge, and hours before a GPU job would find out: the plan on stdout, and one warning line on stderr
    for each way the merged checkpoint would train differently from the actor model the command names. The merge
    takes config and tokenizer from one input (the first --bai.sft by default), often not today's actor."""
    from openrlhf_bai.merger import existing_merge_hash, existing_parent

    if existing_merge_hash(out) == plan.recipe_hash:
        where = f"{out} holds it already (reused)"
    else:
        free = shutil.disk_usage(existing_parent(out)).free
        size = (f"{plan.bytes_to_write / 1e9:.2f} GB" if plan.bytes_to_write >= 1e8
                else f"{plan.bytes_to_write / 1e6:.2f} MB")
        where = f"{size} to write into {out} ({free / 1e9:.2f} GB free there)"
    print(f"openrlhf-bai: BAI merge of {len(plan.inputs)} inputs (alpha {plan.recipe.alpha:g}), {len(plan.tensors)} "
          f"tensors: {where}")

    def warn(message):
        print(f"openrlhf-bai: warning: {message}", file=sys.stderr)

    config_src, tokenizer_src = plan.inputs[plan.config_src], plan.inputs[plan.tokenizer_src]
    config = config_src.config.get("text_config") or config_src.config  # multimodal configs nest the LLM's
    positions = config.get("max_position_embeddings")
    data = getattr(args, "data", None)
    if getattr(args, "prompt_max_len", None) or getattr(args, "generate_max_len", None):  # before OpenRLHF 0.10
        length = (args.prompt_max_len or 1024) + (args.generate_max_len or 1024)
        length_flags = "--prompt_max_len + --generate_max_len"
    else:
        length = getattr(data, "max_len", None) or 2048  # OpenRLHF 0.10/0.11: prompt + response, default 2048
        length_flags = "--data.max_len"
    if isinstance(positions, int) and positions < length:
        warn(f"max_position_embeddings is {positions} in the config the merge takes from {config_src.label}, below "
             f"the command's prompt + generation length ({length_flags} {length}); pass --bai.config_from with a "
             "longer-context input or lower the length")

    actor = args.actor.model_name_or_path
    if not actor:
        return
    actor_dir = next((c.directory for c in plan.inputs if c.path == actor), None)
    if actor_dir is None and Path(actor).expanduser().is_dir():
        actor_dir = Path(actor).expanduser().resolve()
    elif actor_dir is None:  # a hub id not among the inputs: its small files only, never its weights
        try:
            from huggingface_hub import snapshot_download

            actor_dir = Path(snapshot_download(actor, allow_patterns=["*.json", "*.jinja"]))
        except Exception as e:
            warn(f"cannot read the actor {actor} to compare chat template and EOS token ({type(e).__name__})")
            return
    named = f"the actor you named ({actor})"
    if tokenizer_src.directory != actor_dir and _chat_template(tokenizer_src.directory) != _chat_template(actor_dir):
        warn(f"chat template differs: the merge takes its tokenizer from {tokenizer_src.label}, not from {named}; "
             f"pass --bai.tokenizer_from {actor} to keep today's")
    ours, theirs = _eos(tokenizer_src.directory, config_src.directory), _eos(actor_dir, actor_dir)
    if (tokenizer_src.directory, config_src.directory) != (actor_dir, actor_dir) and ours != theirs:
        warn(f"EOS token differs: the merge stops on {ours[0]!r} (ids {ours[1]}) from {tokenizer_src.label} / "
             f"{config_src.label}, {named} on {theirs[0]!r} (ids {theirs[1]}); pass --bai.tokenizer_from and "
             f"--bai.config_from {actor} to keep today's")


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _chat_template(directory: Path):
    """The template transformers would use: chat_template.jinja, else chat_template.json, else tokenizer_config's."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    return (_json(directory / "chat_template.json").get("chat_template")
            or _json(directory / "tokenizer_config.json").get("chat_template"))


def _eos(tokenizer_dir: Path, config_dir: Path) -> tuple:
    """(the tokenizer's EOS token, the EOS ids generation stops on: generation_config.json, else config.json)."""
    token = _json(tokenizer_dir / "tokenizer_config.json").get("eos_token") \
        or _json(tokenizer_dir / "special_tokens_map.json").get("eos_token")
    if isinstance(token, dict):  # {"content": "<|im_end|>", ...}
        token = token.get("content")
    ids = _json(config_dir / "generation_config.json").get("eos_token_id")
    if ids is None:
        ids = _json(config_dir / "config.json").get("eos_token_id")
    return token, sorted(ids) if isinstance(ids, list) else [ids] if ids is not None else []


def materialize(recipe, bai, plan, out: Path) -> Path:
    """`out`, the merged checkpoint's directory, written or reused where every node reads it (--bai.materialize)."""
    from openrlhf_bai.merger import merge

    if bai.materialize == "shared":
        return merge(recipe, out, overwrite=bai.overwrite, plan=plan, threads=bai.threads)

    # per_node: one task pinned to each alive node merges into the same local path (or finds it there).
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    start_ray(bai)
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    # num_cpus=0: it must run on every node, a head node without CPUs for tasks included.
    task = ray.remote(num_cpus=0)(_merge_on_this_node)
    pinned = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)) for node in nodes]
    results = ray.get([t.remote(recipe, str(out), bai.overwrite, plan.recipe_hash, bai.threads) for t in pinned])
    problems = []
    for node, digest, error in results:
        if error:
            problems.append(f"node {node}: {error}")
        elif digest != plan.recipe_hash:
            problems.append(
                f"node {node}: recipe hash {digest[:16]}, not the driver's {plan.recipe_hash[:16]} (its inputs differ)"
            )
        else:
            print(f"openrlhf-bai: node {node}: {out} (recipe hash {digest[:16]})")
    if problems:
        raise BAIError(
            f"per-node merge into {out} failed on {len(problems)} of {len(nodes)} nodes: " + "; ".join(problems)
        )
    return out


def _merge_on_this_node(recipe, output_dir: str, overwrite: bool, expected_hash: str, threads: int | None):
    """(node id, recipe hash of this node's inputs, error message). A node whose inputs differ from the driver's
    writes nothing: the directory's name stands for the driver's recipe hash."""
    import ray

    from openrlhf_bai.merger import merge, plan_merge

    node = ray.get_runtime_context().get_node_id()
    try:
        plan = plan_merge(recipe)
        if plan.recipe_hash == expected_hash:
            merge(recipe, output_dir, overwrite=overwrite, progress=False, plan=plan, threads=threads)
    except BAIError as e:
        return node, None, str(e)
    return node, plan.recipe_hash, None


def nested_flags() -> bool | None:
    """Whether the installed OpenRLHF takes the nested flags (--actor.model_name_or_path, --actor.entropy_coef): they
    came with openrlhf/utils/config.py (0.10.2). None: no OpenRLHF installed."""
    try:
        files = importlib.metadata.files("openrlhf") or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    return any(str(file) == "openrlhf/utils/config.py" for file in files)


def driver_runtime_env(bai) -> dict:
    """The runtime_env for ray.init: OpenRLHF's env_vars, the monitor's settings, the worker setup hook. Under
    `ray job submit` Ray refuses a driver runtime_env that sets a key the job's sets again; the job's keys win."""
    from openrlhf_bai.integration.worker import SETUP_HOOK, ray_runtime_env

    env_vars = {key: os.environ.get(key, default) for key, default in OPENRLHF_ENV_VARS.items()}
    env_vars[CONFIG_ENV] = json.dumps(monitor_config(bai))
    why = why_no_monitor()
    if why:
        print(f"openrlhf-bai: {why}", file=sys.stderr)
        runtime_env = {"env_vars": env_vars}
    else:
        runtime_env = ray_runtime_env({"env_vars": env_vars})
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    if job.get("worker_process_setup_hook") not in (None, SETUP_HOOK):
        raise BAIError(f"the job's runtime_env has worker_process_setup_hook {job['worker_process_setup_hook']!r}; "
                       f"Ray takes one, so call {SETUP_HOOK}() from it")
    for key in job:
        if key != "env_vars":
            runtime_env.pop(key, None)
    for key in job.get("env_vars") or {}:
        runtime_env["env_vars"].pop(key, None)
    return runtime_env


def start_ray(bai) -> None:
    """ray.init with driver_runtime_env; a Ray already initialized in this process is left as it is, and one
    reached through RAY_ADDRESS (`ray job submit`, `ray start`) is joined, as OpenRLHF's train() would."""
    import ray

    if ray.is_initialized():
        return
    ray.init(runtime_env=driver_runtime_env(bai))


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="openrlhf-bai train-ppo", allow_abbrev=False,
        description="OpenRLHF's train_ppo_ray with Balanced Actor Initialization and the stability monitor. "
                    "Every other flag goes to OpenRLHF unchanged (see python -m openrlhf.cli.train_ppo_ray --help).",
    )
    add_bai_arguments(parser)
    ours, rest = parser.parse_known_args(argv)
    refuse_unknown_bai_flags(rest, [flag for action in parser._actions for flag in action.option_strings])
    flat = vars(ours)
    bai = SimpleNamespace(**{key.removeprefix("bai."): value for key, value in flat.items() if key.startswith("bai.")})
    check_config(monitor_config(bai))  # bad thresholds fail here, not in a Ray worker hours later
    if flat["actor.init"] == "bai":
        rest = _actor_init_bai(rest, bai)
    else:
        given = [bai_flag(key) for key in (*RECIPE_FLAGS, "output_dir")
                 if getattr(bai, key) != parser.get_default(f"bai.{key}")]
        if given:
            raise BAIError(f"{' '.join(given)} given without --actor_init bai; add --actor_init bai to merge")

    rest = with_entropy_logged(rest, bai)
    command = [sys.executable, "-m", OPENRLHF_CLI, *rest]
    if bai.merge_only:
        print(" ".join(map(shell_quote, command)))
        return 0

    if importlib.util.find_spec("openrlhf") is None:
        raise BAIError("OpenRLHF is not installed: pip install 'openrlhf-bai[openrlhf]' "
                       "(--bai.merge_only works without it)")
    from openrlhf_bai.integration.flash_attn_cpu import make_flash_attn_importable

    make_flash_attn_importable()
    start_ray(bai)
    saved_argv = sys.argv
    sys.argv = [OPENRLHF_CLI, *rest]
    try:
        runpy.run_module(OPENRLHF_CLI, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved_argv
    return 0


def refuse_unknown_bai_flags(rest: list[str], known: list[str]) -> None:
    """parse_known_args hands every flag it does not know to OpenRLHF, so a misspelled --bai.* flag would be
    dropped silently (or refused by OpenRLHF after the merge): refuse it here, naming the closest known flag."""
    for arg in rest:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--bai"):  # OpenRLHF has no --bai* flag
            continue
        if flag.removeprefix("--bai.") in RENAMED:  # a threshold of an older release: name its replacement
            raise BAIError(renamed_message(flag.removeprefix("--bai.")))
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see openrlhf-bai train-ppo --help"
        raise BAIError(f"unknown flag {flag}; {hint}")


# OpenRLHF 0.10.2 on: None (default) computes no entropy; 0 logs it, loss unchanged
ENTROPY_FLAG = "--actor.entropy_coef"


def with_entropy_logged(rest: list[str], bai) -> list[str]:
    """OpenRLHF's arguments plus --actor.entropy_coef 0 where the command does not set it (--bai.entropy on, the
    monitor on, an OpenRLHF with nested flags): OpenRLHF then computes the token entropy from the actor's logits it
    already has and logs it as entropy_loss; with 0 it never enters the loss (ppo_actor.py: `if entropy_coef != 0`)."""
    if bai.entropy == "off" or bai.stability == "off" or nested_flags() is False:
        return rest  # nothing would read it; OpenRLHF before the nested flags spells it differently
    if any(arg.split("=", 1)[0] == ENTROPY_FLAG for arg in rest):
        return rest
    return [*rest, ENTROPY_FLAG, "0"]


def shell_quote(arg: str) -> str:
    """shlex.quote, but an argument with a newline or another control character (an --data.input_template, say)
    is written as bash's $'...', so that the command stays on one line."""
    if arg.isprintable():
        return shlex.quote(arg)
    escaped = "".join(
        "\\" + c if c in "\\'"
        else c if c.isprintable()
        else f"\\x{ord(c):02x}" if ord(c) < 0x80
        else f"\\U{ord(c):08x}"
        for c in arg
    )
    return f"$'{escaped}'"


def _actor_init_bai(rest: list[str], bai) -> list[str]:
    """OpenRLHF's arguments with the actor (and a critic that is the actor) pointed at the BAI checkpoint."""
    # `--flag=value` split in two, so each path is one token to read and replace.
    path_flags = ACTOR_FLAGS + CRITIC_FLAGS
    rest = [part for arg in rest for part in (arg.split("=", 1) if arg.split("=", 1)[0] in path_flags else [arg])]
    present = [flag for flag in ACTOR_FLAGS if flag in rest]
    if len(present) > 1:
        raise BAIError("both --actor.model_name_or_path (OpenRLHF 0.10.2 on) and --pretrain (before) given; use one")
    if present:
        style = ACTOR_FLAGS.index(present[0])
    else:  # no actor path given: the installed OpenRLHF's spelling (nested flags came with openrlhf/utils/config.py)
        style = 1 if nested_flags() is False else 0
    actor_flag, critic_flag = ACTOR_FLAGS[style], CRITIC_FLAGS[style]

    def last_index(flag):  # argparse keeps the last occurrence
        if flag not in rest:
            return None
        if rest[-1] == flag:
            raise BAIError(f"{flag} needs a value")
        return len(rest) - 1 - rest[::-1].index(flag)

    actor_at, critic_at = last_index(actor_flag), last_index(critic_flag)
    lengths = {flag: rest[at + 1] for flag in ("--data.max_len", "--prompt_max_len", "--generate_max_len")
               if (at := last_index(flag)) is not None and rest[at + 1].isdigit()}  # for say_before_merge
    args = SimpleNamespace(
        actor=SimpleNamespace(init="bai", model_name_or_path=rest[actor_at + 1] if actor_at is not None else None),
        critic=SimpleNamespace(model_name_or_path=rest[critic_at + 1] if critic_at is not None else None),
        bai=bai, data=SimpleNamespace(max_len=int(lengths.get("--data.max_len", 0))),
        prompt_max_len=int(lengths.get("--prompt_max_len", 0)),
        generate_max_len=int(lengths.get("--generate_max_len", 0)),
    )
    init_actor(args)
    rest = list(rest)
    if actor_at is None:
        rest += [actor_flag, args.actor.model_name_or_path]
    else:
        rest[actor_at + 1] = args.actor.model_name_or_path
    if critic_at is not None:
        rest[critic_at + 1] = args.critic.model_name_or_path
    print(f"openrlhf-bai: actor initialized from {args.actor.model_name_or_path} (alpha {bai.alpha:g})")
    return rest
