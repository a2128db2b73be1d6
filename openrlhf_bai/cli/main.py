"""`openrlhf-bai COMMAND ...`: each command lives in its own module under openrlhf_bai.cli with a
`main(argv) -> int`; they are imported only when called, so `merge` never pays for OpenRLHF's imports."""

from __future__ import annotations

import importlib
import sys
import warnings

# torch imports pynvml, whose deprecation notice would otherwise open every command's output.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated")

COMMANDS = {
    "merge": ("openrlhf_bai.cli.merge", "two-stage BAI merge of a base and SFT checkpoints"),
    "train-ppo": ("openrlhf_bai.cli.train_ppo_ray", "OpenRLHF train_ppo_ray with --actor_init bai"),
    "diagnose": ("openrlhf_bai.cli.diagnose", "find length collapse and reward hockey sticks in training logs"),
    "probe": ("openrlhf_bai.cli.probe", "measure candidate alphas before training"),
    "demo": ("openrlhf_bai.cli.demo", "merge three toy checkpoints and generate with OpenRLHF's Actor"),
}


def run(command_main, argv) -> int:
    """Call a command; a BAIError becomes one line on stderr and exit status 1, Ctrl-C exit status 130."""
    from openrlhf_bai.errors import BAIError

    try:
        return command_main(argv) or 0
    except BAIError as e:
        print(f"openrlhf-bai: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: what was cleaned up has said so; no traceback
        print("openrlhf-bai: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: openrlhf-bai COMMAND [ARGS ...]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"openrlhf-bai: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return run(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
