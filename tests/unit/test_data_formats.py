"""Bring your own corpus (issue 12), without Ray: formats against Python's own readers, compression,
field mapping, script-neutral filters, key-hash splits, given tokenizers, the tokenizer sample, a bucket."""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import os
import random
import subprocess
import sys
from array import array
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline import DataConfig, Manifest, ShardStream, detokenize, load_tokenizer, prepare
from data_pipeline.config import FieldsConfig
from data_pipeline.filters import TextFilter, filter_text, text_units
from data_pipeline.formats import ReadSpec, list_sources, records, split_of
from data_pipeline import scale
from data_pipeline.scale import (BottomK, Runner, SampleTree, merge_samples, merged_sample, reduce_samples,
                                 split_files)
from data_pipeline.sources import SPLITS
from data_pipeline.tokenizer import encode_texts, train_tokenizer

KEEP_ALL = TextFilter(min_words=1, max_words=10_000, min_alpha=0.0, drop_code=False)
WORDS = "river mountain walks sees birds number quick brown fox lazy dog sun moon".split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) for i in range(n)]


def read_back(folder: Path) -> dict[str, list[tuple[str | None, str]]]:
    """Every split's samples, decoded, in stream order (shuffle off)."""
    m = Manifest.load(folder)
    tok = load_tokenizer(m.tokenizer_path)
    out = {}
    for split in m.nonempty_splits():
        stream = ShardStream(m.path, rank=0, world_size=1, seed=0, shuffle=False, split=split)
        out[split] = [(detokenize(tok, s["src"]) if "src" in s else None, detokenize(tok, s["tgt"])) for s in stream]
    return out


def cfg(folder: Path, **kw) -> DataConfig:
    base = dict(dir=str(folder / "out"), vocab_size=400, num_sentinels=4, shard_samples=32, min_words=1,
                min_alpha=0.0, doc_lines=5)
    return DataConfig(**{**base, **kw})


def spec(task: str, **kw) -> ReadSpec:
    return ReadSpec(task=task, text_filter=KEEP_ALL, **kw)


def read_records(paths, fmt: str, task: str, **kw) -> list[tuple[str | None, str]]:
    files = list_sources([str(p) for p in paths], fmt, kw.pop("targets", []))
    return [(r.src, r.tgt) for f in files for r in records(f, spec(task, **kw), Counter())]


# --- formats against Python's readers ------------------------------------------------------------


def test_each_format_reads_what_python_reads(tmp_path):
    pairs = [(f"quelle {s}", f"ziel {s}") for s in sentences(40)]
    (tmp_path / "c.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    with open(tmp_path / "c.tsv", newline="") as f:
        want = [(r[0], r[1]) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    assert read_records([tmp_path / "c.tsv"], "auto", "pairs") == want

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"src": s, "tgt": t}) + "\n" for s, t in pairs))
    want = [(r["src"], r["tgt"]) for r in map(json.loads, (tmp_path / "c.jsonl").read_text().splitlines())]
    assert read_records([tmp_path / "c.jsonl"], "auto", "pairs") == want

    (tmp_path / "train.de").write_text("".join(s + "\n" for s, _ in pairs))
    (tmp_path / "train.en").write_text("".join(t + "\n" for _, t in pairs))
    got = read_records([tmp_path / "train.de"], "parallel", "pairs", targets=[str(tmp_path / "train.en")])
    assert got == list(zip((tmp_path / "train.de").read_text().splitlines(),
                           (tmp_path / "train.en").read_text().splitlines()))

    (tmp_path / "c.lines").write_text("\n".join(t for _, t in pairs) + "\n\n")
    assert read_records([tmp_path / "c.lines"], "lines", "text") == [(None, t) for _, t in pairs]

    (tmp_path / "c.txt").write_text("First paragraph\nwraps here.\n\n\nSecond one.\n")
    assert read_records([tmp_path / "c.txt"], "auto", "text") == [(None, "First paragraph wraps here."),
                                                                    (None, "Second one.")]


def test_parquet_and_field_mapping(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [{"de": f"hallo {i}", "en": f"hello {i}", "body": f"text number {i}", "n": i} for i in range(50)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet", row_group_size=7)
    want = pq.read_table(tmp_path / "c.parquet").to_pylist()
    fields = ("de", "en", "body", "doc")
    assert read_records([tmp_path / "c.parquet"], "auto", "pairs", fields=fields) == \
        [(r["de"], r["en"]) for r in want]
    assert read_records([tmp_path / "c.parquet"], "auto", "text", fields=fields) == [(None, r["body"]) for r in want]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = prepare(cfg(tmp_path, task="pairs", sources=[str(tmp_path / "m.jsonl")], fields=FieldsConfig("de", "en"),
                      valid_fraction=0, test_fraction=0), progress=False, use_ray=False)
    assert sorted(read_back(out.folder)["train"]) == sorted((r["de"], r["en"]) for r in rows)
    with pytest.raises(ValueError, match=r"data.fields: .*m.jsonl:1 needs 'src' and 'tgt'"):
        prepare(cfg(tmp_path, task="pairs", sources=[str(tmp_path / "m.jsonl")], dir=str(tmp_path / "o2")),
                progress=False, use_ray=False)


def _zst(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".bz2", bz2.compress),
                                              (".xz", lzma.compress), (".zst", _zst)])
