"""A training run's state as one typed object, built once by preflight.

    run = preflight_training(job, kind="pretrain")     # orchestrator.preflight: every check, no writes
    run.open()                                         # config.yaml + run.json (the W&B run id), pushed
    fit(run, spec)                                     # orchestrator.driver: Ray Train to max_steps
    write_package(run)                                 # the latest checkpoint -> <run.dir>/model

A `Run` holds the run folder (local, or a bucket worked on through a local
mirror), the typed `Manifest` of its data, the model config, the checkpoint
root, the W&B run id, the config hash and the resolved config.  Paths are
typed once, here; nothing downstream re-normalises them.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from data_pipeline import Manifest
from data_pipeline.storage import as_path, is_remote, sha256_file
from trainers.checkpoint import TAG_PREFIX, step_of
from trainers.models import ModelConfig
from trainers.package import Lineage
from trainers.run_folder import RunFolder
from trainers.selection import best_of

CHECKPOINTS = "checkpoints"
RAY_CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"
"""Where Ray Train V2 records the checkpoints it registered (`<storage>/checkpoints/`, rewritten at each one)."""
RUN_INFO = "run.json"
CONFIG = "config.yaml"
TRAINING_SLICES = ("model", "data", "objective", "trainer", "deepspeed", "pretrained")
"""The config slices that define what is trained (the config hash covers these and nothing else)."""


def config_container(job: Any) -> dict[str, Any]:
    """A typed job config as plain data (what config.yaml and W&B show)."""
    return OmegaConf.to_container(OmegaConf.structured(job))


def config_sha256(config: dict[str, Any]) -> str:
    """Hash of the slices that define training (an allow-list: run folder, cluster, tracking, ... left out)."""
    kept = {key: config[key] for key in TRAINING_SLICES if key in config}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    """`<folder>/config.yaml`, the resolved config of the job that wrote the folder (atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / CONFIG, folder / f".{CONFIG}.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    tmp.replace(path)
    return path


RESUME_MAY_CHANGE = {"trainer": ("max_steps", "num_workers", "cpus_per_worker", "use_gpu", "placement_strategy",
                                 "global_batch_size", "log_every", "checkpoint_every", "keep_last", "val_every",
                                 "val_batches", "val_samples", "val_metric_samples", "stall_alert_s", "max_failures",
                                 "max_bad_steps", "collective_timeout_s", "patience", "peak_flops"),
                     "data": ("num_workers",), "deepspeed": ("zero_stage", "offload_optimizer", "offload_params")}
"""Keys a resume may change (a longer run, another world size, another cadence); any other training key
differing from the saved config.yaml means another run (`preflight.check_same_config`)."""


def training_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The training slices of a config without the keys a resume may change."""
    kept = {}
    for key in TRAINING_SLICES:
        value = config.get(key)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in RESUME_MAY_CHANGE.get(key, ())}
        kept[key] = value
    return kept


def folder_name(location: str) -> str:
    """The last part of a folder path or URL (`s3://b/runs/p1` -> `p1`): run names, W&B names."""
    return location.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class CheckpointRoot:
    """`<storage>/checkpoints`: one `step_NNNNNNNN` folder per persisted checkpoint (Ray Train writes them)."""

    location: str
    """An absolute local path or an object-storage URL."""

    @classmethod
    def under(cls, storage_path: str) -> "CheckpointRoot":
        return cls(f"{storage_path.rstrip('/')}/{CHECKPOINTS}")

    @property
    def remote(self) -> bool:
        return is_remote(self.location)

    def all(self) -> list[Path]:
        """The checkpoints Ray Train registered, oldest first (local paths or UPaths): a folder it never
        registered (an upload cut short) is not one; without its record, every `step_*` folder is."""
        try:
            found = [p for p in as_path(self.location).iterdir() if p.name.startswith(TAG_PREFIX)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        registered = self.registered()
        if registered is not None:
            found = [p for p in found if p.name in registered]
        return sorted(found, key=lambda p: step_of(p.name))

    def registered(self) -> set[str] | None:
        """The folder names in Ray Train's own record of the checkpoints it kept (its checkpoint manager
        snapshot), or None when there is no readable record."""
        results = self.records()
        return None if results is None else {r["checkpoint_dir_name"] for r in results}

    def records(self) -> list[dict] | None:
        """Ray Train's records of the kept checkpoints (`checkpoint_dir_name`, the `metrics` reported with it)."""
        try:
            state = json.loads((as_path(self.location) / RAY_CHECKPOINT_RECORD).read_text())
            results = state.get("checkpoint_results") or []
            return [r for r in results if isinstance(r["checkpoint_dir_name"], str)]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def best(self) -> Path | None:
        """The kept checkpoint whose validation ranked best (`trainer.best_metric`), or None when the run
        selects none (best_metric=none, or no kept checkpoint was validated)."""
        name = best_of(self.records() or [])
        return self.get(name) if name and any(p.name == name for p in self.all()) else None

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def get(self, tag: str) -> Path:
        return as_path(self.location) / tag

    @staticmethod
    def step(folder: Path | str) -> int:
        """The step of a checkpoint folder (`.../step_00000100` -> 100)."""
        return step_of(Path(str(folder)).name)


