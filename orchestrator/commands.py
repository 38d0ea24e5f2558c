"""The config commands (those that take Hydra overrides): names, help, default overrides, aliases,
runners, their parsers, and how a command line becomes checked typed configs.

`cli` adds the cluster tools (`submit`, `jobs`) and runs everything; `jobs` checks a submitted command
line here.  Runners are `module:function` strings imported only when their command runs (so `--help`
and a bad config answer at once), and none of them names `jobs` or `cli`: no import cycle, strings
included.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from dataclasses import dataclass
from typing import Callable

from .config import JobConfig, compose_config, describe_keys, to_typed


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    runner: str
    """`module:function` taking a JobConfig and returning an exit code."""
    multirun: bool = True
    defaults: tuple[str, ...] = ()
    """Overrides applied before the user's (which win)."""
    aliases: tuple[tuple[str, str], ...] = ()
    """(short, key) pairs: `short=value` is read as `key=value` (e.g. report's run=<folder>)."""
    list_aliases: tuple[tuple[str, str], ...] = ()
    """(short, key) pairs: `short=a,b` (a comma, no brackets) is read as `key=[a,b]` (report run=a,b)."""
    positional: str = ""
    """Key set by a first word without `=` (`seqfoundry runs list` sets runs.action=list)."""
    arguments: str = ""
    """`module:function(parser)` adding the command's own argparse arguments. Set for commands that take
    no Hydra overrides (`submit`, `jobs`); their runner then takes the argparse Namespace."""

    def load(self) -> Callable[..., int]:
        return _resolve(self.runner)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _resolve(self.arguments)(parser)


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


CONFIG_COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("demo", "train a tiny model on a toy task (copy/reverse) and compare decoding strategies",
                "orchestrator.demo:run"),
        Command("prepare", "train a tokenizer and write WebDataset shards + manifest.json into data.dir",
                "orchestrator.prepare:run"),
        Command("pretrain", "pretrain a model on prepared data with Ray Train x DeepSpeed (BART/T5 noising)",
                "orchestrator.train:run_pretrain"),
        Command("finetune", "fine-tune a model package (pretrained=...) on source/target pairs",
                "orchestrator.train:run_finetune", defaults=("objective=pairs",)),
        Command("sweep", "Ray Tune search over fine-tuning hyperparameters of a model package (pretrained=...), "
                "ASHA early stopping; sweep_results.json", "orchestrator.sweep.command:run", defaults=("objective=pairs",)),
        Command("pipeline", "prepare -> pretrain -> sweep -> evaluate the best trial, with a lineage record",
                "orchestrator.pipeline.command:run", defaults=("experiment=demo",)),
        Command("report", "PNG plots of a run, sweep, evaluation or pipeline folder (report run=<folder>); "
                "report run=a,b overlays runs' curves", "orchestrator.report:run", multirun=False,
                aliases=(("run", "run.dir"),), list_aliases=(("run", "runs.dirs"),)),
        Command("runs", "runs list [runs.root=runs]: one row per run folder; runs compare 'runs.dirs=[a,b]': "
                "differing config keys and final metrics side by side", "orchestrator.run_table:run",
                multirun=False, positional="runs.action"),
        Command("export", "write the model package of a checkpoint of the run in run.dir, or convert a package to "
                "Hugging Face (export.format=hf) or CTranslate2 (export.format=ctranslate2)",
                "orchestrator.export:run", multirun=False),
        Command("evaluate", "decode a paired dataset with greedy/beam/sampling: BLEU, chrF, exact match, "
                "perplexity, speed (package=<model package>)", "orchestrator.evaluation.command:run",
                defaults=("data.dir=@package",), aliases=(("package", "eval.package"),)),
        Command("generate", "decode lines from stdin or generate.input with any strategy (package=<model package>)",
                "orchestrator.generate:run", multirun=False, aliases=(("package", "generate.package"),)),
        Command("serve", "serve a model package over HTTP with Ray Serve: JSON in, hypotheses out, dynamic batching, "
                "torch or CTranslate2 engine (package=<model package>)", "orchestrator.serve.command:run_job",
                multirun=False, aliases=(("package", "serve.package"),)),
    )
}


def new_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="seqfoundry",
        description="Pretrain, fine-tune and evaluate Seq2Seq models on Ray with DeepSpeed.",
    )
    return parser, parser.add_subparsers(dest="command", metavar="COMMAND", required=True)


def add_config_commands(sub: argparse._SubParsersAction) -> None:
    """One subparser per config command: --cfg, -m (where it makes sense) and KEY=VALUE overrides."""
    for cmd in CONFIG_COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help,
                           epilog=KEYS_EPILOG, formatter_class=_KeysHelpFormatter)
        p.add_argument("--cfg", choices=["job"], help="print the resolved config and exit")
        if cmd.multirun:
            p.add_argument("-m", "--multirun", action="store_true",
                           help="run once per combination of comma-separated override values")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides")


def config_parser() -> argparse.ArgumentParser:
    """A parser of the config commands alone (what a submitted job may run)."""
    parser, sub = new_parser()
    add_config_commands(sub)
    return parser


KEYS_EPILOG = "<config keys>"
"""A config command's epilog: `_KeysHelpFormatter` writes the key table in its place."""


class _KeysHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Writes the config-key table only when help is printed: reading every field's docstring from the
    source takes seconds, which every command line would otherwise pay before it runs."""

    def add_text(self, text: str | None) -> None:
        super().add_text(_keys_epilog() if text == KEYS_EPILOG else text)


@functools.cache
def _keys_epilog() -> str:
    rows = [f"  {key} = {default!r}\n      {doc}" for key, default, doc in describe_keys()]
    return "config keys (override with KEY=VALUE; groups: model=, decoding=, experiment=):\n" + "\n".join(rows)


def with_defaults(cmd: Command, overrides: list[str]) -> list[str]:
    """The command's own defaults, unless the user overrides the same key."""
    if cmd.positional and overrides and "=" not in overrides[0]:
        overrides = [f"{cmd.positional}={overrides[0]}", *overrides[1:]]
    overrides = [_as_list(o, dict(cmd.list_aliases)) for o in overrides]
    aliases = dict(cmd.aliases)
    overrides = [aliases[o.split("=", 1)[0]] + "=" + o.split("=", 1)[1] if "=" in o and o.split("=", 1)[0] in aliases
                 else o for o in overrides]
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [d for d in cmd.defaults if d.split("=", 1)[0] not in given] + list(overrides)


def _as_list(override: str, list_aliases: dict[str, str]) -> str:
    key, _, value = override.partition("=")
    if key in list_aliases and "," in value and not value.startswith(("[", "'", '"')):
        return f"{list_aliases[key]}=[{value}]"
    return override


def expand_multirun(overrides: list[str]) -> list[list[str]]:
    """`a=1,2 b=x` -> [[a=1, b=x], [a=2, b=x]] (Hydra's basic sweeper rules)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def check_config(cmd: Command, overrides: list[str], *, multirun: bool) -> list[JobConfig]:
    """The typed config of every run the overrides ask for (each combination with -m), all checked."""
    batches = expand_multirun(overrides) if multirun else [overrides]
    return [to_typed(compose_config(with_defaults(cmd, o))) for o in batches]