def test_compressed_inputs_read_like_plain_ones(tmp_path, suffix, compress):
    rows = "".join(json.dumps({"src": s, "tgt": s.upper()}) + "\n" for s in sentences(30))
    (tmp_path / "plain.jsonl").write_text(rows)
    (tmp_path / f"packed.jsonl{suffix}").write_bytes(compress(rows.encode()))
    assert read_records([tmp_path / f"packed.jsonl{suffix}"], "auto", "pairs") == \
        read_records([tmp_path / "plain.jsonl"], "auto", "pairs")


def test_missing_extras_are_named(tmp_path, monkeypatch):
    (tmp_path / "a.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ValueError, match=r"data.sources: .*a.txt.zst: .*seqfoundry\[zstd\]"):
        read_records([tmp_path / "a.txt.zst"], "auto", "text")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "dataset_info.json").write_text("{}")
    (hf / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match=r"HF datasets folder: .*seqfoundry\[datasets\]"):
        read_records([hf], "auto", "text")


def test_hf_datasets_folder_loads_when_installed(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": [f"line {s}" for s in sentences(20)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    assert read_records([tmp_path / "hf"], "auto", "text") == [(None, t) for t in rows["text"]]


def test_sources_globs_folders_and_names(tmp_path):
    for rel in ("a/x.txt", "a/sub/y.txt", "a/.hidden.txt", "b/z.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("Some words here.\n")
    got = list_sources([str(tmp_path / "a"), str(tmp_path / "b" / "*.txt")], "auto")
    assert [f.name for f in got] == ["sub/y.txt", "x.txt", "z.txt"] and {f.format for f in got} == {"text"}
    (tmp_path / "new.txt").write_text("x")
    more = list_sources([str(tmp_path / "a"), str(tmp_path / "b" / "*.txt"), str(tmp_path / "new.txt")], "auto")
    assert [f.name for f in more] == ["sub/y.txt", "x.txt", "z.txt", "new.txt"]  # adding a file renames none
    with pytest.raises(ValueError, match="data.sources: no file matches"):
        list_sources([str(tmp_path / "nothing*.txt")], "auto")


def test_bad_rows_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"src": "a", "tgt": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not JSON"):
        read_records([tmp_path / "bad.jsonl"], "auto", "pairs")
    (tmp_path / "s.de").write_text("a\nb\nc\n")
    (tmp_path / "s.en").write_text("a\nb\n")
    with pytest.raises(ValueError, match="data.target_sources: .* not line-aligned"):
        read_records([tmp_path / "s.de"], "parallel", "pairs", targets=[str(tmp_path / "s.en")])


# --- filters ------------------------------------------------------------------------------------------


MIXED = ["这是一个用来测试的中文句子，没有空格。", "今天天气很好，我们去公园散步吧。",
         "هذه جملة عربية طويلة بما يكفي للاختبار", "ذهب الولد إلى المدرسة في الصباح الباكر",
         "the lower-case english line has enough words", "another lower case sentence without any capitals",
         "2024 was the year the river flooded the town", "3 birds sat on the wire all morning long",
         "東京は日本の首都で、人口がとても多いです。", "ภาษาไทยเขียนโดยไม่มีช่องว่างระหว่างคำเลย"]


def test_a_mixed_script_corpus_loses_no_line(tmp_path):
    (tmp_path / "mixed.txt").write_text("\n".join(MIXED) + "\n")
    m = prepare(DataConfig(dir=str(tmp_path / "out"), sources=[str(tmp_path / "mixed.txt")], format="lines",
                           task="text", vocab_size=600, num_sentinels=4, valid_fraction=0, test_fraction=0),
                progress=False, use_ray=False)  # default filters
    assert m.data["filters"]["kept"] == len(MIXED) and not any(m.data["filters"]["dropped"].values())
    assert sorted(t for _, t in read_back(m.folder)["train"]) == sorted(MIXED)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_prepare_encodes_the_ids_of_encode_batch(kind):
    """prepare tokenizes with `encode_batch_fast` (no offsets): the reference is `encode_batch`'s ids,
    on mixed scripts, empty and unknown text, for both tokenizer kinds we train."""
    texts = MIXED + sentences(200) + ["", " ", "  two  spaces ", "ümlaut ß ﬁ", "🙂 emoji"]
    tok = train_tokenizer(MIXED + sentences(400, seed=1), kind=kind, vocab_size=400, num_sentinels=4)
    assert encode_texts(tok, texts) == [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def test_length_counts_characters_for_scripts_without_spaces():
    assert text_units("the quick brown fox") == 4
    assert text_units("这是中文") == 4 and text_units("東京 Tokyo") == 3
    drops = Counter()
    f = TextFilter(min_words=6)
    assert filter_text("短句子", f, drops) == [] and drops == {"min_words": 1}
    assert filter_text("这是一个足够长的句子", f, drops) == ["这是一个足够长的句子"]
    assert filter_text("| 1 | 2 | 3 | 4 | 5 | 6 |", f, drops) == [] and drops["min_alpha"] == 1
    assert filter_text(">>> print(1) and more words here", f, drops) == [] and drops["drop_code"] == 1
    assert [len(p) for p in filter_text("一二三四五。六七八九十。", TextFilter(min_words=1, max_words=7), Counter())] \
        == [6, 6]



def test_units_and_letter_share_agree_with_their_definitions_on_mixed_scripts():
    """Against the definitions: a unit is a character of a script without spaces or a run of other
    non-space characters; the letter share counts categories L and M among non-space characters."""
    import re
    import unicodedata

    from data_pipeline.filters import _NO_SPACE, _judged, alpha_share

    unit = re.compile(f"[{_NO_SPACE}]|[^\\s{_NO_SPACE}]+")
    rng = random.Random(3)
    alphabet = "ab Z 1 我们今天 ひらがな カタカナ ไทย ລາວ ကမ ខ្មែរ 𠀀 ذهب é \t\u3000\xa0\u2003\x1c.,!中"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert text_units(text) == len(unit.findall(text)), text
        normal = " ".join(text.split())
        visible = [c for c in normal if not c.isspace()]
        share = sum(unicodedata.category(c)[0] in "LM" for c in visible) / len(visible) if visible else 0.0
        assert alpha_share(normal) == pytest.approx(share), text
        reason, joined, units = _judged(text, TextFilter(min_words=3, min_alpha=0.0, drop_code=False))
        assert joined == normal and (units == len(unit.findall(normal)) or reason == "empty"), text


def test_filters_judged_a_batch_at_a_time_agree_with_one_at_a_time():
    """`judge_arrays` (whole-array, the prepare hot path) against `_judged` on random blocks: every script and
    kind of space, digits, marks, numerics that are not digits, code starts after spaces, indented and
    multi-line blocks, line breaks other than \\n, a lone surrogate, empty and all-space blocks; every
    filter on and off, thresholds on either side of a block's share and length."""
    from data_pipeline.filters import REASONS, _judged, judge_arrays

    def judged(blocks, f):
        j = judge_arrays(blocks, f)
        return [REASONS[r] for r in j.reason.tolist()], j.units.tolist()

    rng = random.Random(7)
    pieces = ["ab", "Z", "1", "½", "Ⅻ", "_", "我们", "ひら", "ไทย", "ລາວ", "ကမ", "ខ្មែរ", "𠀀", "ذهب", "é", "e\u0301", "ß",
              " ", "  ", "\t", "\u3000", "\xa0", "\u2003", "\x1c", "\n", "\r", "\x0b", "\u2028", "\x85", ".", ",", "!",
              "。", ">>>", "...", "$ ", "$", "def ", "def", "class ", "\ud800", "🙂"]
    for trial in range(40):
        f = TextFilter(min_words=rng.choice((0, 1, 3, 6)), max_words=rng.choice((2, 120)),
                       min_alpha=rng.choice((0.0, 0.5, 0.75, 1.0)), drop_code=rng.random() < 0.7)
        blocks = ["".join(rng.choice(pieces) for _ in range(rng.choice((0, 1, 2, 5, 12, 30)))) for _ in range(300)]
        blocks += ["", " ", " \t ", "  >>> x y z", "x >>> y", "\n  indented after a newline", "$ls", "def f(): pass"]
        rng.shuffle(blocks)
        want = [_judged(b, f) for b in blocks]
        assert judged(blocks, f) == ([r for r, _, _ in want], [u for _, _, u in want])
        assert judge_arrays(blocks, f).normal.tolist() == [b == " ".join(b.split()) for b in blocks]
    assert judged([], TextFilter()) == ([], []) and judged(["", " "], TextFilter()) == (["empty"] * 2, [-1] * 2)
    assert judge_arrays(["", " "], TextFilter()).normal.tolist() == [True, False]


@pytest.mark.parametrize("batch_chars", [40, 1 << 19])
@pytest.mark.parametrize("task, max_docs", [("text", -1), ("restore", -1), ("text", 3), ("pairs", -1)])
def test_records_are_the_one_item_filters_applied_in_order(tmp_path, monkeypatch, task, max_docs, batch_chars):
    """`records` (items judged a batch at a time, lookups cached per document) against the one-item
    definitions applied line by line: kept whole, cut at sentence ends, truncated, dropped by each filter,
    past max_docs; the same drop counts; whitespace-normalised texts, which `content_hashes` relies on. Small
    batches put some rows in batches where every item passes whole (taken as columns), others in batches
    with an item to cut (taken one at a time); `content_hashes` against its definition, sample by sample."""
    from data_pipeline import formats
    from data_pipeline.sources import restore_source

    monkeypatch.setattr(formats, "LINE_BATCH_CHARS", batch_chars)
    monkeypatch.setattr(formats, "JUDGE_BATCH", 3 if batch_chars < 100 else 4096)

    rows = [*sentences(30), "Too short.", ">>> code line here and more words", "| 1 | 2 | 3 | 4 | 5 | 6 |",
            "odd\x0bseparated words\xa0here ok", "short line here", "trailing  spaces here   ", "short line here",
            "  spaced   out    words that   stay one sample  ",
            "一二三四五。六七八九十。一二三四五六七八九十一二三四五",
            " ".join(["First sentence is long enough here."] * 4), "word " * 40, "", "... and a continuation",
            "Straße ß odd\u00a0white\x0bspace\x1cbetween\u3000these\u2028Words and\x85More", " " * 4, "?! ;; ::"]
    path = tmp_path / ("c.tsv" if task == "pairs" else "c.lines")
    path.write_text("\n".join((f"{r}\tx {r}" if task == "pairs" else r) for r in rows) + "\n")
    src = list_sources([str(path)], "auto" if task == "pairs" else "lines")[0]
    f = TextFilter(min_words=3, max_words=8)
    rs = ReadSpec(task=task, doc_lines=4, text_filter=f, valid_fraction=0.3, test_fraction=0.3)
    read = rows[:4 * max_docs] if max_docs >= 0 else rows
    want, want_drops = [], Counter()
    for row in read:
        if task == "pairs":
            s, t = " ".join(row.split()), " ".join(f"x {row}".split())
            want += [(s, t)] if s else []
            want_drops["empty"] += not s
            continue
        for piece in filter_text(row, f, want_drops):
            if task == "text":
                want.append((None, piece))
            elif restore_source(piece):
                want.append((restore_source(piece), piece))
            else:
                want_drops["empty"] += 1
    drops = Counter()
    got = list(records(src, rs, drops, max_docs=max_docs))
    assert [(r.src, r.tgt) for r in got] == want and [r.pos for r in got] == list(range(len(want)))
    assert drops == +Counter({**want_drops, "read": len(read)})
    definition = []  # texts come whitespace-normalised: `content_hashes` folds only case, as its definition
    for rec in got:
        assert all(t == " ".join(t.split()) for t in (rec.src or "", rec.tgt)), rec
        norm = " ".join(f"{rec.src or ''}\x00{rec.tgt}".split()).casefold().encode()
        definition.append((hashlib.blake2b(norm, digest_size=16).digest(), len(norm)))
    digests, sizes = scale.content_hashes(None if task == "text" else [r.src for r in got], [r.tgt for r in got])
    assert (digests, sizes.tolist()) == (b"".join(d for d, _ in definition), [n for _, n in definition])
    *_, table, sample, summary = scale.scan_file(src, rs, max_docs, 1 << 20)  # splits, and train only sampled
    assert table[np.argsort(table["pos"])]["split"].tolist() == [SPLITS.index(r.split) for r in got]
    assert {r.split for r in got} == set(SPLITS) or max_docs >= 0
    train = BottomK(1 << 20)
    for r, (digest, size) in zip(got, definition):
        if r.split == "train":
            train.add(digest, [r.tgt] if r.src is None else [r.src, r.tgt], np.array([size]), 1 if r.src is None else 2)
    assert sample.items() == train.sample().items() and summary.samples == [
        sum(r.split == split for r in got) for split in SPLITS]


@pytest.mark.parametrize("task, sample_tokens", [("text", 0), ("restore", 0), ("pairs", 0), ("text", 6)])
def test_encode_reads_the_scans_chunks_the_same_whatever_their_size(tmp_path, task, sample_tokens):
    """`encode` reads what `scan` kept, in `Texts` chunks, instead of the file: the same pieces as the records
    of the file read directly, whatever the chunk size (a sample a chunk, a few, one chunk), with duplicates
    dropped at chunk edges and documents joined across chunks (`sample_tokens`)."""
    rows = sentences(60) + ["一二三四五六七八九十。" * 2, "ذهب الولد إلى المدرسة", "Straße ß e\u0301"] * 2
    path = tmp_path / ("c.tsv" if task == "pairs" else "c.lines")
    path.write_text("\n".join((f"{r}\tx {r}" if task == "pairs" else r) for r in rows) + "\n")
    src = list_sources([str(path)], "auto" if task == "pairs" else "lines")[0]
    rs = ReadSpec(task=task, doc_lines=4, text_filter=TextFilter(min_words=1, max_words=8))
    want = list(records(src, rs, Counter()))
    tok = train_tokenizer([t for r in want for t in (r.src or "", r.tgt)], kind="bpe", vocab_size=300, num_sentinels=4)
    enc = scale.EncodeSpec(tok.to_str(), "uint16", 7, sample_tokens)
    dropped = np.array([(0, p) for p in (0, 5, 6, 13, len(want) - 1)], dtype=scale.DROP_DTYPE)

    def pieces(chunk_chars):
        chunks = list(scale.scan_file(src, rs, -1, 0, chunk_chars))[:-3]
        assert sum(len(c) for c in chunks) == len(want)
        got = [(t, s) for c in chunks for t, s in zip(*(lambda tg, sr: (tg, sr or [None] * len(tg)))(*c.texts()))]
        assert got == [(r.tgt, r.src) for r in want]
        return len(chunks), [(p.split, p.data.tobytes(), p.offsets, p.tokens)
                             for p in scale.encode_file((0, 0), chunks, enc, dropped) if isinstance(p, scale.Piece)]

    (n1, one), (nf, few), (na, alone) = pieces(1 << 30), pieces(200), pieces(1)
    assert n1 == 1 < nf < na == len(want) and one == few == alone and len(one) > 2
    keys = [data[a:a + 100].split(b"\0")[0].decode().split(".")[0] for _, data, offsets, _ in one
            for a in offsets[:-1]]  # each sample's first member name, up to its field
    first = sorted(int(key.split("-")[1]) for key in keys)
    kept = [r.pos for r in want if r.pos not in set(dropped["pos"].tolist())]
    if not sample_tokens:  # every kept sample once, under its position; the dropped ones nowhere
        assert first == kept
    else:  # each kept document's first sample starts a run of chunks
        docs = {}
        for r in want:
            if r.pos in kept:
                docs.setdefault(r.doc, r.pos)
        assert sorted(set(first)) == sorted(docs.values())


def test_texts_round_trip_every_character():
    texts = ["a b", "", "中文 ذهب", "\ud800 lone", "🙂", "x" * 1000]
    chunk = scale.Texts.of(bytearray([0, 1, 2, 0, 0, 1]), array("q", range(6)), texts, texts[::-1])
    assert chunk.texts() == (texts, texts[::-1]) and len(chunk) == 6
    assert scale.Texts.of(bytearray(), array("q"), [], None).texts() == ([], None)


def test_filter_counts_reach_the_manifest_and_a_greedy_filter_warns(tmp_path):
    lines = [f"short {'abcdefghij'[i % 10]}{'abcdefghij'[i // 10]}" for i in range(30)] + sentences(20)
    (tmp_path / "c.lines").write_text("\n".join(lines + lines[-5:]) + "\n")
    with pytest.warns(UserWarning, match=r"data.min_words: dropped 30 of 55 samples"):
        m = prepare(DataConfig(dir=str(tmp_path / "out"), sources=[str(tmp_path / "c.lines")], format="lines",
                               task="text", vocab_size=400, num_sentinels=4, valid_fraction=0, test_fraction=0),
                    progress=False, use_ray=False)
    assert m.data["filters"] == {"read": 55, "dropped": {"empty": 0, "drop_code": 0, "min_alpha": 0,
                                                         "min_words": 30, "dedup": 5}, "kept": 20}
    assert m.data["num_samples"] == 20


# --- splits --------------------------------------------------------------------------------------------


def test_one_file_splits_three_ways_and_adding_files_moves_nothing(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "corpus.txt").write_text("\n".join(sentences(600)) + "\n")
    base = dict(format="lines", task="text", valid_fraction=0.1, test_fraction=0.1, doc_lines=10)
    a = read_back(prepare(cfg(tmp_path, sources=[str(tmp_path / "one" / "corpus.txt")], **base),
                          progress=False, use_ray=False).folder)
    assert set(a) == {"train", "valid", "test"} and sum(map(len, a.values())) == 600
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "more.txt").write_text("\n".join(sentences(300, seed=1)) + "\n")
    b = read_back(prepare(cfg(tmp_path, dir=str(tmp_path / "out2"), **base,
                              sources=[str(tmp_path / "one" / "corpus.txt"), str(tmp_path / "two" / "*.txt")]),
                          progress=False, use_ray=False).folder)
    for split, samples in a.items():
        assert set(samples) <= set(b[split])  # every old sample stays in its split
    assert split_of("corpus.txt:3", 0.1, 0.1) == split_of("corpus.txt:3", 0.1, 0.1)


def awkward_lines(n: int) -> bytes:
    """Lines ending in \\n, \\r\\n or a lone \\r, blank ones, multi-byte text, a BOM, no final line end."""
    rng = random.Random(5)
    ends = [b"\n", b"\r\n", b"\r", b"\n"]
    body = b"".join((f"{i} " + rng.choice(["", "über straße", "这是中文", "plain words here"])).encode()
                    + rng.choice(ends) for i in range(n))
    return b"\xef\xbb\xbf" + body + b"last line without an end"


@pytest.mark.parametrize("block", [7, 64, 1 << 24])
def test_parts_start_at_the_line_numbers_python_counts(tmp_path, monkeypatch, block):
    from data_pipeline import parts

    monkeypatch.setattr(parts, "BLOCK", block)  # small blocks: line ends across block edges
    data = awkward_lines(400)
    (tmp_path / "c.lines").write_bytes(data)
    cuts = parts.cut_points(str(tmp_path / "c.lines"), 300, 7)
    assert len(cuts) > 5
    last = 0
    for offset, line in cuts:
        before = io.TextIOWrapper(io.BytesIO(data[:offset]), encoding="utf-8-sig", newline=None).read()
        assert before.endswith("\n") and before.count("\n") == line, (offset, line)
        assert line % 7 == 0 and offset - last >= 300
        last = offset


@pytest.mark.parametrize("batch_chars", [1, 5, 64, 1 << 19])
def test_lines_read_as_columns_are_the_lines_python_iterates(tmp_path, monkeypatch, batch_chars):
    """`read_columns` of `lines` (blocks of characters split at \\n, no Item a line) against the text file
    iterated a line at a time on \\r\\n and lone \\r ends across block edges, blank lines,
    multi-byte text, a BOM, no final line end, and parts starting mid-file; runs are the `doc_lines` groups
    by line number. Other formats are `read_items` in batches, runs where the group changes."""
    from data_pipeline import formats
    from data_pipeline.parts import parts_of

    monkeypatch.setattr(formats, "LINE_BATCH_CHARS", batch_chars)
    monkeypatch.setattr(formats, "JUDGE_BATCH", 7)
    (tmp_path / "c.lines").write_bytes(awkward_lines(300))
    whole = list_sources([str(tmp_path / "c.lines")], "lines")[0]
    rs = ReadSpec(task="text", doc_lines=9, text_filter=KEEP_ALL)

    def flat(cols):
        out = []
        for c in cols:
            assert [r[0] for r in c.runs] == [0, *(r[1] for r in c.runs[:-1])] and c.runs[-1][1] == len(c.text)
            out += [(group, None, t) for start, end, group in c.runs for t in c.text[start:end]]
        return out

    for src in [whole, *parts_of(whole, 700, 9)]:
        with formats.open_text(src.path, src.start, src.end) as f:
            want = [(str(i // 9), None, line.rstrip("\n")) for i, line in enumerate(f, start=src.first_line)]
        assert flat(formats.read_columns(src, rs)) == want and len(want) > 30
        assert [tuple(item) for item in formats.read_items(src, rs)] == want
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"row {i}", "doc": i // 4 % 3}) + "\n"
                                              for i in range(40)))
    src = list_sources([str(tmp_path / "c.jsonl")], "jsonl")[0]
    cols = list(formats.read_columns(src, rs))
    assert flat(cols) == [tuple(item) for item in formats.read_items(src, rs)]
    assert all(a[2] != b[2] for c in cols for a, b in zip(c.runs, c.runs[1:]))


@pytest.mark.parametrize("fmt", ["lines", "tsv"])
def test_a_file_read_in_parts_gives_the_records_of_the_whole_file(tmp_path, fmt):
    from data_pipeline.parts import parts_of, splittable

    data = awkward_lines(500)
    if fmt == "tsv":
        data = data.replace(b" ", b"\t")
    path = tmp_path / f"c.{fmt}"
    path.write_bytes(data)
    whole = list_sources([str(path)], fmt)[0]
    rs = ReadSpec(task="pairs" if fmt == "tsv" else "text", doc_lines=10, text_filter=KEEP_ALL)
    assert splittable(whole, 1000) and not splittable(whole, len(data))
    pieces = parts_of(whole, 1000, 10)
    assert len(pieces) > 3 and pieces[-1].end == -1
    got = [(r.doc, r.split, r.src, r.tgt) for p in pieces for r in records(p, rs, Counter())]
    assert got == [(r.doc, r.split, r.src, r.tgt) for r in records(whole, rs, Counter())]
    assert not splittable(list_sources([str(path)], "jsonl")[0], 1000)


def test_a_big_file_prepares_to_the_same_bytes_in_parts(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(sentences(900) + sentences(50)) + "\n")  # duplicates too
    files = list_sources([str(tmp_path / "corpus.txt")], "lines")
    owners, parts = split_files(files, ReadSpec(task="text", doc_lines=5), 3000, Runner(False), progress=False)
    assert len(parts) > 10 and set(owners) == {0}
    digests = []
    for n, part_bytes in enumerate((0, 3000)):
        m = prepare(cfg(tmp_path, dir=str(tmp_path / f"out{n}"), sources=[str(tmp_path / "corpus.txt")],
                        format="lines", task="text", part_bytes=part_bytes), progress=False, use_ray=False)
        digests.append({p.name: p.read_bytes() for p in sorted(m.folder.rglob("*")) if p.is_file()})
        assert m.data["filters"]["dropped"]["dedup"] == 50
    assert digests[0] == digests[1]


# --- tokenizers -----------------------------------------------------------------------------------------


def test_a_given_tokenizer_with_specials_elsewhere_is_reindexed(tmp_path):
    texts = sentences(200)
    given = Tokenizer(models.BPE(unk_token="[UNK]"))
    given.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    given.decoder = decoders.ByteLevel()
    given.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=[
        "hello", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]))
    given.save(str(tmp_path / "given.json"))
    (tmp_path / "c.lines").write_text("\n".join(texts) + "\n")
    m = prepare(cfg(tmp_path, sources=[str(tmp_path / "c.lines")], format="lines", task="text", num_sentinels=3,
                    tokenizer=str(tmp_path / "given.json")), progress=False, use_ray=False)
    tok = load_tokenizer(m.tokenizer_path)
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>", "<extra_id_0>", "<mask>")] == \
        [0, 1, 2, 3, 4, 7]
    mapping = m.data["tokenizer_mapping"]
    assert [r["given"] for r in mapping["reserved"]] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]", None, None, None, "[MASK]"]
    new_of_old = {old + k: new + k for old, new, n in mapping["moved"] for k in range(n)}
    new_of_old |= {r["given_id"]: r["id"] for r in mapping["reserved"] if r["given"]}
    for text in texts[:20]:
        old = given.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False).ids == [new_of_old[i] for i in old]
    assert sorted(t for _, t in sum(read_back(m.folder).values(), [])) == sorted(texts)