LOCK = ".lock"


class RunLock:
    """`<run folder>/.lock` while a run is active in a local run.dir: the holder's pid and host.  A second
    run on the folder is refused; the lock of a dead pid (a crashed run) is taken over."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK

    def check(self, wait_s: float = 0.0) -> None:
        """ValueError (one line naming run.dir) when another live process holds the lock, once it has held it
        `wait_s` seconds more (a restarted trial waits for the process of its killed incarnation to exit)."""
        deadline = time.monotonic() + wait_s
        while (holder := self.other_live_holder()) is not None:
            if time.monotonic() >= deadline:
                raise ValueError(f"run.dir: {self.path.parent} is in use by pid {holder.get('pid')} on "
                                 f"{holder.get('host')} (delete {self.path} if that run is dead)")
            time.sleep(0.2)

    def other_live_holder(self) -> dict | None:
        holder = self.holder()
        return holder if holder is not None and holder.get("pid") != os.getpid() and _alive(holder) else None

    def acquire(self) -> "RunLock":
        self.check()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{LOCK}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        tmp.replace(self.path)
        atexit.register(self.release)
        return self

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if (self.holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


def _alive(holder: dict) -> bool:
    """Whether a lock holder still runs (a pid on another host cannot be checked: assumed alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        pid = int(holder.get("pid", 0))
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """An exited process its parent has not reaped yet: it still answers kill(pid, 0), but runs no more."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


@dataclass
class RunInfo:
    """`run.json`: what a run folder says about itself across restarts."""

    wandb_run_id: str
    mode: str
    created: float = field(default_factory=time.time)
    resumed: int = 0
    config_sha256: str = ""
    pretrained: str = ""
    data_manifest_sha256: str = ""

    @classmethod
    def load(cls, path: Path) -> "RunInfo":
        data = json.loads(path.read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2))
        tmp.replace(path)


@dataclass(frozen=True)
class Run:
    """One training run (pretrain, finetune, a sweep trial): everything preflight established."""

    kind: str
    """`pretrain` or `finetune`."""
    folder: RunFolder
    """`run.dir`, local or in object storage."""
    manifest: Manifest
    model: ModelConfig
    """The architecture trained (a package's, with the job's dropout, when starting from one)."""
    storage_path: str
    """Where Ray Train persists checkpoints (`cluster.storage_path`, else the run folder)."""
    pretrained: str
    """The package the weights start from (a path or URL), or empty."""
    config: dict[str, Any]
    """The resolved job config (config.yaml, W&B)."""
    config_sha256: str
    wandb_run_id: str
    resumed: bool
    """The run has a checkpoint to continue from."""

    @property
    def local(self) -> Path:
        """Where this process writes the run's files (the run folder, or its local mirror)."""
        return self.folder.local

    @property
    def name(self) -> str:
        """The run folder's name: the W&B run name."""
        return folder_name(self.folder.location)

    @property
    def checkpoints(self) -> CheckpointRoot:
        return CheckpointRoot.under(self.storage_path)

    def open(self) -> RunInfo:
        """Create (or reopen on resume) the run folder: config.yaml and run.json, pushed when remote."""
        path = self.local / RUN_INFO
        if self.resumed and path.is_file():
            info = RunInfo.load(path)
            info.resumed += 1
        else:
            info = RunInfo(wandb_run_id=self.wandb_run_id, mode=self.kind)
        info.config_sha256, info.pretrained = self.config_sha256, self.pretrained
        info.data_manifest_sha256 = sha256_file(self.manifest.path)
        self.local.mkdir(parents=True, exist_ok=True)
        if not self.folder.remote:
            RunLock(self.local).acquire()
        info.save(path)
        write_config(self.local, self.config)
        self.folder.push(RUN_INFO, CONFIG)
        return info

    def release(self) -> None:
        """Give up the run folder's lock (`open` took it; a process's exit also frees it)."""
        if not self.folder.remote:
            RunLock(self.local).release()

    def lineage(self, step: int) -> Lineage:
        """The package lineage of this run's weights at `step`."""
        parent = as_path(self.pretrained) / "model.safetensors" if self.pretrained else None
        return Lineage(parent_package=self.pretrained or None,
                       parent_sha256=sha256_file(parent) if parent is not None else None,
                       data_manifest_sha256=sha256_file(self.manifest.path), config_sha256=self.config_sha256,
                       wandb_run_id=self.wandb_run_id, step=step)


def saved_run_id(folder: RunFolder) -> str | None:
    """The W&B run id a run folder already has (pulled from the bucket first when remote), or None."""
    folder.pull(RUN_INFO)
    path = folder.local / RUN_INFO
    return RunInfo.load(path).wandb_run_id if path.is_file() else None
