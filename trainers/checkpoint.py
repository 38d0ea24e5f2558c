"""Checkpointable training state, saved and restored together (STYLE.md #6).

A checkpoint is a DeepSpeed checkpoint (model, optimizer, scheduler, ZeRO
partitions; one tag per step) whose `client_state` holds a `TrainState`:
the step, this rank's data cursor and RNG states, the W&B run id and the
config hash.  Every rank saves into its own local folder; Ray Train merges
them into one checkpoint folder in the run's storage.
"""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
import numpy as np
import torch

TAG_FORMAT = "step_{:08d}"
TAG_PREFIX = "step_"


def step_of(tag: str) -> int:
    """The optimizer step of a checkpoint tag or folder name (`step_00000100` -> 100)."""
    if not tag.startswith(TAG_PREFIX) or not tag[len(TAG_PREFIX):].isdigit():
        raise ValueError(f"{tag!r} is not a checkpoint tag (step_NNNNNNNN)")
    return int(tag[len(TAG_PREFIX):])


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken."""
    data: dict = field(default_factory=dict)
    """This rank's data-pipeline state (global cursor, epoch)."""
    rng: dict = field(default_factory=dict)
    """Python, NumPy and torch RNG states of this rank."""
    wandb_run_id: str = ""
    """The one W&B run this training run logs to, across restarts."""
    config_sha256: str = ""
    """Hash of the job config that produced the checkpoint."""
    world_size: int = 1
    """Workers that saved it (a resume may use another number)."""
    tokens_seen: int = 0
    """Target tokens trained on so far, summed over ranks."""


def capture_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save(engine, folder: str | Path, state: TrainState, *, rank: int) -> str:
    """DeepSpeed `save_checkpoint` into `folder` plus this rank's TrainState file.

    Collective: every rank calls it.  DeepSpeed keeps `client_state` from rank
    0 only, so each rank writes its own `train_state_rank{r}.pt` (RNG and data
    cursor differ per rank) next to the DeepSpeed files.
    """
    tag = TAG_FORMAT.format(state.step)
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": state.step})
    torch.save(asdict(state), Path(folder) / tag / f"train_state_rank{rank}.pt")
    return tag


def load(engine, folder: str | Path, *, rank: int, universal: Path | None = None) -> tuple[TrainState, list[dict]]:
    """Restore the engine from a checkpoint folder (collective) and read the TrainStates.

    Returns this rank's TrainState (rank 0's when this rank did not exist at
    save time) and the data states of every saved rank, for the data pipeline
    to continue from the global cursor on any world size.  RNG states are
    restored only when the world size is unchanged.  `universal` is the
    folder of a universal-format copy (`to_universal`), loaded instead when
    the ZeRO partitioning changed (the engine was built with load_universal).
    """
    tag = latest_tag(folder)
    if tag is None:
        raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint ('latest' file missing)")
    path, _ = engine.load_checkpoint(str(universal or folder), tag=tag, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{Path(folder) / tag}: DeepSpeed could not load this checkpoint")
    states = [TrainState(**torch.load(f, weights_only=False)) for f in state_files(folder, tag)]
    mine = states[rank] if rank < len(states) else states[0]
    if len(states) == engine.world_size:
        restore_rng(mine.rng)
    return mine, [s.data for s in states]


def state_files(folder: str | Path, tag: str) -> list[Path]:
    files = sorted(Path(folder, tag).glob("train_state_rank*.pt"), key=lambda p: int(p.stem[16:]))
    if not files:
        raise FileNotFoundError(f"{Path(folder) / tag}: no train_state_rank*.pt files")
    return files


def saved_world_size(folder: str | Path) -> int:
    """How many ranks saved the checkpoint in `folder`."""
    tag = latest_tag(folder)
    return len(state_files(folder, tag)) if tag else 0


def to_universal(folder: str | Path, out: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (re-partitionable on any world size)."""
    tag = latest_tag(folder)
    if (out / f"latest_universal").is_file():
        return out
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(Path(folder) / tag), "--output_folder", str(out / tag), "--inject_missing_state",
                    "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   check=True, stdout=subprocess.DEVNULL)
    (out / "latest").write_text(tag)
    return out


def latest_tag(folder: str | Path) -> str | None:
    latest = Path(folder) / "latest"
    return latest.read_text().strip() if latest.is_file() else None
