"""Read back what W&B wrote in offline mode: the records of a `run-<id>.wandb` file.

The file is a LevelDB-style log (a 7-byte ':W&B' header, then 32 KiB blocks of
records with 7-byte headers: crc32, length, type FULL/FIRST/MIDDLE/LAST), each
record a `wandb_internal_pb2.Record` protobuf.  Recent wandb versions no longer
ship a Python reader, so the tests carry this small one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a .wandb file"
    out, chunks, pos = [], [], 7
    while pos + HEADER.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER.size:
            pos += left_in_block
            continue
        _, length, kind = HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:
            break
        payload = data[pos + HEADER.size: pos + HEADER.size + length]
        pos += HEADER.size + length
        chunks.append(payload)
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            out.append(record)
            chunks = []
    return out


def offline_runs(run_dir: str | Path) -> list[Path]:
    """Every `run-<id>.wandb` file under a run folder's wandb/ (one per process start)."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


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
