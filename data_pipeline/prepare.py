"""`prepare`: sources → tokenizer.json + WebDataset shards + manifest.json.

Two phases. `plan()` does everything that needs no Ray: list and fingerprint
the sources (for the built-in corpus: read, de-duplicate and split it), check a
given tokenizer and the target folder (so a bad config or a foreign folder
fails before any cluster work). `run()` prepares:
- a user corpus (`data.sources`) with `scale.run_corpus`: reading, filtering,
  de-duplication, tokenizer sampling, tokenization and shard writing are all
  Ray tasks, the driver keeps counts and references (see `scale`);
- the built-in corpus (a few MB, read in `plan`) by tokenizing chunks as Ray
  tasks and writing the shards in a fixed order with `webdataset.ShardWriter`.

Deterministic: chunks are written in submission order, never completion
order; tar headers are fixed; the manifest holds no paths outside the folder
or times. Everything is written into `<dir>/.staging` and moved into place at
the end, so an interrupted prepare never leaves a half dataset behind a manifest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Iterator

from tokenizers import Tokenizer

from .chunks import token_chunks
from .config import DataConfig
from .formats import ReadSpec, SourceFile, list_sources
from .filters import TextFilter
from .scale import EncodeSpec, Runner, reduce_samples, run_corpus, train_from_sample
from .manifest import FORMAT, MANIFEST_NAME, Manifest, bad_files, write_manifest
from .shards import SplitWriter, WrittenShard, encode_sample, ids_dtype, sha256_file
from .sources import SPLITS, Document, TextLimits, builtin_corpus_name, builtin_documents, deduplicate, split_documents
from .storage import as_path, check_writable, is_remote, local_copy, mirror_dir, remove_tree, upload
from .tokenizer import (Specials, check_specials, load_tokenizer, sentence_end_ids, sentinel_token,
                        encode_texts, shared_tokenizer, train_tokenizer)
from .tokenizer_map import load_given_tokenizer

TOKENIZER_NAME = "tokenizer.json"
SHARDS_DIR = "shards"
STAGING_DIR = ".staging"
Row = tuple[str, "str | None", str]  # (key, src text, tgt text)


@dataclass
class Plan:
    """What `run` will write, decided without Ray."""

    cfg: DataConfig
    folder: Path
    splits: dict[str, list[Document]] | None
    """The built-in corpus, read and split; None for a user corpus (read by `run`'s tasks)."""
    source: dict
    """Where the documents came from (built-in corpus name, or files with their sha256)."""
    fingerprint: str
    """sha256 of the settings and documents that decide the output bytes."""
    up_to_date: bool
    """The folder already holds this exact dataset, intact."""
    files: list[SourceFile] | None = None
    """The user corpus's files, in order (None: the built-in corpus)."""


def prepare(cfg: DataConfig, *, progress: bool = True, use_ray: bool = True) -> Manifest:
    """Prepare `cfg.dir`; with `use_ray` the tokenization runs as Ray tasks on the
    connected cluster (Ray starts a local one if none is connected)."""
    return run(plan(cfg), progress=progress, use_ray=use_ray)


def plan(cfg: DataConfig) -> Plan:
    """Read the corpus and check the target; raises ValueError naming the `data.*` key."""
    folder = target_folder(cfg.dir)
    if cfg.tokenizer:
        reused_tokenizer(cfg.tokenizer, cfg.num_sentinels)
    if cfg.sources:
        return plan_files(cfg, folder)
    docs = collect_documents(cfg)
    if not docs:
        raise ValueError("data.sources: no text left after filtering and de-duplication")
    splits = split_documents(docs, cfg.valid_fraction, cfg.test_fraction)
    source = describe_source(cfg)
    digest = fingerprint(cfg, splits, source)
    return Plan(cfg, folder, splits, source, digest, up_to_date=check_target(folder, digest, cfg.overwrite))


def plan_files(cfg: DataConfig, folder: Path) -> Plan:
    """A user corpus: its files listed and fingerprinted (name, format, content hash), nothing read yet."""
    try:
        files = list_sources(cfg.sources, cfg.format, cfg.target_sources)
    except OSError as err:
        raise ValueError(f"data.sources: {err}") from None
    if cfg.task == "pairs":
        mono = next((f for f in files if f.format in ("text", "lines")), None)
        if mono:
            raise ValueError(f"data.format: task 'pairs' needs source/target pairs; {mono.path} reads as "
                             f"{mono.format!r} (use jsonl, tsv, parquet, parallel or hf)")
    source = {"files": [file_entry(f) for f in files]}
    if cfg.tokenizer:
        source["tokenizer_sha256"] = sha256_file(cfg.tokenizer)
    digest = fingerprint(cfg, {}, source)
    return Plan(cfg, folder, None, source, digest, check_target(folder, digest, cfg.overwrite), files)


def file_entry(f: SourceFile) -> dict:
    entry = {"path": f.path if is_remote(f.path) else str(Path(f.path).resolve()), "name": f.name,
             "format": f.format, **content_id(f.path)}
    if f.target is not None:
        entry["target"] = {"path": f.target, **content_id(f.target)}
    return entry


def content_id(path: str) -> dict:
    """sha256 of a local file; the store's ETag (or checksum) and size of an object (not downloaded twice)."""
    if not is_remote(path):
        p = Path(path)
        return {"sha256": sha256_file(p)} if p.is_file() else {"sha256": _tree_sha256(p)}
    p = as_path(path)
    info = p.fs.info(p.path)
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("crc32c") or p.fs.checksum(p.path)
    return {"etag": str(tag).strip('"'), "size": int(info.get("size") or 0)}


def _tree_sha256(folder: Path) -> str:
    """A folder source (an HF datasets folder): sha256 over its files' names and contents."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def target_folder(data_dir: str) -> Path:
    """`data.dir` as a path; a bucket URL must be writable now (ValueError naming `data.dir`)."""
    try:
        folder = as_path(data_dir)
        if is_remote(folder):
            check_writable(folder)
    except (ValueError, OSError) as err:
        raise ValueError(f"data.dir: {err}") from None
    return folder


def collect_documents(cfg: DataConfig) -> list[Document]:
    """The built-in corpus's documents (read in the driver: a few MB, a fixed size)."""
    limits = TextLimits(min_words=cfg.min_words, max_words=cfg.max_words)
    return deduplicate(builtin_documents(cfg.task, limits, cfg.max_documents))


def describe_source(cfg: DataConfig) -> dict:
    source: dict = {"corpus": builtin_corpus_name()}
    if cfg.tokenizer:
        source["tokenizer_sha256"] = sha256_file(cfg.tokenizer)
    return source


def output_settings(cfg: DataConfig) -> dict:
    """The settings that change the prepared bytes (not the folder, workers or stream options)."""
    keys = ("task", "max_documents", "min_words", "max_words", "valid_fraction", "test_fraction",
            "tokenizer_type", "vocab_size", "num_sentinels", "shard_samples")
    settings = {k: getattr(cfg, k) for k in keys}
    settings["sources"] = list(cfg.sources)
    settings["tokenizer"] = cfg.tokenizer
    if cfg.sample_tokens:  # only when set: datasets prepared before the key existed keep their fingerprint
        settings["sample_tokens"] = cfg.sample_tokens
    if cfg.sources:  # the keys of user corpora (the built-in corpus keeps its fingerprint)
        settings.update(format=cfg.format, target_sources=list(cfg.target_sources), fields=asdict(cfg.fields),
                        doc_lines=cfg.doc_lines, min_alpha=cfg.min_alpha, drop_code=cfg.drop_code, dedup=cfg.dedup,
                        tokenizer_sample_bytes=cfg.tokenizer_sample_bytes)
    return settings


def fingerprint(cfg: DataConfig, splits: dict[str, list[Document]], source: dict) -> str:
    """sha256 of what decides the output bytes; where the sources lie does not (their names under the
    source root and their content hashes do), so a moved corpus is recognised as the same dataset."""
    settings = {**output_settings(cfg), "sources": [f["name"] for f in source.get("files", [])],
                "tokenizer": "reused" if cfg.tokenizer else ""}  # the reused tokenizer's sha256 is in `source`
    if cfg.sources:
        settings["target_sources"] = [PurePosixPath(f["target"]["path"]).name for f in source["files"]
                                      if "target" in f]
    located = {**source, "files": [_unlocated(f) for f in source["files"]]} if "files" in source else source
    h = hashlib.sha256(json.dumps([FORMAT, settings, located], sort_keys=True).encode())
    for split in SPLITS:
        for doc in (splits or {}).get(split, []):
            h.update(json.dumps([split, doc.id, [asdict(r) for r in doc.records]]).encode())
    return h.hexdigest()


def _unlocated(f: dict) -> dict:
    out = {k: v for k, v in f.items() if k != "path"}
    if "target" in out:
        out["target"] = {k: v for k, v in out["target"].items() if k != "path"}
    return out


def check_target(folder: Path, digest: str, overwrite: bool) -> bool:
    """True if `folder` already holds this dataset intact; ValueError if it holds another one."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"data.dir: {folder} exists and is not a folder")
    entries = [e.name for e in folder.iterdir() if e.name != STAGING_DIR] if folder.is_dir() else []
    if not entries:
        return False
    if (folder / MANIFEST_NAME).is_file():
        old = _read_json(folder / MANIFEST_NAME)
        if old.get("fingerprint") == digest:
            return not bad_files(Manifest.load(folder))  # same dataset: rebuild only if damaged
        if not overwrite:
            raise ValueError(f"data.dir: {folder} holds a different prepared dataset; choose another "
                             "data.dir or set data.overwrite=true to replace it")
    elif not overwrite:
        raise ValueError(f"data.dir: {folder} is not empty and holds no {MANIFEST_NAME}; choose an empty "
                         "folder or set data.overwrite=true")
    return False


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --- run: tokenizer, Ray tokenization, shards, manifest ----------------------------


def run(plan: Plan, *, progress: bool = True, use_ray: bool = True) -> Manifest:
    if plan.up_to_date:
        print(f"prepare: {plan.folder} is up to date", file=sys.stderr)
        return Manifest.load(plan.folder)
    # Object storage has no atomic rename: a remote dataset is staged locally and uploaded, manifest last.
    staging = mirror_dir(plan.folder) / STAGING_DIR if is_remote(plan.folder) else plan.folder / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    (staging / SHARDS_DIR).mkdir(parents=True)
    if plan.files is not None:
        return run_files(plan, staging, progress=progress, use_ray=use_ray)
    tok, specials, mapping = build_tokenizer(plan)
    tok.save(str(staging / TOKENIZER_NAME))
    dtype = ids_dtype(tok.get_vocab_size())
    written = write_splits(plan, tok.to_str(), dtype, staging / SHARDS_DIR, progress=progress, use_ray=use_ray,
                           sentence_ends=specials.sentence_end_ids)
    documents = {split: len(plan.splits[split]) for split in SPLITS}
    data = manifest_data(plan, staging, written, specials, dtype, tok.get_vocab_size(), documents,
                         {"tokenizer_mapping": mapping} if mapping else None)
    write_manifest(staging / MANIFEST_NAME, data)
    publish(staging, plan.folder)
    return Manifest.load(plan.folder)


def run_files(plan: Plan, staging: Path, *, progress: bool, use_ray: bool) -> Manifest:
    """A user corpus through `scale.run_corpus` (every stage a Ray task with `use_ray`)."""
    cfg = plan.cfg
    given = reused_tokenizer(cfg.tokenizer, cfg.num_sentinels) if cfg.tokenizer else None
    sentinels = given[1] if given else cfg.num_sentinels
    spec = ReadSpec(task=cfg.task, fields=(cfg.fields.src, cfg.fields.tgt, cfg.fields.text, cfg.fields.doc),
                    doc_lines=cfg.doc_lines, valid_fraction=cfg.valid_fraction, test_fraction=cfg.test_fraction,
                    text_filter=TextFilter(cfg.min_words, cfg.max_words, cfg.min_alpha, cfg.drop_code))

    def tokenizer(runner: Runner, samples: list):
        if given:
            return runner.put(given[0].to_str())
        train = partial(_trained_json, cfg.tokenizer_type, cfg.vocab_size, sentinels)
        merged = reduce_samples(runner, cfg.tokenizer_sample_bytes, samples)
        return runner.submit(train_from_sample, train, cfg.tokenizer_sample_bytes, *merged)

    def encoding(tok_json: str) -> EncodeSpec:
        tok = Tokenizer.from_str(tok_json)
        return EncodeSpec(tok_json, ids_dtype(tok.get_vocab_size()), cfg.shard_samples, cfg.sample_tokens,
                          sentence_end_ids(tok, sentinels))

    result = run_corpus(plan.files, spec, runner=Runner(use_ray, cfg.prepare_tasks), out=staging / SHARDS_DIR,
                        max_documents=cfg.max_documents, dedup=cfg.dedup, shard_samples=cfg.shard_samples,
                        sample_bytes=0 if given else cfg.tokenizer_sample_bytes, tokenizer=tokenizer,
                        encoding=encoding, progress=progress, part_bytes=cfg.part_bytes)
    tok = Tokenizer.from_str(result.tok_json)
    if not given:
        _warn_vocab(cfg, tok)
    tok.save(str(staging / TOKENIZER_NAME))
    print(filter_report(result.filters), file=sys.stderr)
    specials = Specials(sentinels, sentence_end_ids(tok, sentinels))
    extra = {"filters": result.filters, **({"tokenizer_mapping": given[2]} if given and given[2] else {})}
    data = manifest_data(plan, staging, result.written, specials, ids_dtype(tok.get_vocab_size()),
                         tok.get_vocab_size(), result.documents, extra)
    for split in SPLITS:
        if getattr(cfg, f"{split}_fraction", 0) > 0 and not data["splits"][split]["num_samples"]:
            warnings.warn(f"data.{split}_fraction: no document fell in the {split} split (the split is a hash "
                          "of each document key); add documents or lower data.doc_lines", stacklevel=2)
    write_manifest(staging / MANIFEST_NAME, data)
    publish(staging, plan.folder)
    return Manifest.load(plan.folder)


def _trained_json(kind: str, vocab_size: int, num_sentinels: int, texts: list[str]) -> str:
    return train_tokenizer(texts, kind=kind, vocab_size=vocab_size, num_sentinels=num_sentinels).to_str()


def _warn_vocab(cfg: DataConfig, tok: Tokenizer) -> None:
    if tok.get_vocab_size() != cfg.vocab_size:
        warnings.warn(f"data.vocab_size: the corpus gave {tok.get_vocab_size()} tokens, not "
                      f"{cfg.vocab_size}; the manifest records the real size", stacklevel=3)


def filter_report(filters: dict) -> str:
    """One console line: samples read, dropped by each filter, kept."""
    dropped = ", ".join(f"{k} {v}" for k, v in filters["dropped"].items() if v) or "none"
    return f"prepare: {filters['read']} samples read; dropped: {dropped}; {filters['kept']} kept"


def build_tokenizer(plan: Plan) -> tuple[Tokenizer, Specials, dict | None]:
    cfg = plan.cfg
    mapping = None
    if cfg.tokenizer:
        tok, num_sentinels, mapping = reused_tokenizer(cfg.tokenizer, cfg.num_sentinels)
    else:
        num_sentinels = cfg.num_sentinels
        texts = (t for doc in plan.splits["train"] for rec in doc.records for t in (rec.src, rec.tgt) if t)
        tok = train_tokenizer(texts, kind=cfg.tokenizer_type, vocab_size=cfg.vocab_size, num_sentinels=num_sentinels)
        _warn_vocab(cfg, tok)
    return tok, Specials(num_sentinels, sentence_end_ids(tok, num_sentinels)), mapping


def reused_tokenizer(path: str, num_sentinels: int) -> tuple[Tokenizer, int, dict | None]:
    """A given tokenizer, its sentinel count and the id mapping (None when its reserved ids already are ours:
    the file is used as it is); ValueError naming `data.tokenizer`."""
    if str(path).endswith(".json"):
        try:
            tok = load_tokenizer(local_copy(path))
        except Exception as err:  # tokenizers raises its own Exception type for unreadable files
            raise ValueError(f"data.tokenizer: cannot load {path}: {err}") from None
        sentinels = count_sentinels(tok)
        try:
            check_specials(tok, sentinels)
            return tok, sentinels, None
        except ValueError:
            pass  # specials elsewhere: re-indexed below
    return load_given_tokenizer(path, num_sentinels)


def count_sentinels(tok: Tokenizer) -> int:
    return next(i for i in itertools.count() if tok.token_to_id(sentinel_token(i)) is None)


def split_rows(plan: Plan, split: str) -> list[Row]:
    """Rows of a split in corpus order; keys `<document>-<record>` are unique in the dataset.

    With `data.sample_tokens` a row is a whole document (its paragraphs joined by a space), keyed
    `<document>`; `tokenize_chunk` cuts it into samples `<document>-<chunk>`."""
    doc_index = {doc.id: i for i, doc in enumerate(d for s in SPLITS for d in plan.splits[s])}
    if plan.cfg.sample_tokens:
        return [(f"{doc_index[doc.id]:06d}", None, " ".join(rec.tgt for rec in doc.records))
                for doc in plan.splits[split]]
    return [(f"{doc_index[doc.id]:06d}-{j:04d}", rec.src, rec.tgt)
            for doc in plan.splits[split] for j, rec in enumerate(doc.records)]


def write_splits(plan: Plan, tok_json: str, dtype: str, out: Path, *, progress: bool,
                 use_ray: bool = True, sentence_ends: tuple[int, ...] = ()) -> dict[str, list[WrittenShard]]:
    """Tokenize every split chunk by chunk (Ray tasks, or in-process) and write the shards in order."""
    from tqdm import tqdm

    rows = {split: split_rows(plan, split) for split in SPLITS}
    chunks = [(split, chunk) for split in SPLITS for chunk in _chunks(rows[split], plan.cfg.shard_samples)]
    cut = (plan.cfg.sample_tokens, tuple(sentence_ends))
    results = (_ray_map(tok_json, [c for _, c in chunks], dtype, plan.cfg.prepare_tasks, cut) if use_ray
               else (tokenize_chunk(tok_json, c, dtype, *cut) for _, c in chunks))
    written: dict[str, list[WrittenShard]] = {}
    bar = tqdm(total=sum(map(len, rows.values())), unit="sample", desc=f"prepare {plan.folder.name}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    writer = None
    for (split, chunk), samples in zip(chunks, results):
        if writer is None or writer.split != split:
            if writer is not None:
                written[writer.split] = writer.close()
            writer = SplitWriter(out, split, plan.cfg.shard_samples)
        for sample, n_tokens in samples:
            writer.write(sample, n_tokens)
        bar.update(len(chunk))
    if writer is not None:
        written[writer.split] = writer.close()
    bar.close()
    return written


def _ray_map(tok_json: str, chunks: list[list[Row]], dtype: str, max_tasks: int,
             cut: tuple = (0, ())) -> Iterator[list]:
    """tokenize_chunk over `chunks` as Ray tasks; results in submission order (never completion order)."""
    import ray

    tokenize = ray.remote(tokenize_chunk)
    tok_ref = ray.put(tok_json)
    in_flight = max_tasks or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    window: deque = deque()
    for chunk in chunks:
        window.append(tokenize.remote(tok_ref, chunk, dtype, *cut))
        if len(window) >= in_flight:
            yield ray.get(window.popleft())
    while window:
        yield ray.get(window.popleft())


def _chunks(rows: list[Row], size: int) -> Iterator[list[Row]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def tokenize_chunk(tok_json: str, rows: list[Row], dtype: str, sample_tokens: int = 0,
                   sentence_ends: tuple[int, ...] = ()) -> list[tuple[dict, int]]:
    """Ray task: encode a chunk of rows into ShardWriter samples (and their token counts).

    With `sample_tokens` each row is a document, cut into samples of about that many tokens
    (`chunks.token_chunks`, at sentence ends when it can)."""
    tok = shared_tokenizer(tok_json)
    tgt = encode_texts(tok, [r[2] for r in rows])
    if sample_tokens:
        return [(encode_sample(f"{key}-{c:04d}", {"tgt": ids}, dtype), len(ids))
                for (key, _, _), t in zip(rows, tgt)
                for c, ids in enumerate(token_chunks(t, sample_tokens, sentence_ends))]
    has_src = rows[0][1] is not None
    src = encode_texts(tok, [r[1] for r in rows]) if has_src else [None] * len(rows)
    out = []
    for (key, _, _), s, t in zip(rows, src, tgt):
        fields = {"src": s, "tgt": t} if s is not None else {"tgt": t}
        out.append((encode_sample(key, fields, dtype), sum(len(v) for v in fields.values())))
    return out


def manifest_data(plan: Plan, staging: Path, written: dict[str, list[WrittenShard]], specials: Specials,
                  dtype: str, vocab_size: int, documents: dict[str, int], extra: dict | None = None) -> dict:
    shards = [{"path": f"{SHARDS_DIR}/{w.path.name}", "split": split, "samples": w.samples, "tokens": w.tokens,
               "bytes": w.path.stat().st_size, "sha256": w.sha256 or sha256_file(w.path)}
              for split in SPLITS for w in written.get(split, [])]
    splits = {split: {"num_samples": sum(s["samples"] for s in shards if s["split"] == split),
                      "num_tokens": sum(s["tokens"] for s in shards if s["split"] == split),
                      "num_documents": documents[split],
                      "num_shards": sum(s["split"] == split for s in shards)} for split in SPLITS}
    return {
        "format": FORMAT,
        "task": plan.cfg.task,
        "fields": ["tgt"] if plan.cfg.task == "text" else ["src", "tgt"],
        "dtype": dtype,
        "tokenizer": TOKENIZER_NAME,
        "tokenizer_sha256": sha256_file(staging / TOKENIZER_NAME),
        "vocab_size": vocab_size,
        "specials": specials.to_json(),
        "num_samples": sum(s["num_samples"] for s in splits.values()),
        "num_tokens": sum(s["num_tokens"] for s in splits.values()),
        "splits": splits,
        "shards": shards,
        **(extra or {}),
        "source": plan.source,
        "config": output_settings(plan.cfg),
        "fingerprint": plan.fingerprint,
    }


def publish(staging: Path, folder: Path) -> None:
    """Move the staged dataset into `folder`: the old manifest goes first, the new one last."""
    if is_remote(folder):
        publish_remote(staging, folder)
        return
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    shutil.rmtree(folder / SHARDS_DIR, ignore_errors=True)
    os.replace(staging / SHARDS_DIR, folder / SHARDS_DIR)
    os.replace(staging / TOKENIZER_NAME, folder / TOKENIZER_NAME)
    os.replace(staging / MANIFEST_NAME, folder / MANIFEST_NAME)
    staging.rmdir()


def publish_remote(staging: Path, folder: Path) -> None:
    """Upload the staged dataset to object storage; a reader never sees a manifest whose shards are not there."""
    manifest = folder / MANIFEST_NAME
    if manifest.exists():
        manifest.unlink()
    remove_tree(folder / SHARDS_DIR)
    upload(staging, folder, names=[SHARDS_DIR, TOKENIZER_NAME, MANIFEST_NAME], last=[MANIFEST_NAME])
    shutil.rmtree(staging)
