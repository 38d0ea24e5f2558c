"""The `seqfoundry` console script: parse → compose config → check → run.

Every subcommand takes Hydra overrides (`model=lstm demo.steps=100`), prints
its resolved config with `--cfg job`, and sweeps with `-m` (`model=lstm,gru`).
A bad config is one line on stderr and exit code 2, before anything heavy runs.
The commands themselves are listed in `orchestrator.commands`.
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from .commands import (CONFIG_COMMANDS, Command, add_config_commands, check_config, expand_multirun,  # noqa: F401
                       new_parser, with_defaults)
from .config import ConfigError, compose_config, to_typed

EXIT_BAD_CONFIG = 2

TOOLS = (
    Command("submit", "run any command on a Ray cluster as a Ray job: submit [--address URL] -- pretrain ...",
            "orchestrator.jobs:run_submit", arguments="orchestrator.jobs:add_submit_arguments"),
    Command("jobs", "list the cluster's Ray jobs, or show the status or logs of one, or stop it",
            "orchestrator.jobs:run_jobs", arguments="orchestrator.jobs:add_jobs_arguments"),
)
"""Commands that take their own argparse options instead of a config."""
COMMANDS: dict[str, Command] = {**CONFIG_COMMANDS, **{c.name: c for c in TOOLS}}


def build_parser():
    """The whole `seqfoundry` parser: the config commands, then the cluster tools."""
    parser, sub = new_parser()
    add_config_commands(sub)
    for cmd in TOOLS:
        cmd.add_arguments(sub.add_parser(cmd.name, help=cmd.help, description=cmd.help))
    return parser


def run_one(cmd: Command, overrides: list[str], print_cfg: bool) -> int:
    cfg = compose_config(with_defaults(cmd, overrides))
    job = to_typed(cfg)  # validates every slice before anything runs
    if print_cfg:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return 0
    return cmd.load()(job)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd = COMMANDS[args.command]
    try:
        if cmd.arguments:
            return cmd.load()(args)
        if getattr(args, "multirun", False):
            batches = expand_multirun(args.overrides)
            for overrides in batches:  # check every combination before running any
                to_typed(compose_config(with_defaults(cmd, overrides)))
            codes = [run_one(cmd, overrides, args.cfg is not None) for overrides in batches]
            return max(codes, default=0)
        return run_one(cmd, args.overrides, args.cfg is not None)
    except ConfigError as err:
        print(f"seqfoundry {cmd.name}: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except Exception as err:  # a Hydra override-syntax error and the like
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            print(f"seqfoundry {cmd.name}: error: {' '.join(str(err).split())}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        raise


if __name__ == "__main__":
    sys.exit(main())