def test_a_sentencepiece_model_tokenizes_as_sentencepiece_does(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    texts = sentences(300)
    for kind in ("unigram", "bpe"):
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=70, hard_vocab_limit=False,
                                       model_type=kind, minloglevel=2)
        (tmp_path / f"{kind}.model").write_bytes(buf.getvalue())
        sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
        (tmp_path / "c.lines").write_text("\n".join(texts) + "\n")
        m = prepare(cfg(tmp_path, dir=str(tmp_path / kind), sources=[str(tmp_path / "c.lines")], format="lines",
                        task="text", tokenizer=str(tmp_path / f"{kind}.model")), progress=False, use_ray=False)
        tok = load_tokenizer(m.tokenizer_path)
        assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
        for text in texts[:30]:
            assert tok.encode(text, add_special_tokens=False).tokens == sp.encode(text, out_type=str)


def test_the_tokenizer_sample_is_bounded_and_independent_of_how_files_are_cut():
    """Against the definition: distinct hashes in hash order, each with the smallest of its copies' texts
    and its fixed size, the longest prefix within the budget (then the first hash over it, which a merge
    needs and training does not get). One file whole, the same entries cut into parts (BottomK each,
    merged flat, as any tree of `merge_samples` or as `SampleTree` merges them while they come, through Runner as
    prepare does) all give it, however often BottomK folds its buffer."""
    rng = random.Random(0)

    def definition(budget, entries):
        smallest = {}
        for h, texts, size in entries:
            if h not in smallest or texts < smallest[h][0]:
                smallest[h] = (texts, size)
        out, used = [], 0
        for h in sorted(smallest):
            out.append((h, *smallest[h]))
            if used + smallest[h][1] > budget:
                break
            used += smallest[h][1]
        return out

    def sample(entries, budget):
        part = BottomK(budget, fold_bytes=rng.choice((1, 20, 10**9)))  # folds every item, some, once at the end
        at = 0
        while at < len(entries):  # an item at a time, or a few of one text count at once (a scan's batch)
            run = entries[at:at + rng.randint(1, 6)]
            run = run[:next((k for k, e in enumerate(run) if len(e[1]) != len(run[0][1])), len(run))]
            part.add(b"".join(hi.to_bytes(8, "little") + lo.to_bytes(8, "little") for (hi, lo), _, _ in run),
                     [t for _, texts, _ in run for t in texts], np.array([n for *_, n in run]), len(run[0][1]))
            at += len(run)
        return part.sample()

    cut_somewhere = 0
    for trial in range(300):
        budget = rng.choice([0, 5, 100, 1000, 10**6])
        keys = [(rng.getrandbits(rng.choice((2, 64))), rng.getrandbits(rng.choice((1, 64)))) for _ in range(60)]
        entries = []
        for _ in range(rng.randint(0, 200)):
            h = rng.choice(keys)  # copies of a hash: other texts (case, spacing), the same normalised size
            texts = tuple(rng.choice(["a", "B", "çé", "中文", "x" * rng.randint(0, 9)]) + str(rng.randint(0, 3))
                          for _ in range(rng.choice((1, 2))))
            entries.append((h, texts, (7 * h[0] + h[1]) % 31))
        want = definition(budget, entries)
        over = sum(n for *_, n in want) > budget
        cut_somewhere += over
        trained = [t for _, texts, _ in (want[:-1] if over else want) for t in texts]
        assert sample(entries, budget).items() == want
        cuts = sorted(rng.randint(0, len(entries)) for _ in range(rng.randint(0, 5)))
        parts = [sample(entries[a:b], budget) for a, b in zip([0, *cuts], [*cuts, len(entries)])]
        assert merge_samples(budget, *parts).items() == want and merged_sample(budget, *parts) == trained
        tree = reduce_samples(Runner(use_ray=False), budget, parts, fan_in=rng.choice((2, 3)))
        assert tree[0].items() == want
        streamed = SampleTree(Runner(use_ray=False), budget, fan_in=rng.choice((2, 3)))  # as scans return
        for part in parts:
            streamed.add(part)
        assert reduce_samples(Runner(use_ray=False), budget, streamed.refs())[0].items() == want
    assert 100 < cut_somewhere < 300  # budgets that cut and budgets that hold everything


