"""Experiment tracking: `metrics.jsonl` in the run folder and Weights & Biases.

W&B runs offline unless the user has a key (WANDB_API_KEY or `wandb login`)
and `tracking.mode=auto`; a run keeps one W&B run id across restarts (the id
lives in the run folder and in every checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrackingConfig:
    project: str = "seqfoundry"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None = the default of the key."""
    mode: str = "offline"
    """`offline` (default), `online`, `auto` (online when a key is configured) or `disabled`."""
    group: str | None = None
    """W&B group tying runs together (a pipeline or a sweep sets it)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    upload_models: bool = False
    """Upload a local model package's files into its W&B model artifact; false = the artifact references the
    package where it lies (a file:// URI or the bucket URL), which is all a bucket package ever gets."""

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "auto", "disabled"):
            raise ValueError(f"tracking.mode: must be offline, online, auto or disabled, got {self.mode!r}")

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "online" if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb() else "offline"


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def new_run_id() -> str:
    """A W&B-style run id (8 characters of [a-z0-9])."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


FLUSH_INTERVAL_S = 0.5
"""How often W&B writes a run's records to its `.wandb` file. W&B's default (15 s) loses that much history,
offline the only copy, when a machine or worker dies (SIGKILL skips `finish`); a kill-and-resume test lost a
whole short attempt that way. `Tracker.commit` (at every checkpoint) also waits for the write."""


def open_wandb(cfg: TrackingConfig, *, run_dir: Path, run_id: str | None, name: str | None, job_type: str,
               config: dict[str, Any] | None = None, group: str | None = None):
    """The one `wandb.init` of the project: run `run_id` (resumed if it exists; None = a new id) of
    `cfg.project`, in group `group` (default `cfg.group`), writing under `<run_dir>/wandb`."""
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)

    def init(mode: str):
        return wandb.init(project=cfg.project, entity=cfg.entity, group=group or cfg.group, tags=cfg.tags,
                          name=name, id=run_id or None, resume="allow" if run_id else None, mode=mode,
                          dir=str(run_dir), config=config, job_type=job_type,
                          settings=wandb.Settings(console="off", silent=True,
                                                  x_transaction_log_flush_interval=FLUSH_INTERVAL_S))

    mode = cfg.resolved_mode()
    try:
        return init(mode)
    except Exception as err:  # W&B unreachable (or refusing the key): the run goes on, logged offline
        if mode != "online" or "in use" in str(err):  # "in use": init_resumable waits for the old stream
            raise
        text = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        print(f"warning: W&B online init failed ({text}); logging offline under {run_dir / 'wandb'} "
              "(`wandb sync` it later)", file=sys.stderr)
        return init("offline")


def finish_run(run, *, wait_s: float = 60.0) -> None:
    """`run.finish()`, then wait (at most `wait_s`) until W&B's service has written the run's exit record to
    its `.wandb` file. `finish()` returns before the service closes the run's stream, so on a busy machine
    the file can still lack the last rows (or be empty) when it returns: a `wandb/` folder pushed to a bucket,
    or read back, right after would miss them."""
    from .wandb_file import ended

    # Only an offline run's file is its record; a disabled run has a sync_file path that is never written
    # (waiting on it would cost wait_s), and an online run's record is on the server.
    sync_file = run.settings.sync_file if getattr(run, "offline", False) else None
    run.finish()
    deadline = time.time() + (wait_s if sync_file else 0.0)
    while time.time() < deadline and not ended(sync_file):
        time.sleep(0.1)


def init_resumable(cfg: TrackingConfig, *, run_dir: Path, run_id: str, name: str, config: dict[str, Any],
                   job_type: str, wait_s: float = 60.0):
    """`open_wandb` of run `run_id` in this process's own W&B service.

    A W&B service inherited from the driver (WANDB_SERVICE) would outlive a
    killed rank 0 and keep reporting its run id as "in use" to the restarted
    one, so the worker starts its own; a service still closing the old stream
    is waited for.
    """
    os.environ.pop("WANDB_SERVICE", None)
    deadline = time.time() + wait_s
    while True:
        try:
            return open_wandb(cfg, run_dir=run_dir, run_id=run_id, name=name, config=config, job_type=job_type)
        except Exception as err:  # wandb raises its own types; only "in use" is worth waiting for
            if "in use" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2.0)


def _file_size(path: str | None) -> int:
    return os.path.getsize(path) if path and os.path.isfile(path) else 0


def alert(title: str, text: str, *, level: str = "WARN", online: bool) -> None:
    """`ALERT [level] title: text` on stdout, and `wandb.alert` on the current run when online."""
    sys.stdout.write(f"ALERT [{level}] {title}: {text}\n")
    sys.stdout.flush()
    if online:
        import wandb

        wandb.alert(title=title, text=text, level=getattr(wandb.AlertLevel, level))


def alert_run(cfg: TrackingConfig, *, run_dir: Path, run_id: str, title: str, text: str) -> None:
    """Alert on a run from outside its workers (the driver, after Ray Train gave up on it)."""
    online = cfg.resolved_mode() == "online"
    run = open_wandb(cfg, run_dir=run_dir, run_id=run_id, name=None, job_type="alert") if online else None
    try:
        alert(title, text, level="ERROR", online=online)
    finally:
        if run is not None:
            finish_run(run)


def parsed_step(line: str, path: Path) -> int | None:
    """The step of one metrics.jsonl line; None (dropped, with a warning) for a torn line a crash left."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        print(f"warning: {path}: skipping a torn line ({line[:60]!r})", file=sys.stderr)
        return None


