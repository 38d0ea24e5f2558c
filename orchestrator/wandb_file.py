"""Read a W&B run's transaction log, the `run-<id>.wandb` file an offline run writes (and `wandb sync` uploads).

The file is a LevelDB-style log: a 7-byte ':W&B' header, then 32 KiB blocks of records with 7-byte headers
(crc32, length, type FULL/FIRST/MIDDLE/LAST), each record a `wandb_internal_pb2.Record` protobuf. Recent
wandb versions no longer ship a Python reader, so seqfoundry carries this small one: `finish_run` waits on it
(`run.finish()` returns before W&B's service has written the run's last records), and the tests read back
what was logged with it.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768
HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(data: bytes) -> list[bytes]:
    """The serialized records of a transaction log's bytes, in order; a torn tail is left out."""
    out, chunks, pos = [], [], 7
    while pos + HEADER.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER.size:
            pos += left_in_block
            continue
        _, length, kind = HEADER.unpack_from(data, pos)
        if (kind == 0 and length == 0) or pos + HEADER.size + length > len(data):
            break
        chunks.append(data[pos + HEADER.size: pos + HEADER.size + length])
        pos += HEADER.size + length
        if kind in (FULL, LAST):
            out.append(b"".join(chunks))
            chunks = []
    return out


def records(path: str | Path) -> list:
    """Every whole record of a `.wandb` file, as `wandb_internal_pb2.Record`s."""
    return [_record(payload) for payload in payloads(_log_bytes(path))]


def ended(path: str | Path) -> bool:
    """Whether the file holds the run's exit record: W&B wrote everything the run logged before it."""
    try:
        data = _log_bytes(path)
    except (FileNotFoundError, ValueError):  # not created yet, or its header not written yet
        return False
    return any(_record(payload).WhichOneof("record_type") == "exit" for payload in reversed(payloads(data)))


def _log_bytes(path: str | Path) -> bytes:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log (.wandb file)")
    return data


def _record(payload: bytes):
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    record.ParseFromString(payload)
    return record
