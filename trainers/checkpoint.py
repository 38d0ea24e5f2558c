"""Checkpointable training state, saved and restored together (STYLE.md #6).

A checkpoint is a DeepSpeed checkpoint (model, optimizer, scheduler, ZeRO
partitions; one tag per step) plus one `train_state_rank{r}.json` a rank: the
step, this rank's data cursor and RNG states, the W&B run id and the config
hash.  Every rank saves into its own local folder; Ray Train merges them into
one checkpoint folder in the run's storage.

Trust. A checkpoint may come from a bucket others can write, so loading it
must not run code: the train state is JSON (RNG states as numbers and base64
bytes), and every `torch.load` of DeepSpeed's own files runs with
`weights_only=True` and only the few DeepSpeed classes its optimizer states
pickle allow-listed (`weights_only_loads`; DeepSpeed 0.19 itself passes
`weights_only=False`).  See docs/storage.md, "Trust boundary".
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

TAG_FORMAT = "step_{:08d}"
STATE_STEM = "train_state_rank"
_SAFE_UNIVERSAL = ("from deepspeed.checkpoint import ds_to_universal as c\n"
                   "from trainers.checkpoint import weights_only_loads\n"
                   "with weights_only_loads(): c.main(c.parse_arguments())")
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
    best_value: float | None = None
    """Best validation value of `trainer.best_metric` so far (None before the first validation)."""
    best_step: int = 0
    """The step that reached `best_value`."""
    since_best: int = 0
    """Validations since the last improvement (`trainer.patience`)."""
    stopped_early: bool = False
    """`trainer.patience` ran out: the run is finished before max_steps."""


def capture_rng() -> dict:
    """Python, NumPy and torch RNG states as JSON values (lists of numbers, base64 bytes)."""
    version, mt, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss_next],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": _b64(torch.get_rng_state()),
            "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def restore_rng(states: dict) -> None:
    version, mt, gauss_next = states["python"]
    random.setstate((version, tuple(mt), gauss_next))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(states["torch"]))
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in states["cuda"]])


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _bytes_tensor(state: str | torch.Tensor) -> torch.Tensor:
    if isinstance(state, torch.Tensor):  # a legacy .pt train state
        return state
    return torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save(engine, folder: str | Path, state: TrainState, *, rank: int) -> str:
    """DeepSpeed `save_checkpoint` into `folder` plus this rank's TrainState file.

    Collective: every rank calls it.  DeepSpeed keeps `client_state` from rank
    0 only, so each rank writes its own `train_state_rank{r}.json` (RNG and
    data cursor differ per rank) next to the DeepSpeed files.
    """
    tag = TAG_FORMAT.format(state.step)
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": state.step})
    path = Path(folder) / tag / f"{STATE_STEM}{rank}.json"
    path.write_text(json.dumps(asdict(state), default=_json_number) + "\n")
    return tag


def _json_number(value):
    if isinstance(value, np.generic):  # numpy ints/floats in a data cursor
        return value.item()
    raise TypeError(f"TrainState: {type(value).__name__} is not JSON serialisable")


def read_state(path: Path) -> TrainState:
    """A rank's TrainState: JSON, or a legacy `.pt` file read with `weights_only=True` (no code runs)."""
    if path.suffix == ".json":
        return TrainState(**json.loads(path.read_text()))
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed it
    numpy_globals = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(numpy_globals):  # legacy RNG state: a numpy uint32 array
        return TrainState(**torch.load(path, map_location="cpu", weights_only=True))


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed 0.19 pickles into its checkpoint files (seen saving ZeRO 0-3 in fp32 on the
    CPU): the loss scaler and ZeRO stage of the optimizer states, and ZeRO 1-2's fragment addresses;
    plus fp16's dynamic loss scaler (the same object under fp16, not exercised on the CPU). Plain data:
    unpickling them runs no code of the file's choosing. Anything else fails, naming the global."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside runs with `weights_only=True`, DeepSpeed's classes allow-listed.

    DeepSpeed 0.19 passes `weights_only=False` at each of its many `torch.load`
    calls (checkpoint engine, ZeRO and universal checkpoints, zero_to_fp32), and
    offers no setting for it, so the function is swapped for the duration.  A
    file that needs any other global fails with torch's UnpicklingError naming
    it, instead of running it.
    """
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


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
    with weights_only_loads(), own_optimizer_groups(engine):
        path, _ = engine.load_checkpoint(str(universal or folder), tag=tag, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{Path(folder) / tag}: DeepSpeed could not load this checkpoint")
    states = [read_state(f) for f in state_files(folder, tag)]
    mine = states[rank] if rank < len(states) else states[0]
    if len(states) == engine.world_size:
        restore_rng(mine.rng)
    return mine, [s.data for s in states]


@contextlib.contextmanager
def own_optimizer_groups(engine) -> Iterator[None]:
    """Keep each optimizer param group its own through a checkpoint load: its hyperparameters (weight decay:
    none on biases and norms; the LR and its schedule come from the checkpoint) and its own step count.

    DeepSpeed 0.19's ZeRO-3 universal loader (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`), used
    when a ZeRO-3 run resumes on another world size, (1) copies the first saved group's hyperparameters onto
    every group, which would decay biases and norms for the rest of the run, and (2) hands every group one
    and the same `step` tensor, which torch's Adam increments in place once per group and step, so the
    bias correction of every group after the first runs ahead. The groups are ours
    (trainers.engine.build_optimizer), and a resume may not change them (orchestrator.runs.RESUME_MAY_CHANGE).
    """
    own = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
           for g in _base_optimizer(engine).param_groups]
    yield
    optimizer = _base_optimizer(engine)
    for group, hyper in zip(optimizer.param_groups, own):
        group.update(hyper)
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO wrapper (ZeRO 1-3), or the engine's own (ZeRO-0)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def state_files(folder: str | Path, tag: str) -> list[Path]:
    """Every rank's train state file, by rank (`.json`; `.pt` in checkpoints written before it)."""
    for suffix in (".json", ".pt"):
        files = sorted(Path(folder, tag).glob(f"{STATE_STEM}*{suffix}"), key=lambda p: int(p.stem[len(STATE_STEM):]))
        if files:
            return files
    raise FileNotFoundError(f"{Path(folder) / tag}: no {STATE_STEM}*.json files")


def saved_world_size(folder: str | Path) -> int:
    """How many ranks saved the checkpoint in `folder`."""
    tag = latest_tag(folder)
    return len(state_files(folder, tag)) if tag else 0


def to_universal(folder: str | Path, out: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (re-partitionable on any world size)."""
    tag = latest_tag(folder)
    if (out / f"latest_universal").is_file():
        return out
    # DeepSpeed's converter, with its torch.load calls made weights_only (see weights_only_loads).
    subprocess.run([sys.executable, "-c", _SAFE_UNIVERSAL, "--input_folder",
                    str(Path(folder) / tag), "--output_folder", str(out / tag), "--inject_missing_state",
                    "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   check=True, stdout=subprocess.DEVNULL)
    (out / "latest").write_text(tag)
    return out


def latest_tag(folder: str | Path) -> str | None:
    latest = Path(folder) / "latest"
    return latest.read_text().strip() if latest.is_file() else None
