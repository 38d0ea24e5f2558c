"""A run folder (`run.dir`) that may live in object storage.

A local `run.dir` is used as it is.  An `s3://` or `gs://` one is worked on
through a local mirror (`data_pipeline.storage.mirror_dir`, the same path on
every node): files are written there as usual (`metrics.jsonl` is appended
line by line, W&B writes its folder) and `push` uploads them, since object
stores have no append.  Rank 0 pushes its files at every checkpoint, the
driver pushes its own (`config.yaml`, `run.json`, `model/`); a resume on any
machine `pull`s them back first.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.storage import as_path, download_file, download_tree, is_remote, mirror_dir, upload, url


@dataclass(frozen=True)
class RunFolder:
    location: str
    """An absolute local path or an object-storage URL."""

    @classmethod
    def of(cls, run_dir: str | Path) -> "RunFolder":
        return cls(url(run_dir))

    @property
    def remote(self) -> bool:
        return is_remote(self.location)

    @property
    def local(self) -> Path:
        """Where this process reads and writes the run's files."""
        return mirror_dir(self.location) if self.remote else Path(self.location)

    def where(self, name: str) -> str:
        """The user-facing location of an entry (a URL for a remote run)."""
        return f"{self.location.rstrip('/')}/{name}"

    def push(self, *names: str) -> None:
        """Upload these entries (files or folders) of the mirror; a no-op for a local run folder."""
        if self.remote:
            present = [n for n in names if (self.local / n).exists()]
            if present:
                upload(self.local, self.location, names=present)

    def push_all(self, *, last: tuple[str, ...] = ()) -> None:
        """Upload the whole mirror (a finished model package), its files `last` after all others (what marks
        it complete); a no-op for a local folder."""
        if self.remote:
            upload(self.local, self.location, last=last)

    def pull(self, *names: str) -> None:
        """Replace these entries of the mirror by the remote ones (those that exist remotely)."""
        if not self.remote:
            return
        for name in names:
            src, dest = as_path(self.location) / name, self.local / name
            if src.is_file():
                download_file(src, dest)
            elif src.is_dir():
                shutil.rmtree(dest, ignore_errors=True)
                download_tree(src, dest)