def test_dedup_over_hash_ranges_keeps_the_first_of_each_hash_whatever_the_range_count():
    """Against a plain dict: first occurrence in (file, position) order kept; hashes at the ranges' edges."""
    rng = random.Random(1)
    edges = [0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) // 3, (1 << 64) - 1]
    pool = [(rng.choice(edges + [rng.getrandbits(64)]), rng.getrandbits(64) % 5) for _ in range(300)]
    parts, origins, expected, seen, counts = [], [], set(), set(), [0, 0, 0]
    for owner, first in [(0, 0), (1, 0), (1, 70), (2, 0), (3, 0)]:  # file 1 read as two parts
        rows = [(*rng.choice(pool), first + pos, rng.randrange(3)) for pos in range(rng.randint(0, 90))]
        for hi, lo, pos, split in rows:
            if (hi, lo) in seen:
                expected.add((owner, pos))
                counts[split] += 1
            seen.add((hi, lo))
        table = np.array([(hi, lo, pos - first, split) for hi, lo, pos, split in rows], dtype=scale.HASH_DTYPE)
        parts.append(table[np.lexsort((table["pos"], table["lo"], table["hi"]))])
        origins.append((owner, first))
    origins = np.array(origins, dtype=np.uint64)
    for ranges in (1, 2, 3, 7):
        got, dups = set(), [0, 0, 0]
        for r in range(ranges):
            drops, n = scale.dedup_partition(r, ranges, origins, *parts)
            assert drops.tolist() == sorted(drops.tolist())
            got |= {(int(f), int(p)) for f, p in drops.tolist()}
            dups = [a + b for a, b in zip(dups, n)]
        assert got == expected and dups == counts and len(expected) > 100


