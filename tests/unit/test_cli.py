"""The `seqfoundry` CLI: help, --cfg job, multirun expansion and bad-config errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import COMMANDS, build_parser, expand_multirun, main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_help_lists_exactly_the_registered_subcommands():
    text = build_parser().format_help()
    listed = set(re.findall(r"^    ([a-z]+)\s", text, re.M))
    assert listed == set(COMMANDS)


def test_subcommand_help_documents_config_keys(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "model.num_heads" in out and "must divide `d_model`" in out
    assert "decoding.beam_size" in out


def test_the_key_table_is_read_only_when_help_is_printed(monkeypatch, capsys):
    """Reading every field's docstring from the source took ~2 s per command line before it ran."""
    from orchestrator import commands

    def refuse(*_):
        raise AssertionError("describe_keys called without --help")

    commands._keys_epilog.cache_clear()
    monkeypatch.setattr(commands, "describe_keys", refuse)
    assert main(["pretrain", "--cfg", "job", "experiment=tiny"]) == 0
    assert "experiment" not in capsys.readouterr().err
    monkeypatch.undo()
    commands._keys_epilog.cache_clear()
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "data.vocab_size" in capsys.readouterr().out


def test_cfg_job_prints_resolved_config_with_overrides(capsys):
    assert main(["demo", "--cfg", "job", "model=lstm", "model.attention=additive", "run.dir=/tmp/x"]) == 0
    out = capsys.readouterr().out
    assert "arch: lstm" in out and "attention: additive" in out and "dir: /tmp/x" in out


def test_experiment_tiny_shrinks_any_model(capsys):
    assert main(["demo", "--cfg", "job", "model=gru", "experiment=tiny"]) == 0
    out = capsys.readouterr().out
    assert "arch: gru" in out and "d_model: 64" in out


@pytest.mark.parametrize("override, key", [
    ("model.num_heads=5", "model.num_heads"),
    ("model.arch=cnn", "model.arch"),
    ("model.dropout=1.5", "model.dropout"),
    ("model.d_model=abc", "model.d_model"),
    ("model.no_such_key=1", "model.no_such_key"),
    ("decoding.beam_size=0", "decoding.beam_size"),
    ("decoding.early_stopping=maybe", "decoding.early_stopping"),
    ("model=no_such_preset", "model"),
])
def test_bad_config_is_one_line_naming_the_key_with_exit_2(override, key, capsys):
    assert main(["demo", override]) == 2  # in-process: the refusal comes before any work
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert key in lines[0] and lines[0].startswith("seqfoundry demo: error:")


def test_a_bad_config_is_one_line_from_the_real_process_too():
    """What the process prints, imports and all: still the one line (one case is enough; the keys above)."""
    proc = run_cli("demo", "model.num_heads=5")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model.num_heads" in lines[0] and lines[0].startswith("seqfoundry demo: error:")


def test_bad_value_in_one_multirun_job_fails_before_any_job_runs():
    proc = run_cli("demo", "-m", "model.num_heads=4,5", "demo.steps=1")
    assert proc.returncode == 2
    assert "model.num_heads" in proc.stderr
    assert "demo:" not in proc.stdout  # nothing ran


def test_expand_multirun_takes_the_cartesian_product():
    runs = expand_multirun(["model=lstm,gru", "demo.steps=1,2", "run.seed=3"])
    assert len(runs) == 4
    assert ["model=lstm", "demo.steps=1", "run.seed=3"] in runs


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert block[1] in (ROOT / ".ci" / "run").read_text().splitlines()
