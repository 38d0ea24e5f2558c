"""Text sources → de-duplicated documents of records, split by document.

A *document* is the unit of the train/valid/test split: one module of the
built-in corpus, one text file, or one JSONL line (or all lines sharing a
`doc` value). Its id, which the split hashes, never holds where the corpus
lies: a module path for the built-in corpus, and for files the path relative
to the *source root*, the deepest folder that holds every source file (so
`/a/corpus/x.jsonl` line 3 is `x.jsonl:3`, and a copy of the corpus in
another folder, or on another machine, prepares to the same bytes). A *record* is one future sample: a clean text (`tgt`) and, for
supervised tasks, a source text (`src`).

Tasks (`data.task`):
- `text`: records hold the clean text only (for BART/T5 pretraining).
- `restore`: punctuation and casing restoration, derived from monolingual
  text: `src` is the text lower-cased with punctuation removed, `tgt` the
  original. The clean text doubles as pretraining data.
- `pairs`: `src`/`tgt` read from JSONL files (`{"src": ..., "tgt": ...}`).
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import math
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

TASKS = ("text", "restore", "pairs")
SPLITS = ("train", "valid", "test")
# Folders of the standard library that hold test data, generated code or GUI demos, not prose.
STDLIB_SKIP = {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages",
               "turtledemo", "__pycache__", "ensurepip", "encodings", "_vendor"}
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(`])")


@dataclass(frozen=True)
class Record:
    tgt: str
    """The clean text (the target of every task)."""
    src: str | None = None
    """The source text of a supervised pair; None for `text`."""


@dataclass
class Document:
    id: str
    """Stable name: module path, file path relative to the source root, or JSONL `file:line`/`file:doc`."""
    records: list[Record]


@dataclass(frozen=True)
class TextLimits:
    """Which paragraphs of monolingual text become records."""

    min_words: int = 6
    """Shorter paragraphs are dropped (headings, fragments)."""
    max_words: int = 120
    """Longer paragraphs are cut at sentence ends into pieces of at most this many words."""


# --- monolingual text → paragraphs ------------------------------------------------


def paragraphs(text: str, limits: TextLimits) -> list[str]:
    """Prose paragraphs of `text` (blank-line separated), whitespace-normalized."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        if _is_code(block):
            continue
        para = " ".join(block.split())
        if _is_prose(para, limits.min_words):
            out.extend(_cut(para, limits.max_words))
    return out


def _is_code(block: str) -> bool:
    if block.strip() and block.lstrip("\n")[0].isspace():
        return True  # an indented block: a code sample, grammar rule or listing
    return any(line.lstrip().startswith((">>>", "...", "$ ", "def ", "class ")) for line in block.splitlines())


def _is_prose(para: str, min_words: int) -> bool:
    chars = [c for c in para if not c.isspace()]
    if len(para.split()) < min_words or not para[0].isupper():
        return False
    return sum(c.isalpha() for c in chars) >= 0.75 * len(chars)


def _cut(para: str, max_words: int) -> list[str]:
    pieces, words = [], 0
    for sentence in _SENTENCE_SPLIT.split(para):
        n = len(sentence.split())
        if pieces and words + n <= max_words:
            pieces[-1] += " " + sentence
            words += n
        else:
            pieces.append(sentence)
            words = n
    return [" ".join(p.split()[:max_words]) for p in pieces]


