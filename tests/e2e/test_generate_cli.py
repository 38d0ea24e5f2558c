"""`seqfoundry generate` as a subprocess: lines on stdin, decoded lines on stdout
(text or JSONL with scores), any strategy, files in and out, bad config (each bad key in-process,
one of them through a real process)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline import EOS_ID, load_tokenizer, tokenize
from orchestrator.cli import main
from trainers.package import load_package
from tests.helpers.copy_task import copy_package

ROOT = Path(__file__).resolve().parents[2]
LINES = ["red green blue cat dog", "six five four three", "fish one two three four five", "dog dog cat"]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return copy_package(tmp_path_factory.getbasetemp() / "copy_package", steps=400)


def generate(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "generate", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_generate_copies_stdin_lines_in_text_mode(package):
    proc = generate(f"package={package}", "decoding.max_len=16", "generate.batch_size=3",
                    stdin="\n".join(LINES) + "\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == len(LINES)
    assert sum(o == line for o, line in zip(out, LINES)) >= 3  # a copy model, right almost always


def test_generate_jsonl_beam_hypotheses_carry_model_scores(package, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(LINES) + "\n")
    out = tmp_path / "out.jsonl"
    proc = generate(f"package={package}", "decoding=beam", "decoding.beam_size=4", "decoding.n_best=2",
                    "decoding.max_len=16", "generate.format=jsonl", f"generate.input={tmp_path / 'in.txt'}",
                    f"generate.output={out}", "generate.batch_size=1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in rows] == LINES
    model, tok = load_package(package), load_tokenizer(package / "tokenizer.json")
    for r in rows:
        hyps = r["hypotheses"]
        assert len(hyps) == 2 and hyps[0]["normalized_score"] >= hyps[1]["normalized_score"]
        assert r["text"] == hyps[0]["text"] and hyps[0]["tokens"][-1] == EOS_ID
        src = torch.tensor([tokenize(tok, r["source"]) + [EOS_ID]])
        tgt = torch.tensor([hyps[0]["tokens"]])
        with torch.no_grad():
            score = model.score(src, torch.tensor([src.size(1)]), tgt, torch.tensor([tgt.size(1)]))
        assert hyps[0]["score"] == pytest.approx(score.item(), abs=1e-4)


def test_generate_sampling_is_seeded(package):
    args = (f"package={package}", "decoding=sample", "decoding.seed=7", "decoding.max_len=16")
    first, second = generate(*args, stdin="\n".join(LINES)), generate(*args, stdin="\n".join(LINES))
    assert first.returncode == 0 and first.stdout == second.stdout and len(first.stdout.splitlines()) == 4


def test_generate_with_ctranslate2_float32_equals_the_torch_engine(package):
    """The package is converted once (cached beside it) and decodes the same greedy and beam-5 tokens."""
    stdin = "\n".join(LINES) + "\n"
    for strategy in ("decoding=greedy", "decoding=beam"):
        args = (f"package={package}", strategy, "decoding.beam_size=5", "decoding.max_len=16", "generate.format=jsonl")
        torch_rows = generate(*args, stdin=stdin)
        ct2_rows = generate(*args, "generate.engine=ctranslate2", stdin=stdin)
        assert torch_rows.returncode == 0 and ct2_rows.returncode == 0, ct2_rows.stderr
        ours = [json.loads(line) for line in torch_rows.stdout.splitlines()]
        theirs = [json.loads(line) for line in ct2_rows.stdout.splitlines()]
        assert [r["hypotheses"][0]["tokens"] for r in theirs] == [r["hypotheses"][0]["tokens"] for r in ours]
        assert [r["hypotheses"][0]["score"] for r in theirs] == pytest.approx(
            [r["hypotheses"][0]["score"] for r in ours], abs=1e-4)
    assert (package / "ctranslate2-float32" / "model.bin").is_file()  # converted once, beside the package


@pytest.mark.parametrize("args, key", [
    (["generate.engine=ctranslate2", "decoding=sample"], "decoding.strategy"),
    (["generate.compute_type=int8"], "generate.compute_type"),
    (["generate.engine=onnx"], "generate.engine"),
    (["package=/no/such/package"], "generate.package"),
    ([], "generate.package"),
    (["generate.format=xml"], "generate.format"),
    (["generate.input=/no/such/file.txt"], "generate.input"),
])
def test_bad_generate_config_is_one_line_with_exit_2(args, key, package, capsys, monkeypatch):
    if not any(a.startswith("package=") for a in args) and key != "generate.package":
        args = [f"package={package}", *args]
    monkeypatch.setattr("sys.stdin", io.StringIO("x\n"))
    assert main(["generate", *args]) == 2  # in-process: one real process below
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"seqfoundry generate: error: {key}"), out.err
    assert out.out == ""


def test_a_bad_generate_config_is_one_line_from_the_real_process_too(package):
    proc = generate(f"package={package}", "generate.engine=onnx", stdin="x\n")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqfoundry generate: error: generate.engine"), proc.stderr
    assert proc.stdout == ""
