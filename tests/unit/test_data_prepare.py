"""prepare without Ray: tokenizer round trip, manifest checksums, determinism, overwrite protection."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipeline import DataConfig, Manifest, ShardStream, detokenize, load_tokenizer, prepare, tokenize
from data_pipeline.manifest import bad_files
from data_pipeline.sources import TextLimits, builtin_documents
from data_pipeline.tokenizer import MASK_TOKEN, special_tokens, train_tokenizer

TINY = dict(max_documents=6, vocab_size=320, num_sentinels=8, shard_samples=16)


def tiny(folder, **overrides) -> DataConfig:
    return DataConfig(dir=str(folder), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Manifest:
    return prepare(tiny(tmp_path_factory.mktemp("prep") / "data"), progress=False, use_ray=False)


def file_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_round_trip_and_reserved_ids(kind):
    texts = [r.tgt for d in builtin_documents("text", TextLimits(), 4) for r in d.records]
    tok = train_tokenizer(texts, kind=kind, vocab_size=400, num_sentinels=5)
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert tok.token_to_id("<extra_id_0>") == 4 and tok.token_to_id(MASK_TOKEN) == 9
    for text in texts[:20]:
        ids = tokenize(tok, text)
        assert 3 not in ids and detokenize(tok, ids) == text
    assert detokenize(tok, [1, *tokenize(tok, texts[0]), 2, 0, 0]) == texts[0]  # specials are skipped


def test_tokenizer_training_is_reproducible():
    texts = [r.tgt for d in builtin_documents("text", TextLimits(), 3) for r in d.records]
    for kind in ("bpe", "unigram"):
        a, b = (train_tokenizer(texts, kind=kind, vocab_size=360, num_sentinels=4).to_str() for _ in range(2))
        assert a == b


def test_manifest_records_samples_tokens_and_checksums(prepared):
    data, folder = prepared.data, prepared.folder
    assert data["tokenizer_sha256"] == hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    for shard in data["shards"]:
        raw = (folder / shard["path"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(raw).hexdigest() and shard["bytes"] == len(raw)
        assert shard["path"].startswith("shards/") and shard["path"].endswith(".tar")
    assert data["num_samples"] == sum(s["samples"] for s in data["shards"])
    assert data["num_tokens"] == sum(s["tokens"] for s in data["shards"])
    for name, split in data["splits"].items():
        shards = [s for s in data["shards"] if s["split"] == name]
        assert split["num_samples"] == sum(s["samples"] for s in shards) > 0
    assert data["dtype"] == "uint16" and data["vocab_size"] == 320
    assert data["specials"] | {"pad": 0, "bos": 1, "eos": 2, "unk": 3} == data["specials"]
    assert bad_files(prepared) == []


def test_shards_hold_the_tokenized_text_with_unique_keys_and_document_splits(prepared):
    tok = load_tokenizer(prepared.tokenizer_path)
    keys = {}
    for split in ("train", "valid", "test"):
        samples = list(ShardStream(prepared.path, rank=0, world_size=1, seed=0, shuffle=False, split=split))
        assert len(samples) == prepared.data["splits"][split]["num_samples"]
        keys[split] = {s["__key__"] for s in samples}
        for s in samples[:10]:
            tgt = detokenize(tok, s["tgt"])
            assert detokenize(tok, s["src"]) == " ".join(tgt.lower().replace("'", "").translate(
                {ord(c): " " for c in "!\"#$%&()*+,-./:;<=>?@[\\]^`{|}~"}).split())
    assert sum(map(len, keys.values())) == len(set().union(*keys.values())) == prepared.data["num_samples"]
    docs = {split: {k.split("-")[0] for k in ks} for split, ks in keys.items()}  # key = <document>-<record>
    assert not (docs["train"] & docs["valid"] or docs["train"] & docs["test"] or docs["valid"] & docs["test"])


def test_prepare_is_byte_identical_and_skips_an_intact_copy(prepared, tmp_path):
    again = prepare(tiny(tmp_path / "again"), progress=False, use_ray=False)
    assert file_digests(again.folder) == file_digests(prepared.folder)
    stamp = (again.folder / "manifest.json").stat().st_mtime_ns
    prepare(tiny(tmp_path / "again"), progress=False, use_ray=False)
    assert (again.folder / "manifest.json").stat().st_mtime_ns == stamp  # up to date: nothing rewritten


def test_a_different_dataset_is_never_overwritten_silently(prepared, tmp_path):
    folder = tmp_path / "d"
    prepare(tiny(folder), progress=False, use_ray=False)
    before = file_digests(folder)
    with pytest.raises(ValueError, match=rf"data.dir: {folder} holds a different prepared dataset"):
        prepare(tiny(folder, shard_samples=7), progress=False, use_ray=False)
    assert file_digests(folder) == before
    prepare(tiny(folder, shard_samples=7, overwrite=True), progress=False, use_ray=False)
    assert Manifest.load(folder).data["config"]["shard_samples"] == 7
    assert not (folder / ".staging").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="data.dir: .* holds no manifest.json"):
        prepare(tiny(foreign), progress=False, use_ray=False)


def test_a_damaged_copy_of_the_same_dataset_is_rebuilt(tmp_path):
    m = prepare(tiny(tmp_path / "d"), progress=False, use_ray=False)
    good = file_digests(m.folder)
    (m.folder / m.data["shards"][0]["path"]).write_bytes(b"broken")
    prepare(tiny(tmp_path / "d"), progress=False, use_ray=False)
    assert file_digests(m.folder) == good


def test_reusing_a_tokenizer_keeps_its_ids(prepared, tmp_path):
    m = prepare(tiny(tmp_path / "r", task="text", tokenizer=str(prepared.tokenizer_path)),
                progress=False, use_ray=False)
    assert (m.folder / "tokenizer.json").read_bytes() == prepared.tokenizer_path.read_bytes()
    assert m.data["fields"] == ["tgt"] and m.data["specials"]["num_sentinels"] == 8
    # Issue 12: a tokenizer whose specials sit elsewhere is re-indexed onto the reserved ids (it was refused).
    other = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.save(str(tmp_path / "other.json"))
    m = prepare(tiny(tmp_path / "x", tokenizer=str(tmp_path / "other.json")), progress=False, use_ray=False)
    tok = load_tokenizer(m.tokenizer_path)
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>", "a")] == [0, 1, 2, 3, 4 + 8 + 1]
    assert m.data["tokenizer_mapping"]["moved"] == [[0, 13, 1]]


def test_jsonl_pairs_prepare_into_src_tgt_samples(tmp_path):
    rows = [{"src": f"zahl {i} ist hier", "tgt": f"number {i} is here"} for i in range(30)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny(tmp_path / "p", task="pairs", sources=[str(tmp_path / "pairs.jsonl")], max_documents=0)
    with pytest.warns(UserWarning, match="data.vocab_size: the corpus gave"):  # 30 short lines: a small vocabulary
        m = prepare(cfg, progress=False, use_ray=False)
    tok = load_tokenizer(m.tokenizer_path)
    got = {detokenize(tok, s["src"]): detokenize(tok, s["tgt"])
           for s in ShardStream(m.path, rank=0, world_size=1, seed=0)}
    assert got == {r["src"]: r["tgt"] for r in rows}


@pytest.mark.parametrize("overrides, key", [
    (dict(vocab_size=100), "data.vocab_size"), (dict(task="poems"), "data.task"),
    (dict(tokenizer_type="wordpiece"), "data.tokenizer_type"), (dict(valid_fraction=0.6, test_fraction=0.5),
                                                                "data.valid_fraction"),
    (dict(task="pairs"), "data.sources"), (dict(format="csv"), "data.format"),
    (dict(task="pairs", sources=["x.txt"], format="lines"), "data.format"),
    (dict(target_sources=["x.en"]), "data.target_sources"),
    (dict(remainder="wrap"), "data.remainder"), (dict(shard_samples=0), "data.shard_samples"),
])
def test_bad_data_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DataConfig(**overrides)


def test_ids_fit_uint16_and_match_the_vocabulary(prepared):
    sample = next(iter(ShardStream(prepared.path, rank=0, world_size=1, seed=0)))
    assert sample["tgt"].dtype == np.dtype("<u2") and int(sample["tgt"].max()) < prepared.vocab_size
    assert len(special_tokens(8)) == 13


PREPARE_IN_SUBPROCESS = """
import sys
from data_pipeline import DataConfig, prepare
corpus, out = sys.argv[1], sys.argv[2]
prepare(DataConfig(dir=out, task="pairs", sources=[corpus + "/*.jsonl"], vocab_size=320, num_sentinels=4,
                   shard_samples=8, valid_fraction=0.2, test_fraction=0.2), progress=False, use_ray=False)
