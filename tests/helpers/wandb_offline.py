"""Read back what W&B wrote in offline mode: the records of each `run-<id>.wandb` file of a run folder
(`orchestrator.wandb_file` reads the transaction log)."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.wandb_file import records

__all__ = ["folder_run_id", "history", "offline_runs", "records", "run_ids"]


def offline_runs(run_dir: str | Path) -> list[Path]:
    """Every `run-<id>.wandb` file under a run folder's wandb/ (one per process start)."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def folder_run_id(path: Path) -> str:
    """The run id in the name of a `run-<id>.wandb` file's folder, `offline-run-<YYYYmmdd_HHMMSS>-<id>[-<n>]`:
    W&B appends `-<n>` when the same run id was opened twice within one second (its timestamp's resolution)."""
    mode, run, stamp, run_id, *suffix = path.parent.name.split("-")
    assert (mode, run) == ("offline", "run") and len(suffix) <= 1, path
    return run_id


def run_ids(run_dir: str | Path) -> set[str]:
    ids = set()
    for path in offline_runs(run_dir):
        for record in records(path):
            if record.WhichOneof("record_type") == "run":
                ids.add(record.run.run_id)
    return ids


def history(run_dir: str | Path) -> list[dict]:
    """Logged history rows (key -> decoded JSON value), over every offline run file, in order."""
    rows = []
    for path in offline_runs(run_dir):
        for record in records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
