"""A user corpus prepared by Ray tasks (issue 12): byte-identical whatever the task count, across processes;
pretraining and fine-tuning on data prepared from a `lines` and a `tsv` corpus."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from data_pipeline import DataConfig, Manifest, prepare
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]
WORDS = "red green blue cat dog fish one two three four five six river sun moon walks sees".split()


pytestmark = pytest.mark.usefixtures("local_ray")


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six files, duplicates across them, one compressed."""
    root = tmp_path_factory.mktemp("corpus")
    shared = lines(40, 99)
    for i in range(6):
        text = "\n".join(lines(150, i) + shared) + "\n"
        if i == 2:
            (root / f"part{i}.txt.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (root / f"part{i}.txt").write_text(text)
    return root


PREPARE = """
import sys, ray
from data_pipeline import DataConfig, prepare
address, corpus, out, tasks, part_bytes = sys.argv[1:]
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
prepare(DataConfig(dir=out, sources=[corpus], format="lines", task="text", vocab_size=400, num_sentinels=4,
                   shard_samples=50, doc_lines=20, prepare_tasks=int(tasks), part_bytes=int(part_bytes),
                   tokenizer_sample_bytes=20000),
        progress=False)
"""


def test_two_task_counts_in_two_processes_give_the_same_bytes(corpus, tmp_path):
    """One task in flight and each file whole, against 7 tasks and each plain file read as ~3 parts."""
    address = ray.get_runtime_context().gcs_address
    for n, (tasks, part_bytes) in enumerate(((1, 0), (7, 2000))):
        env = {**os.environ, "PYTHONHASHSEED": str(n + 1)}
        subprocess.run([sys.executable, "-c", PREPARE, address, str(corpus), str(tmp_path / f"out{n}"), str(tasks),
                        str(part_bytes)], check=True, cwd=ROOT, env=env, timeout=300)
    a, b = digests(tmp_path / "out0"), digests(tmp_path / "out1")
    assert a == b and len(a) > 6
    local = prepare(DataConfig(dir=str(tmp_path / "local"), sources=[str(corpus)], format="lines", task="text",
                               vocab_size=400, num_sentinels=4, shard_samples=50, doc_lines=20,
                               tokenizer_sample_bytes=20000), progress=False, use_ray=False)
    assert digests(local.folder) == a  # in-process: the same bytes again
    written = json.loads((tmp_path / "out1" / "manifest.json").read_text())["shards"]
    assert [(s["sha256"], s["bytes"]) for s in written] == [  # hashed as the write tasks wrote them
        (a[s["path"]], (tmp_path / "out1" / s["path"]).stat().st_size) for s in written]
    data = local.data
    assert data["filters"]["dropped"]["dedup"] == 5 * 40  # the shared lines are kept once, in part0
    assert data["filters"]["kept"] == 6 * 150 + 40 == data["num_samples"]
    train = [s["samples"] for s in data["shards"] if s["split"] == "train"]
    assert set(train[:-1]) == {50} and 0 < train[-1] <= 50  # shards cut across files, in corpus order
    stamp = (tmp_path / "out0" / "manifest.json").stat().st_mtime_ns
    prepare(DataConfig(dir=str(tmp_path / "out0"), sources=[str(corpus)], format="lines", task="text",
                       vocab_size=400, num_sentinels=4, shard_samples=50, doc_lines=20, prepare_tasks=3,
                       tokenizer_sample_bytes=20000), progress=False)
    assert (tmp_path / "out0" / "manifest.json").stat().st_mtime_ns == stamp  # unchanged folder: nothing done


@pytest.mark.slow
def test_pretrain_on_lines_and_finetune_on_tsv(tmp_path, capsys):
    (tmp_path / "mono.txt").write_text("\n".join(lines(400, 1)) + "\n")
    rng = random.Random(3)
    pairs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) for _ in range(300)]
    (tmp_path / "pairs.tsv").write_text("".join(f"{p}\t{p.upper()}\n" for p in pairs))
    common = ["experiment=tiny", "data.num_workers=0", "data.doc_lines=10", "trainer.num_workers=1",
              "trainer.max_steps=2", "trainer.log_every=1", "trainer.checkpoint_every=100", "trainer.warmup_steps=1",
              "trainer.val_every=100"]
    mono = tmp_path / "mono"
    assert main(["prepare", *common, f"data.dir={mono}", "data.format=lines", "data.task=text",
                 f"data.sources=[{tmp_path / 'mono.txt'}]"]) == 0
    assert "filters dropped" in capsys.readouterr().out
    vocab = Manifest.load(mono).vocab_size
    tsv = tmp_path / "tsv"
    assert main(["prepare", *common, f"data.dir={tsv}", "data.task=pairs", f"data.sources=[{tmp_path / 'pairs.tsv'}]",
                 f"data.tokenizer={mono / 'tokenizer.json'}"]) == 0
    assert Manifest.load(tsv).data["fields"] == ["src", "tgt"]
    run = tmp_path / "pre"
    assert main(["pretrain", *common, f"data.dir={mono}", f"run.dir={run}", f"model.vocab_size={vocab}"]) == 0
    ft = tmp_path / "ft"
    assert main(["finetune", *common, f"data.dir={tsv}", f"run.dir={ft}", f"model.vocab_size={vocab}",
                 "objective=pairs", f"pretrained={run / 'model'}"]) == 0
    assert (ft / "model" / "model.safetensors").is_file()
    assert [json.loads(x)["step"] for x in (ft / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1] == 2


def test_a_bad_row_found_by_a_task_is_one_line_naming_the_file(tmp_path, capsys):
    rows = [json.dumps({"src": f"a {i}", "tgt": f"b {i}"}) for i in range(30)]
    (tmp_path / "p.jsonl").write_text("\n".join(rows[:20] + ["{broken"] + rows[20:]) + "\n")
    code = main(["prepare", "data=pairs", f"data.sources=[{tmp_path / 'p.jsonl'}]", f"data.dir={tmp_path / 'out'}",
                 "data.vocab_size=300", "data.num_sentinels=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("seqfoundry prepare: error: data.sources:") and "p.jsonl:21" in err[-1]
    assert not (tmp_path / "out" / "manifest.json").exists()
