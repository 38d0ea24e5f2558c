"""Local folders and object-storage URLs behind one path type.

`data.dir`, `run.dir`, `cluster.storage_path` and model packages may be
`s3://bucket/key` or `gs://bucket/key` URLs as well as local paths.  URLs
become `upath.UPath` objects (universal_pathlib over fsspec: `s3fs`,
`gcsfs`), which answer the same `pathlib` calls as a local `Path`
(`/`, `open`, `read_text`, `is_file`, `stat`, `iterdir`, `glob`), so the
code that reads manifests and shards does not branch on where they live.

Credentials and endpoints come the usual way: AWS's environment variables,
config files or instance profile (`AWS_ENDPOINT_URL` points at an
S3-compatible store such as MinIO), Google's application-default
credentials.  What must be a local file (a tokenizer for HF `tokenizers`, a
checkpoint for DeepSpeed, a W&B folder) is copied into a local cache,
`$SEQFOUNDRY_CACHE` (default `~/.cache/seqfoundry`), by `local_copy`;
a remote run folder is worked on in a local mirror (`mirror_dir`) that
`upload` copies back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterable

LOCAL_SCHEMES = ("", "file", "local")


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL of a remote filesystem (`s3://`, `gs://`, `memory://`, ...)."""
    text = str(path)
    scheme = text.split("://", 1)[0] if "://" in text else ""
    return scheme not in LOCAL_SCHEMES


def as_path(path: str | os.PathLike) -> Path:
    """A local `Path` (user folder expanded), or a `UPath` for a remote URL."""
    if isinstance(path, Path) and not is_remote(path):
        return path
    text = str(path)
    if not is_remote(text):
        return Path(text.split("://", 1)[1] if "://" in text else text).expanduser()
    try:
        from upath import UPath

        # Listings are not cached: checkpoints, run files and shards change while a process runs.
        remote = UPath(text, use_listings_cache=False)
        remote.fs  # noqa: B018  (the filesystem is made lazily: fail here, not in the middle of a job)
        return remote
    except ImportError as err:  # universal_pathlib or the scheme's fsspec backend (s3fs, gcsfs) is missing
        raise ValueError(f"{text}: {err} (pip install 'seqfoundry[cloud]')") from None
    except ValueError as err:  # an unknown scheme
        raise ValueError(f"{text}: {' '.join(str(err).split())}") from None


def check_writable(path: str | os.PathLike) -> None:
    """Write and delete a small object under `path`: a missing bucket or missing rights fail now (OSError),
    before hours of work that would end in an upload."""
    probe = as_path(path) / ".seqfoundry-write-test"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except Exception as err:  # s3fs/gcsfs map most errors to OSError, but credential errors are their own
        if isinstance(err, OSError):
            raise OSError(f"cannot write to {path}: {err.strerror or err}") from None
        raise OSError(f"cannot write to {path}: {type(err).__name__}: {err}") from None


def url(path: str | os.PathLike) -> str:
    """The canonical string of a path: `s3://bucket/key` for remote ones, an absolute path for local ones."""
    p = as_path(path)
    return str(p) if is_remote(p) else str(p.resolve())


def cache_root() -> Path:
    return Path(os.environ.get("SEQFOUNDRY_CACHE", "~/.cache/seqfoundry")).expanduser()


def _key(remote: str) -> str:
    """A readable, collision-free folder name for a URL."""
    text = str(remote).rstrip("/")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{text.split('://', 1)[1].replace('/', '_')[-80:]}-{digest}"


def mirror_dir(remote: str | os.PathLike) -> Path:
    """The local working folder of a remote folder (the same on every node of a cluster)."""
    return cache_root() / "mirror" / _key(str(remote))


def local_copy(path: str | os.PathLike, *, sha256: str | None = None) -> Path:
    """`path` itself when it is local; else a cached local copy of the remote file or folder.

    A file is downloaded again unless its cached copy has `sha256` (when given);
    a folder is downloaded whole each time it is asked for (packages are small).
    """
    if not is_remote(path):
        return as_path(path)
    src = as_path(path)
    dest = cache_root() / "objects" / _key(str(src)) / src.name
    if src.is_file():
        if not (sha256 and dest.is_file() and sha256_file(dest) == sha256):
            download_file(src, dest)
        return dest
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such file or folder")
    shutil.rmtree(dest, ignore_errors=True)
    download_tree(src, dest)
    return dest


def download_tree(src: Path, dest: Path) -> None:
    """Copy every file under the remote folder `src` into the local folder `dest`."""
    for item in src.rglob("*"):
        if item.is_file():
            download_file(item, dest / item.relative_to(src).as_posix())


def download_file(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    with src.open("rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)
    os.replace(tmp, dest)  # a reader never sees half a file


def upload(local: Path, dest: str | os.PathLike, *, names: Iterable[str] | None = None,
           last: Iterable[str] = ()) -> None:
    """Copy the local file or folder `local` to `dest`; a folder's files `last` are copied after all others.

    `names` limits a folder's upload to those entries (files or sub-folders).
    Object stores have no rename, so readers are protected by order instead:
    whatever marks a folder complete (a manifest) goes last.
    """
    target = as_path(dest)
    if local.is_file():
        _upload_file(local, target)
        return
    entries = [local / n for n in names] if names is not None else sorted(local.iterdir())
    files = [f for e in entries if e.exists() for f in ([e] if e.is_file() else sorted(e.rglob("*")))
             if f.is_file()]
    last = set(last)
    for f in sorted(files, key=lambda f: f.name in last):
        _upload_file(f, target / f.relative_to(local).as_posix())


def _upload_file(src: Path, dest: Path) -> None:
    if not is_remote(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, dest.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)


def remove_tree(path: Path) -> None:
    """Delete a local or remote folder (no error when it is absent)."""
    if is_remote(path):
        if path.exists():
            path.fs.rm(path.path, recursive=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
