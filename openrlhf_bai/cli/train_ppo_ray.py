"""`openrlhf-bai train-ppo` / `python -m openrlhf_bai.cli.train_ppo_ray`: OpenRLHF's train_ppo_ray with
`--actor_init bai` and the stability monitor (openrlhf_bai.integration.launcher)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from openrlhf_bai.integration.launcher import run

    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    from openrlhf_bai.cli.main import run as run_command

    sys.exit(run_command(main, sys.argv[1:]))