# --- object storage ----------------------------------------------------------------------------------------


def test_sources_from_a_bucket(tmp_path, s3_bucket):
    from data_pipeline.storage import as_path

    rows = "".join(json.dumps({"src": s, "tgt": s.upper()}) + "\n" for s in sentences(40))
    (as_path(f"{s3_bucket}/corpus/a.jsonl.gz")).write_bytes(gzip.compress(rows.encode()))
    (as_path(f"{s3_bucket}/corpus/b.jsonl")).write_text(rows.replace("river", "ocean"))
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "a.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    (tmp_path / "local" / "b.jsonl").write_text(rows.replace("river", "ocean"))
    remote = prepare(cfg(tmp_path, dir=str(tmp_path / "r"), task="pairs", sources=[f"{s3_bucket}/corpus/*.jsonl*"]),
                     progress=False, use_ray=False)
    local = prepare(cfg(tmp_path, dir=str(tmp_path / "l"), task="pairs", sources=[str(tmp_path / "local")]),
                    progress=False, use_ray=False)
    assert [f["name"] for f in remote.data["source"]["files"]] == ["a.jsonl.gz", "b.jsonl"]
    assert read_back(remote.folder) == read_back(local.folder)


def test_fast_tar_headers_equal_tarfiles():
    import tarfile

    from data_pipeline.shards import ustar_header

    rng = random.Random(0)
    cases = [("000001-000000002.tgt.u16", 6), ("x.src.u32", 123456789), ("k-0001.tgt.u16", 0), ("n" * 100, 8**11 - 1)]
    cases += [("".join(rng.choice("abz09-._") for _ in range(rng.randint(1, 100))), rng.randrange(8**11))
              for _ in range(200)]
    for name, size in cases:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o444
        info.uname = info.gname = "seqfoundry"
        assert ustar_header(name.encode(), size) == info.tobuf(format=tarfile.USTAR_FORMAT)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_batched_tar_samples_equal_one_at_a_time(dtype):
    """The batch builder (whole-batch arrays) against `tar_sample` (itself checked against tarfile above):
    empty, one-block and many-block payloads, keys of several lengths, src+tgt and tgt-only samples; keys
    given as `NumberedKeys` against the same keys as strings."""
    from data_pipeline.shards import NumberedKeys, tar_sample, tar_samples

    rng = random.Random(dtype)
    top = 2**16 - 1 if dtype == "uint16" else 2**32 - 1
    keys = [f"{rng.randrange(10**6):06d}-{rng.randrange(10**9):09d}" + "-0003" * rng.randrange(2) for _ in range(300)]
    fields = [{name: [rng.choice((0, 1, top, rng.randrange(top))) for _ in range(rng.choice((0, 1, 30, 256, 257, 900)))]
               for name in rng.choice((("tgt",), ("src", "tgt")))} for _ in keys]
    one_by_one = [tar_sample(k, f, dtype) for k, f in zip(keys, fields)]
    data, ends = tar_samples(keys, fields, dtype)
    assert data.tobytes() == b"".join(one_by_one)
    assert ends.tolist() == np.cumsum([len(b) for b in one_by_one]).tolist()
    assert tar_samples([], [], dtype)[0].size == 0
    with pytest.raises(ValueError, match="over 100 bytes"):
        tar_samples(["k" * 95], [{"tgt": [1]}], dtype)
    for names in (("tgt",), ("src", "tgt")):  # keys as numbers (encode's form): the bytes of their strings
        same = [{name: f[next(iter(f))] for name in names} for f in fields]
        for prefix, digits in (("000007-", 9), ("1234567-", 9), ("k", 3)):
            numbers = np.array([0, 10**digits - 1] + [rng.randrange(10**digits) for _ in same[2:]])
            strings = [f"{prefix}{n:0{digits}d}" for n in numbers.tolist()]
            got = tar_samples(NumberedKeys(prefix, numbers, digits), same, dtype)
            want = tar_samples(strings, same, dtype)
            assert got[0].tobytes() == want[0].tobytes() and got[1].tolist() == want[1].tolist()


