"""Text sources: the built-in corpus, files and JSONL pairs, the restore task, de-duplication, splits."""

from __future__ import annotations

import json

import pytest

from data_pipeline.sources import (Document, Record, TextLimits, builtin_documents, deduplicate, expand_sources,
                                   file_documents, paragraphs, restore_source, split_documents)


def test_builtin_corpus_needs_no_network_and_holds_prose():
    docs = list(builtin_documents("text", TextLimits(), max_documents=5))
    assert len(docs) == 5 and len({d.id for d in docs}) == 5
    texts = [r.tgt for d in docs for r in d.records]
    assert len(texts) > 20 and all(len(t.split()) >= 6 and t[0].isupper() for t in texts)
    assert not any(">>>" in t for t in texts)


def test_restore_task_strips_punctuation_and_casing():
    assert restore_source("Return the value of `x`, don't panic!") == "return the value of x dont panic"
    (doc,) = list(builtin_documents("restore", TextLimits(), max_documents=1))
    assert all(r.src == restore_source(r.tgt) and r.src != r.tgt for r in doc.records)


def test_paragraphs_skip_code_and_cut_long_ones():
    text = ("Short one.\n\n>>> print(1)\n1\n\n    indented = code()\n\n"
            + " ".join(f"Sentence number {i} is here." for i in range(40)))
    paras = paragraphs(text, TextLimits(min_words=3, max_words=20))
    assert all(len(p.split()) <= 20 for p in paras) and len(paras) == 10
    assert not any("print" in p or "indented" in p for p in paras)


def test_deduplicate_ignores_case_and_spacing_and_drops_empty_documents():
    docs = [Document("a", [Record("Hello  there, world."), Record("Once more.")]),
            Document("b", [Record("hello there, WORLD.")])]
    out = deduplicate(docs)
    assert [d.id for d in out] == ["a"] and len(out[0].records) == 2


def test_split_by_document_is_disjoint_deterministic_and_keeps_order():
    docs = [Document(f"doc{i}", [Record(f"Text {i}.")]) for i in range(40)]
    splits = split_documents(docs, 0.1, 0.1)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [32, 4, 4]
    ids = [{d.id for d in splits[s]} for s in splits]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert split_documents(docs, 0.1, 0.1) == splits
    assert [d.id for d in splits["train"]] == sorted((d.id for d in splits["train"]), key=lambda x: int(x[3:]))
    with pytest.raises(ValueError, match="data.valid_fraction"):
        split_documents(docs[:2], 0.1, 0.1)


def test_text_files_and_jsonl_pairs(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph has enough words here.\n\nSecond paragraph also has some words.\n")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in [
        {"src": "hallo welt", "tgt": "hello world", "doc": "d1"},
        {"src": "guten tag", "tgt": "good day", "doc": "d1"},
        {"src": "danke", "tgt": "thanks"}]) + "\n")
    (doc,) = list(file_documents(expand_sources([str(tmp_path / "*.txt")]), "text", TextLimits()))
    assert [r.src for r in doc.records] == [None, None] and len(doc.records) == 2
    docs = list(file_documents([pairs], "pairs", TextLimits()))
    assert [len(d.records) for d in docs] == [2, 1] and docs[0].records[1] == Record(tgt="good day", src="guten tag")
    with pytest.raises(ValueError, match="data.sources"):
        expand_sources([str(tmp_path / "nothing*.txt")])
    pairs.write_text('{"src": "x"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1 needs 'src' and 'tgt'"):
        list(file_documents([pairs], "pairs", TextLimits()))