def restore_source(text: str) -> str:
    """The `restore` task's source: lower-cased, apostrophes deleted, other punctuation → spaces."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def to_records(texts: Iterable[str], task: str) -> list[Record]:
    if task == "restore":
        return [Record(tgt=t, src=restore_source(t)) for t in texts]
    return [Record(tgt=t) for t in texts]


# --- the built-in corpus: docstrings of the Python standard library ------------------


def builtin_corpus_name() -> str:
    return "python-stdlib-docs-" + ".".join(map(str, sys.version_info[:3]))


def builtin_candidates() -> list[tuple[str, Callable[[], list[str]]]]:
    """(document id, loader of its raw texts) for every built-in document, in a fixed hash order.

    The documents are the Language Reference topics that ship with pydoc
    (`pydoc_data.topics`) and the docstrings of each public stdlib module.
    """
    candidates: list[tuple[str, Callable[[], list[str]]]] = [
        (f"pydoc_data/topics/{name}", lambda text=text: [text]) for name, text in _pydoc_topics().items()]
    candidates += [(module, lambda path=path: docstrings(path.read_text(encoding="utf-8", errors="replace")))
                   for module, path in stdlib_files()]
    # A hash order, so that `max_documents` takes a spread of documents, not the alphabet's start.
    return sorted(candidates, key=lambda item: hashlib.sha256(item[0].encode()).hexdigest())


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return {}
    return dict(topics)


def stdlib_files() -> list[tuple[str, Path]]:
    """(module path, file) of every public standard-library module, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP and not d.startswith((".", "_")))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("_"):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def docstrings(source: str) -> list[str]:
    """Docstrings of a module, its classes and functions, in `ast.walk` order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, kinds)
            if (doc := ast.get_docstring(node, clean=True))]


def builtin_documents(task: str, limits: TextLimits, max_documents: int = 0) -> Iterator[Document]:
    """Documents of the built-in corpus that hold prose (at most `max_documents`; 0 = all)."""
    count = 0
    for doc_id, load in builtin_candidates():
        texts = [p for raw in load() for p in paragraphs(raw, limits)]
        if texts:
            yield Document(doc_id, to_records(texts, task))
            count += 1
            if count == max_documents:
                return


# --- user files ----------------------------------------------------------------------


def expand_sources(sources: list[str]) -> list[Path]:
    """Files named by `sources` (paths or globs), in the given order, globs sorted."""
    files: list[Path] = []
    for pattern in sources:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ValueError(f"data.sources: no file matches {pattern!r}")
        files.extend(Path(m) for m in matches)
    return files


def source_names(files: list[Path]) -> list[str]:
    """Each file's path relative to the source root (the deepest folder holding them all), POSIX style.

    Unique for distinct files, and the same wherever the folder tree that holds
    the corpus is copied: the document ids, hence the split, depend on it.
    """
    if not files:
        return []
    absolute = [Path(os.path.abspath(f)) for f in files]
    root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    return [p.relative_to(root).as_posix() for p in absolute]


def file_documents(files: list[Path], task: str, limits: TextLimits) -> Iterator[Document]:
    """Documents of text files (one per file) or JSONL pair files (one per line or `doc`)."""
    for path, name in zip(files, source_names(files)):
        if task == "pairs":
            yield from jsonl_documents(path, name)
            continue
        texts = paragraphs(path.read_text(encoding="utf-8", errors="replace"), limits)
        if texts:
            yield Document(name, to_records(texts, task))


def jsonl_documents(path: Path, name: str | None = None) -> Iterator[Document]:
    """One document a line, or a line group sharing a `doc` value; ids `<name>:<line>` / `<name>:<doc>`
    (`name` defaults to the file's name)."""
    name = path.name if name is None else name
    docs: dict[str, Document] = {}  # insertion-ordered: first appearance of each document
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = _pair_row(line, path, lineno)
            doc_id = f"{name}:{row['doc']}" if "doc" in row else f"{name}:{lineno}"
            docs.setdefault(doc_id, Document(doc_id, [])).records.append(
                Record(tgt=" ".join(str(row["tgt"]).split()), src=" ".join(str(row["src"]).split())))
    yield from docs.values()


def _pair_row(line: str, path: Path, lineno: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"data.sources: {path}:{lineno} is not JSON ({err.msg})") from None
    if not isinstance(row, dict) or "src" not in row or "tgt" not in row:
        raise ValueError(f"data.sources: {path}:{lineno} needs 'src' and 'tgt' fields")
    return row


# --- de-duplication and splits ----------------------------------------------------------


def deduplicate(docs: Iterable[Document]) -> list[Document]:
    """Drop records seen before (whitespace- and case-insensitive); drop emptied documents."""
    seen: set[bytes] = set()
    out = []
    for doc in docs:
        kept = []
        for rec in doc.records:
            norm = " ".join(f"{rec.src or ''}\x00{rec.tgt}".split()).casefold()
            digest = hashlib.sha1(norm.encode()).digest()
            if digest not in seen and rec.tgt.strip() and (rec.src is None or rec.src.strip()):
                seen.add(digest)
                kept.append(rec)
        if kept:
            out.append(Document(doc.id, kept))
    return out


def split_documents(docs: list[Document], valid_fraction: float, test_fraction: float) -> dict[str, list[Document]]:
    """Assign whole documents to splits: the first by hash of id go to valid, then test.

    At least one document goes to a split whose fraction is > 0; documents keep
    their corpus order inside each split.
    """
    n = len(docs)
    n_valid = math.ceil(n * valid_fraction) if valid_fraction > 0 else 0
    n_test = math.ceil(n * test_fraction) if test_fraction > 0 else 0
    if n - n_valid - n_test < 1:
        raise ValueError(f"data.valid_fraction/test_fraction: {n} document(s) cannot fill train, valid "
                         f"({n_valid}) and test ({n_test}); add sources or lower the fractions")
    ranked = sorted(range(n), key=lambda i: hashlib.sha256(docs[i].id.encode()).hexdigest())
    split_of = {i: "valid" for i in ranked[:n_valid]}
    split_of.update({i: "test" for i in ranked[n_valid:n_valid + n_test]})
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for i, doc in enumerate(docs):
        out[split_of.get(i, "train")].append(doc)
    return out