def test_max_documents_keeps_the_first_documents_of_the_corpus(tmp_path):
    for i in range(4):
        (tmp_path / f"f{i}.txt").write_text("\n".join(f"line {i} {j} with a few more words" for j in range(30)) + "\n")
    m = prepare(cfg(tmp_path, sources=[str(tmp_path / "f*.txt")], format="lines", task="text", doc_lines=10,
                    max_documents=5, valid_fraction=0, test_fraction=0), progress=False, use_ray=False)
    assert sorted(t for _, t in read_back(m.folder)["train"]) == sorted(
        f"line {i} {j} with a few more words" for i in range(2) for j in range(30) if (i, j // 10) < (1, 2))
    (tmp_path / "x.txt").write_text("plain text\n")
    with pytest.raises(ValueError, match=r"data.format: task 'pairs' needs source/target pairs; .*x.txt"):
        prepare(cfg(tmp_path, dir=str(tmp_path / "p"), task="pairs", sources=[str(tmp_path / "x.txt")]),
                progress=False, use_ray=False)


WORKER_LOOP = """
import json, random, sys
import numpy as np, psutil
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from data_pipeline import scale
from data_pipeline.formats import ReadSpec, list_sources
from data_pipeline.filters import TextFilter
folder, mode = sys.argv[1], sys.argv[2]
rng = random.Random(0)
zh = "我们今天在公园里散步看见很多小鸟在树上唱歌天气非常好"
words = "the river runs past old mills and quiet farms while birds sing over fields of wheat".split()
lines = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) if i % 2 else
         "".join(rng.choice(zh) for _ in range(rng.randint(12, 60))) for i in range(3000)]
open(f"{folder}/a.txt", "w").write("\\n".join(lines) + "\\n")
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Metaspace()
tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
tok_json = tok.to_str()
src = list_sources([f"{folder}/a.txt"], "lines")[0]
spec = ReadSpec(task="text", doc_lines=100, text_filter=TextFilter(min_words=1, max_words=1000))
chunks = list(scale.scan_file(src, spec, -1, 0))[:-3]  # then the table, sample and summary
no_drops = np.zeros(0, scale.DROP_DTYPE)
rss = []
for task in range(12):  # what one Ray worker does for 12 encode tasks: each gets its own copy of the JSON
    enc = scale.EncodeSpec(json.loads(json.dumps(tok_json)), "uint16", 500)
    if mode == "fresh":  # the reference: a tokenizer built per task, as before
        scale.shared_tokenizer.cache_clear()
    for _ in scale.encode_file((0, 0), chunks, enc, no_drops):
        pass
    info = psutil.Process().memory_info()
    rss.append(info.rss - info.shared)
print(json.dumps({"growth_mb": (rss[-1] - rss[1]) / 2**20}))
"""


def test_an_encode_worker_does_not_grow_with_the_tasks_it_runs(tmp_path):
    """A Ray worker runs many encode tasks; each must leave its memory as it found it. Measured against the
    reference of a tokenizer built per task (tokenizers 0.23 kept ~MBs of each), in two fresh processes."""
    def growth(mode: str) -> float:
        (tmp_path / mode).mkdir()
        out = subprocess.run([sys.executable, "-c", WORKER_LOOP, str(tmp_path / mode), mode], capture_output=True,
                             text=True, cwd=Path(__file__).parents[2], env={**os.environ,
                                                                          "TOKENIZERS_PARALLELISM": "false"})
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"]

    shared, fresh = growth("shared"), growth("fresh")
    assert shared < 2.0, (shared, fresh)
    print(f"private RSS growth over 10 encode tasks: shared tokenizer {shared:.1f} MB, one per task {fresh:.1f} MB")