def json_value(value: Any) -> Any:
    """A metric as strict JSON: a non-finite float (NaN, inf) becomes null (W&B still gets the float)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass(frozen=True)
class TrackerSpec:
    """Picklable recipe for rank 0's Tracker (W&B + metrics.jsonl), made inside the worker."""

    tracking: TrackingConfig
    run_dir: str
    """The run folder's location (a path or an object-storage URL). Rank 0 writes into its own node's
    mirror of it (`RunFolder.local`), which it pushes: the driver's mirror path may not exist on that node."""
    run_id: str
    name: str
    config: dict[str, Any]
    """The resolved job config, as W&B shows it."""
    job_type: str

    def __call__(self, *, resume_from_step: int) -> "Tracker":
        from trainers.run_folder import RunFolder

        return Tracker(self.tracking, run_dir=RunFolder(self.run_dir).local, run_id=self.run_id, name=self.name,
                       config=self.config, resume_from_step=resume_from_step, job_type=self.job_type)


class Tracker:
    """Rank 0's logger: appends to metrics.jsonl and logs to W&B under one run id."""

    def __init__(self, cfg: TrackingConfig, *, run_dir: str | Path, run_id: str, name: str,
                 config: dict[str, Any], resume_from_step: int = 0, job_type: str = "train"):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._truncate_after(resume_from_step)
        self._t0 = time.time()
        self.wandb = None
        self.mode = cfg.resolved_mode()
        if self.mode != "disabled":
            self.wandb = init_resumable(cfg, run_dir=self.run_dir, run_id=run_id, name=name, config=config,
                                        job_type=job_type)
            if getattr(self.wandb, "offline", False):  # an online init that fell back to offline
                self.mode = "offline"
            if getattr(self.wandb, "url", None):  # online: say where to watch it (sys.stdout: see loop.console)
                sys.stdout.write(f"W&B run: {self.wandb.url}\n")
                sys.stdout.flush()

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old lines."""
        if not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines()
        steps = [(ln, parsed_step(ln, self.metrics_path)) for ln in lines if ln.strip()]
        kept = [ln for ln, at in steps if at is not None and at <= step]
        if len(kept) != len(lines):  # write, then rename: a crash now leaves the old file whole
            tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(self.metrics_path)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: json_value(v) for k, v in metrics.items()}, "time": time.time()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def commit(self, *, wait_s: float = 4 * FLUSH_INTERVAL_S) -> None:
        """Close the current step's W&B row (W&B holds a step's row open until a later step is logged) and
        wait (at most `wait_s`) until W&B has written it to the run's `.wandb` file: the history up to a
        checkpoint then survives a kill that comes right after it, as metrics.jsonl does."""
        if self.wandb is None:
            return
        sync_file = getattr(getattr(self.wandb, "settings", None), "sync_file", None)  # None: a run W&B disabled
        before = _file_size(sync_file)
        self.wandb.log({}, commit=True)
        deadline = time.time() + (wait_s if sync_file else 0.0)
        while time.time() < deadline and _file_size(sync_file) <= before:
            time.sleep(0.05)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def table(self, step: int, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A W&B table at `step` (offline: stored in the run's files, synced with it)."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def alert(self, title: str, text: str, *, level: str = "WARN") -> None:
        """A console line always; `wandb.alert` (email/Slack per the user's W&B settings) when online."""
        alert(title, text, level=level, online=self.wandb is not None and self.mode == "online")

    def finish(self) -> None:
        if self.wandb is not None:
            finish_run(self.wandb)
            self.wandb = None