"""


def test_prepare_does_not_depend_on_where_the_corpus_lies(tmp_path):
    """The same files in two folders (two processes, two hash seeds) give the same tokenizer and shards."""
    first = tmp_path / "one" / "corpus"
    first.mkdir(parents=True)
    lines = [json.dumps({"src": f"zahl {i} steht hier {i % 7}", "tgt": f"number {i} stands here {i % 7}"})
             for i in range(40)]
    (first / "a.jsonl").write_text("\n".join(lines[:20]) + "\n")
    grouped = [json.dumps({**json.loads(line), "doc": f"g{i % 5}"}) for i, line in enumerate(lines[20:])]
    (first / "b.jsonl").write_text("\n".join(grouped) + "\n")
    second = tmp_path / "elsewhere" / "deeper" / "copy"
    shutil.copytree(first, second)
    outs = []
    for n, corpus in enumerate((first, second)):
        out = tmp_path / f"out{n}"
        env = {**os.environ, "PYTHONHASHSEED": str(n + 1)}
        subprocess.run([sys.executable, "-c", PREPARE_IN_SUBPROCESS, str(corpus), str(out)], check=True,
                       cwd=Path(__file__).parents[2], env=env)
        outs.append(out)
    a, b = (file_digests(o) for o in outs)
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {k: v for k, v in b.items() if k != "manifest.json"}
    ma, mb = (json.loads((o / "manifest.json").read_text()) for o in outs)
    for m in (ma, mb):  # where the sources lie is all that may differ
        m["config"].pop("sources")
        for f in m["source"]["files"]:
            f.pop("path")
    assert ma == mb


def test_a_prepare_task_imports_no_torch_and_the_package_keeps_its_names():
    """What a Ray worker imports to run a prepare stage (`data_pipeline.scale`, `.prepare`) leaves torch out
    (seconds a worker process); the package's names are the same objects as their modules' (loaded on use),
    and `data_pipeline.prepare` stays the function after its submodule is imported."""
    code = ("import sys, data_pipeline.scale, data_pipeline.prepare, data_pipeline as d; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(d.prepare) and d.prepare.__module__ == 'data_pipeline.prepare'; "
            "from data_pipeline import stream; assert d.ShardStream is stream.ShardStream; "
            "assert 'torch' in sys.modules; "
            "assert sorted(n for n in d.__all__ if getattr(d, n) is None) == []; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
