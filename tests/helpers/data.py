"""Prepared data for tests: the built-in corpus shrunk by experiment=tiny."""

from __future__ import annotations

from pathlib import Path

from data_pipeline import prepare
from orchestrator.config import compose_config, to_typed


def prepare_tiny(folder: Path, *overrides: str) -> Path:
    """`seqfoundry prepare experiment=tiny data.dir=<folder> <overrides>`, in-process and without Ray."""
    job = to_typed(compose_config(["experiment=tiny", f"data.dir={folder}", *overrides]))
    prepare(job.data, progress=False, use_ray=False)
    return folder
