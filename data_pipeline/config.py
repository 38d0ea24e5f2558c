"""The data slices of the job configuration: `data` (prepare, stream, batch) and `objective`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .order import REMAINDER_RULES
from .sources import TASKS
from .tokenizer import NAMED_SPECIALS, TOKENIZER_TYPES

OVERLONG_POLICIES = ("truncate", "drop")
FORMATS = ("auto", "text", "lines", "jsonl", "tsv", "parquet", "parallel", "hf")
VERIFY_MODES = ("sha256", "size")
OBJECTIVES = ("bart", "t5", "pairs")
BYTE_ALPHABET = 256


@dataclass
class BatchConfig:
    max_tokens: int = 4096
    """Token budget of a batch: batch size x padded length of its longest source or target."""
    max_source_len: int = 512
    """Longest source, eos included; longer ones are truncated or dropped (`overlong`)."""
    max_target_len: int = 512
    """Longest target, bos/eos included; longer ones are truncated or dropped (`overlong`)."""
    overlong: str = "truncate"
    """What happens to a sample over the length limits: `truncate` or `drop` (both are counted)."""
    pad_multiple: int = 8
    """Pad batch lengths up to a multiple of this (tensor-core friendly shapes)."""
    pool_size: int = 1000
    """Length bucketing: samples sorted by length together before they are cut into batches."""
    max_sentences: int = 0
    """Most samples in one batch; 0 = only the token budget limits it."""

    def __post_init__(self) -> None:
        for key in ("max_tokens", "max_source_len", "max_target_len", "pad_multiple", "pool_size"):
            _check(getattr(self, key) >= 1, f"batch.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.max_sentences >= 0, "batch.max_sentences", f"must be >= 0, got {self.max_sentences}")
        _check(self.overlong in OVERLONG_POLICIES, "batch.overlong",
               f"must be one of {OVERLONG_POLICIES}, got {self.overlong!r}")
        longest = _round_up(max(self.max_source_len, self.max_target_len), self.pad_multiple)
        _check(self.max_tokens >= longest, "batch.max_tokens",
               f"must hold one sample of the longest allowed length ({longest} padded tokens), got {self.max_tokens}")


@dataclass
class FieldsConfig:
    """Which fields of a JSONL object, a parquet row or an HF dataset row hold the text."""

    src: str = "src"
    """The source text of a pair (`data.task=pairs`)."""
    tgt: str = "tgt"
    """The target text of a pair (`data.task=pairs`)."""
    text: str = "text"
    """Monolingual text (`data.task=text` or `restore`); when a row lacks it, `tgt` is used."""
    doc: str = "doc"
    """Optional document id: rows sharing it form one document of the split (else `data.doc_lines` rows)."""


@dataclass
class DataConfig:
    # --- what to prepare -----------------------------------------------------
    dir: str = "data/builtin"
    """Prepared-data folder: tokenizer.json, shards/*.tar and manifest.json."""
    sources: list[str] = field(default_factory=list)
    """Files, globs, folders or `s3://`/`gs://` URLs (of any of those) to prepare; empty = the built-in corpus."""
    format: str = "auto"
    """How to read the sources: `auto` (by extension), `text` (blank-line paragraphs, a file is a document),
    `lines` (a sample a line), `jsonl`, `tsv` (source and target columns), `parquet`, `parallel` (line-aligned
    `sources` and `target_sources`) or `hf` (a folder saved by HF `datasets`, `pip install 'seqfoundry[datasets]'`)."""
    target_sources: list[str] = field(default_factory=list)
    """`format=parallel`: the target-side files, line-aligned with `sources` file by file."""
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    """Field names of JSONL, parquet and HF dataset rows."""
    doc_lines: int = 50
    """Line-based formats: this many consecutive lines (rows) form one document, the unit of the split,
    unless rows carry a `fields.doc` value. `text`: a file is a document."""
    task: str = "restore"
    """Samples: `text` (clean text), `restore` (+ source without punctuation/casing) or `pairs` (JSONL src/tgt)."""
    max_documents: int = 0
    """Read at most this many documents, the first in corpus order (built-in modules, `text` files, line groups
    or `fields.doc` values); 0 = all."""
    min_words: int = 6
    """Filter `min_words`: monolingual samples shorter than this are dropped (words, or characters for scripts
    written without spaces: Chinese, Japanese, Thai, ...)."""
    max_words: int = 120
    """Longer monolingual samples are cut at sentence ends into pieces of at most this many words (characters)."""
    min_alpha: float = 0.75
    """Filter `min_alpha`: monolingual samples whose share of letters (any script) among non-space characters
    is below this are dropped (tables, numbers, markup); 0 keeps all."""
    drop_code: bool = True
    """Filter `drop_code`: drop indented blocks and lines that look like code (`>>>`, `$ `, `def `, `class `)."""
    dedup: bool = True
    """Filter `dedup`: drop exact duplicates across the whole corpus (case and whitespace ignored), the first
    occurrence in corpus order kept."""
    sample_tokens: int = 0
    """Text pretraining (`task=text`): join each document's paragraphs and cut its token stream into samples
    of about this many tokens (at most this many; more than half of it except a document's last), at
    sentence ends when one falls in that window, so that batches stay full; 0 = one sample per paragraph."""
    valid_fraction: float = 0.05
    """Share of documents held out for validation (at least one when > 0)."""
    test_fraction: float = 0.05
    """Share of documents held out for testing (at least one when > 0)."""

    # --- tokenizer -----------------------------------------------------------
    tokenizer: str = ""
    """Use this tokenizer instead of training one: an HF tokenizer.json or a sentencepiece .model (path or URL;
    `pip install 'seqfoundry[sentencepiece]'`); re-indexed onto the reserved ids, the mapping in the manifest."""
    tokenizer_sample_bytes: int = 100_000_000
    """Training a tokenizer reads at most about this many bytes of train-split text: the samples with the
    smallest content hashes (a deterministic sample of the whole corpus)."""
    tokenizer_type: str = "bpe"
    """Tokenizer to train: `bpe` (byte-level BPE) or `unigram`."""
    vocab_size: int = 8000
    """Vocabulary size of the trained tokenizer, specials included (= model.vocab_size)."""
    num_sentinels: int = 100
    """T5 sentinel tokens <extra_id_i>, ids 4 … 4+n-1 (the BART <mask> follows them)."""

    # --- shards --------------------------------------------------------------
    shard_samples: int = 2000
    """Samples per WebDataset shard."""
    overwrite: bool = False
    """Allow replacing a different dataset already in `dir`."""
    prepare_tasks: int = 0
    """Ray tasks in flight per prepare stage (read, de-duplicate, tokenize, write); 0 = two per cluster CPU.
    The output does not depend on it."""
    part_bytes: int = 64 << 20
    """Plain (uncompressed) `lines` and `tsv` files larger than this are read as parts of about this size,
    a task each, cut after a multiple of `doc_lines` lines (not with `max_documents`); 0 = a task a file.
    The output does not depend on it."""

    # --- streaming -----------------------------------------------------------
    split: str = "train"
    """Split the trainer streams: `train`, `valid` or `test`."""
    shuffle: bool = True
    """Shuffle shard order and sample order every epoch, from (seed, epoch)."""
    remainder: str = "repeat"
    """Equal samples per rank: `repeat` the first samples of the epoch or `drop` the last ones."""
    verify: str = "sha256"
    """Check shards before streaming: `sha256` (every byte) or `size` (file sizes only)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = read in the training process)."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """Token-budget batching and collation."""

    def __post_init__(self) -> None:
        self._check_prepare()
        self._check_tokenizer()
        _check(self.split in ("train", "valid", "test"), "split",
               f"must be 'train', 'valid' or 'test', got {self.split!r}")
        _check(self.remainder in REMAINDER_RULES, "remainder",
               f"must be one of {REMAINDER_RULES}, got {self.remainder!r}")
        _check(self.verify in VERIFY_MODES, "verify", f"must be one of {VERIFY_MODES}, got {self.verify!r}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")

    def _check_prepare(self) -> None:
        _check(bool(self.dir), "dir", "must name a folder")
        _check(self.task in TASKS, "task", f"must be one of {TASKS}, got {self.task!r}")
        self._check_format()
        for key in ("max_documents", "prepare_tasks", "part_bytes"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _check(0.0 <= self.min_alpha <= 1.0, "min_alpha", f"must be in [0, 1], got {self.min_alpha}")
        for key in ("min_words", "max_words", "shard_samples", "doc_lines", "tokenizer_sample_bytes"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.sample_tokens >= 0, "sample_tokens", f"must be >= 0, got {self.sample_tokens}")
        if self.sample_tokens:
            _check(self.task == "text", "sample_tokens",
                   f"cuts monolingual text for pretraining: needs data.task=text, got {self.task!r}")
            longest = min(self.batch.max_source_len, self.batch.max_target_len) - 1
            _check(self.sample_tokens <= longest, "sample_tokens",
                   f"must fit the batch length limits (<= min(batch.max_source_len, batch.max_target_len) - 1"
                   f" = {longest}), got {self.sample_tokens}")
        for key in ("valid_fraction", "test_fraction"):
            _check(0.0 <= getattr(self, key) < 1.0, key, f"must be in [0, 1), got {getattr(self, key)}")
        _check(self.valid_fraction + self.test_fraction < 1.0, "valid_fraction",
               "valid_fraction + test_fraction must leave documents for training")

    def _check_format(self) -> None:
        _check(self.format in FORMATS, "format", f"must be one of {FORMATS}, got {self.format!r}")
        if self.task == "pairs":
            _check(bool(self.sources), "sources", "task 'pairs' needs sources with source and target texts "
                   "(JSONL/parquet src and tgt fields, TSV columns or parallel files)")
            _check(self.format not in ("text", "lines"), "format",
                   f"{self.format!r} holds no source/target pairs: task 'pairs' needs jsonl, tsv, parquet, "
                   "parallel or hf")
        parallel = self.format == "parallel" or (self.format == "auto" and bool(self.target_sources))
        if parallel:
            _check(bool(self.target_sources), "target_sources", "format 'parallel' needs target files")
            _check(len(self.target_sources) == len(self.sources), "target_sources",
                   f"needs one entry per data.sources entry ({len(self.sources)}), got {len(self.target_sources)}")
        else:
            _check(not self.target_sources, "target_sources", f"only format 'parallel' reads target files, "
                   f"got data.format={self.format!r}")

    def _check_tokenizer(self) -> None:
        _check(self.tokenizer_type in TOKENIZER_TYPES, "tokenizer_type",
               f"must be one of {TOKENIZER_TYPES}, got {self.tokenizer_type!r}")
        _check(self.num_sentinels >= 0, "num_sentinels", f"must be >= 0, got {self.num_sentinels}")
        reserved = len(NAMED_SPECIALS) + self.num_sentinels + 1
        least = reserved + (BYTE_ALPHABET if self.tokenizer_type == "bpe" else 1)
        _check(self.vocab_size >= least, "vocab_size",
               f"must be >= {least} ({reserved} reserved tokens"
               + (" + 256 bytes" if self.tokenizer_type == "bpe" else "") + f"), got {self.vocab_size}")
        _check(self.vocab_size <= 2**32, "vocab_size", f"must be < 2**32, got {self.vocab_size}")


@dataclass
class ObjectiveConfig:
    name: str = "bart"
    """Training objective: `bart` (text infilling), `t5` (span corruption) or `pairs` (src/tgt as stored)."""
    mask_ratio: float = 0.3
    """BART: share of tokens masked."""
    poisson_lambda: float = 3.5
    """BART: mean of the Poisson span lengths (a 0-length span inserts a <mask>)."""
    permute_sentences: bool = False
    """BART: shuffle the sentences of the source before infilling."""
    clean_ratio: float = 0.1
    """BART: share of samples passed through with no noise (source = target), so the model also learns
    that text needing no repair is copied as it is. Without any, a model never shown an input without
    masks inserts and repeats words when it is given clean text."""
    noise_density: float = 0.15
    """T5: share of tokens in corrupted spans."""
    mean_span_length: float = 3.0
    """T5: mean length of a corrupted span."""

    def __post_init__(self) -> None:
        _check(self.name in OBJECTIVES, "name", f"must be one of {OBJECTIVES}, got {self.name!r}", "objective")
        _check(0.0 <= self.mask_ratio < 1.0, "mask_ratio", f"must be in [0, 1), got {self.mask_ratio}", "objective")
        _check(0.0 <= self.clean_ratio < 1.0, "clean_ratio", f"must be in [0, 1), got {self.clean_ratio}", "objective")
        _check(self.poisson_lambda > 0, "poisson_lambda", f"must be > 0, got {self.poisson_lambda}", "objective")
        _check(0.0 < self.noise_density < 1.0, "noise_density",
               f"must be in (0, 1), got {self.noise_density}", "objective")
        _check(self.mean_span_length >= 1.0, "mean_span_length",
               f"must be >= 1, got {self.mean_span_length}", "objective")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check(ok: bool, key: str, message: str, slice_name: str = "data") -> None:
    if not ok:
        raise ValueError(f"{slice_name}.{key}: {message}")
