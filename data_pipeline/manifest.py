"""`manifest.json`: what a prepared-data folder holds (DESIGN.md, "Prepared data").

```
{
  "format": "seqfoundry.shards/1",
  "task": "restore", "fields": ["src", "tgt"], "dtype": "uint16",
  "tokenizer": "tokenizer.json", "tokenizer_sha256": "…", "vocab_size": 8000,
  "specials": {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "first_sentinel": 4, "num_sentinels": 100,
               "mask": 104, "sentence_end_ids": […]},
  "num_samples": 8000, "num_tokens": 612345,
  "splits": {"train": {"num_samples": …, "num_tokens": …, "num_documents": …, "num_shards": …}, "valid": …, "test": …},
  "shards": [{"path": "shards/train-000000.tar", "split": "train", "samples": 2000,
              "tokens": 151234, "bytes": 1234944, "sha256": "…"}, …],
  "source": {…}, "config": {…}, "fingerprint": "…"
}
```
Top-level counts and `shards` cover every split; `splits` breaks them down.
Paths are relative to the folder, so a prepared folder can be moved, or
uploaded to object storage (`s3://…`, `gs://…`) and read from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .storage import as_path, is_remote, local_copy, sha256_file
from .tokenizer import Specials

FORMAT = "seqfoundry.shards/1"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    """Absolute path (or object-storage URL, a `UPath`) of the tar file."""
    split: str
    samples: int
    tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    path: Path
    """The manifest.json file (a local `Path`, or a `UPath` for an object-storage URL)."""
    data: dict

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        """Read `path` (a manifest.json or the prepared folder holding one)."""
        path = as_path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no prepared data at {path} (run `seqfoundry prepare`)") from None
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a seqfoundry manifest (format {data.get('format')!r})")
        return cls(path if is_remote(path) else path.resolve(), data)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def vocab_size(self) -> int:
        return self.data["vocab_size"]

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / self.data["tokenizer"]

    @property
    def fields(self) -> tuple[str, ...]:
        """Token fields of every sample: `("tgt",)` for plain text, `("src", "tgt")` for pairs."""
        return tuple(self.data.get("fields", ("tgt",)))

    @property
    def has_pairs(self) -> bool:
        """The samples are source/target pairs (`data.task=restore` or `pairs`), not plain text."""
        return "src" in self.fields

    @property
    def task(self) -> str | None:
        return self.data.get("task")

    @property
    def splits(self) -> dict[str, dict]:
        """Per-split counts: `{"train": {"num_samples": ..., "num_tokens": ...}, ...}`."""
        return self.data.get("splits", {})

    def split_samples(self, split: str) -> int:
        """Samples in `split` (0 for a split the data does not have)."""
        return int(self.splits.get(split, {}).get("num_samples", 0))

    def nonempty_splits(self) -> list[str]:
        return [name for name in self.splits if self.split_samples(name)]

    @property
    def is_remote(self) -> bool:
        """The prepared data lives in object storage."""
        return is_remote(self.path)

    def local_tokenizer_path(self) -> Path:
        """tokenizer.json as a local file (a verified cached copy when the data is remote)."""
        return local_copy(self.tokenizer_path, sha256=self.data["tokenizer_sha256"])

    @property
    def specials(self) -> Specials:
        return Specials.from_json(self.data["specials"])

    def shards(self, split: str | None = None) -> list[ShardInfo]:
        """Shards of `split` (all splits when None), in manifest order."""
        if split is not None and split not in self.data["splits"]:
            raise ValueError(f"{self.path}: no split {split!r} (has {sorted(self.data['splits'])})")
        return [ShardInfo(self.folder / s["path"], s["split"], s["samples"], s["tokens"], s["bytes"], s["sha256"])
                for s in self.data["shards"] if split is None or s["split"] == split]


def write_manifest(path: Path, data: dict) -> None:
    """Write with a fixed layout (keys in insertion order), so equal data gives equal bytes."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def bad_files(manifest: Manifest) -> list[str]:
    """Files of the manifest whose sha256 differs from the recorded one (or that are missing)."""
    bad = []
    expected = [(manifest.tokenizer_path, manifest.data["tokenizer_sha256"])]
    expected += [(s.path, s.sha256) for s in manifest.shards()]
    for path, digest in expected:
        if not path.is_file() or sha256_file(path) != digest:
            bad.append(str(path))
    return bad
