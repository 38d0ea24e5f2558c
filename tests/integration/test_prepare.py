"""`seqfoundry prepare` on a real local Ray cluster: determinism, the CLI end to end, bad configs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from data_pipeline import DataConfig, Manifest, ShardStream, prepare
from orchestrator.cli import main
from orchestrator.config import compose_config, to_typed

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("local_ray")


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ray_prepare_is_byte_identical_to_itself_and_to_in_process(tmp_path):
    cfg = dict(max_documents=10, vocab_size=400, num_sentinels=8, shard_samples=12, prepare_tasks=3)
    a = prepare(DataConfig(dir=str(tmp_path / "a"), **cfg), progress=False)
    b = prepare(DataConfig(dir=str(tmp_path / "b"), **cfg), progress=False)
    local = prepare(DataConfig(dir=str(tmp_path / "c"), **cfg), progress=False, use_ray=False)
    assert len(a.data["shards"]) > 3  # several tasks in flight, finishing in any order
    assert digests(a.folder) == digests(b.folder) == digests(local.folder)


def test_cli_prepares_the_tiny_builtin_corpus_end_to_end(tmp_path, capsys):
    folder = tmp_path / "tiny"
    assert main(["prepare", "experiment=tiny", f"data.dir={folder}"]) == 0
    assert f"prepared {folder}" in capsys.readouterr().out
    manifest = Manifest.load(folder)
    job = to_typed(compose_config(["experiment=tiny"]))
    assert manifest.vocab_size == job.data.vocab_size == job.model.vocab_size  # the trainer checks this
    assert set(manifest.data["splits"]) == {"train", "valid", "test"}
    stream = ShardStream(folder / "manifest.json", rank=0, world_size=2, seed=0, split="train")
    assert len(list(stream)) == -(-manifest.data["splits"]["train"]["num_samples"] // 2)
    assert main(["prepare", "experiment=tiny", f"data.dir={folder}"]) == 0  # again: verified, untouched
    assert "already holds this dataset" in capsys.readouterr().out


def test_cli_prepares_jsonl_pairs(tmp_path):
    rows = [{"src": f"{i} plus {i}", "tgt": f"{i + i}", "doc": f"d{i % 7}"} for i in range(60)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "pairs"
    assert main(["prepare", "data=pairs", f"data.sources=[{tmp_path / 'sums.jsonl'}]", f"data.dir={folder}",
                 "data.vocab_size=300", "data.num_sentinels=4", "data.valid_fraction=0.15"]) == 0
    data = Manifest.load(folder).data
    assert data["task"] == "pairs" and data["fields"] == ["src", "tgt"] and data["num_samples"] == 60
    assert data["splits"]["valid"]["num_documents"] == 2


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_bad_config_is_one_line_and_exit_2_before_ray(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a dataset")
    for args, key in [(["data.vocab_size=10"], "data.vocab_size"),
                      (["data.batch.max_tokens=4"], "data.batch.max_tokens"),
                      (["objective.mask_ratio=1.5"], "objective.mask_ratio"),
                      ([f"data.sources=[{tmp_path}/missing/*.txt]"], "data.sources"),
                      ([f"data.dir={foreign}", "experiment=tiny"], "data.dir")]:
        proc = run_cli("prepare", *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("seqfoundry prepare: error:") and key in lines[0]
    assert list(foreign.iterdir()) == [foreign / "keep.txt"]
