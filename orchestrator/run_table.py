"""`seqfoundry runs list` / `seqfoundry runs compare`: what the run folders say, as tables.

    seqfoundry runs list                                   # every run folder under runs/
    seqfoundry runs list runs.root=s3://bucket/runs        # folders in a bucket (data_pipeline.storage)
    seqfoundry runs compare 'runs.dirs=[runs/p1,runs/p2]'  # differing config keys, final metrics

A row is read from the files every run folder has (`run.json`, `config.yaml`,
`metrics.jsonl`, `model/`, and `sweep_results.json` / `eval_results.json` for
sweeps and evaluations); nothing asks W&B or Ray.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from data_pipeline.storage import as_path

from .config import ConfigError, JobConfig
from .runs import CONFIG, RUN_INFO

RUNNING_WITHIN_S = 300.0
"""A run without a package whose metrics.jsonl grew this recently is `running`; older ones `stopped`."""
COLUMNS = ("name", "command", "status", "step", "loss", "best_val_loss", "tokens_per_s", "mfu", "wandb_id",
           "wall")


@dataclass
class RunSummary:
    """One run folder, as `runs list` shows it."""

    location: str
    name: str
    command: str
    status: str
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    best_val_loss: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    wandb_id: str = ""
    wall_s: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    """The last value of every logged metric (what `compare` shows)."""

    def cells(self) -> list[str]:
        step = "-" if self.step is None else f"{self.step}/{self.max_steps or '?'}"
        return [self.name, self.command, self.status, step, fmt(self.loss), fmt(self.best_val_loss),
                fmt(self.tokens_per_s, "{:,.0f}"), fmt(self.mfu, "{:.1%}"), self.wandb_id or "-",
                duration(self.wall_s)]


def run(job: JobConfig) -> int:
    if job.runs.action == "list":
        summaries = list_runs(job.runs.root)
        print_table(COLUMNS, [s.cells() for s in summaries])
        return 0
    if len(job.runs.dirs) < 2:
        raise ConfigError("runs.dirs: compare needs at least two run folders, e.g. 'runs.dirs=[runs/a,runs/b]'")
    print_comparison([read_run(location) for location in job.runs.dirs])
    return 0


def list_runs(root: str) -> list[RunSummary]:
    folder = as_path(root)
    if not folder.is_dir():
        raise ConfigError(f"runs.root: {root} is not a folder")
    found = [p for p in folder.iterdir() if p.is_dir() and is_run_folder(p)]
    return [read_run(str(p)) for p in sorted(found, key=lambda p: p.name)]


def is_run_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in (RUN_INFO, CONFIG, "sweep_results.json", "eval_results.json"))


# --- reading one folder --------------------------------------------------------------------

def read_run(location: str) -> RunSummary:
    folder = as_path(location)
    if not folder.is_dir() or not is_run_folder(folder):
        raise ConfigError(f"runs.dirs: {location} is not a run folder (no {RUN_INFO}, {CONFIG} or results)")
    summary = RunSummary(location=str(location), name=folder.name, command="?", status="?")
    summary.config = read_config(folder)
    if (folder / "sweep_results.json").is_file():
        return read_sweep(folder, summary)
    if (folder / "eval_results.json").is_file() and not (folder / RUN_INFO).is_file():
        return read_evaluation(folder, summary)
    info = read_json(folder / RUN_INFO)
    rows = read_metrics(folder / "metrics.jsonl")
    summary.command, summary.wandb_id = info.get("mode", "?"), info.get("wandb_run_id", "")
    summary.max_steps = summary.config.get("trainer", {}).get("max_steps")
    summary.status = training_status(folder, rows, max_steps=summary.max_steps)
    fill_metrics(summary, rows, started=info.get("created"))
    return summary


def fill_metrics(summary: RunSummary, rows: list[dict], *, started: float | None) -> None:
    train = [r for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    last = train[-1] if train else {}
    summary.step = max((r.get("step", 0) for r in rows), default=None)
    summary.loss, summary.tokens_per_s, summary.mfu = last.get("loss"), last.get("tokens_per_s"), last.get("mfu")
    summary.best_val_loss = min(val) if val else None
    times = [r["time"] for r in rows if "time" in r]
    if times:
        summary.wall_s = max(times) - (started or min(times))
    for r in rows:
        summary.final.update({k: v for k, v in r.items() if k != "time"})


def training_status(folder: Path, rows: list[dict], *, max_steps: int | None) -> str:
    """`finished` (package written), `running` (short of max_steps, metrics logged lately) or `stopped`."""
    if (folder / "model" / "model.safetensors").is_file():
        return "finished"
    last = max((r.get("time", 0.0) for r in rows), default=0.0)
    step = max((r.get("step", 0) for r in rows), default=0)
    short = max_steps is None or step < max_steps
    return "running" if short and time.time() - last < RUNNING_WITHIN_S else "stopped"


def read_sweep(folder: Path, summary: RunSummary) -> RunSummary:
    results = read_json(folder / "sweep_results.json")
    best = results.get("best") or {}
    summary.command = "sweep"
    summary.status = " ".join(f"{k.lower()}={v}" for k, v in results.get("counts", {}).items()) or "no trials"
    summary.step = (best.get("metrics") or {}).get("step")
    summary.best_val_loss = (best.get("metrics") or {}).get("val_loss")
    summary.wandb_id, summary.wall_s = best.get("wandb_run_id") or "", results.get("wall_s")
    summary.final = {"best_trial": best.get("trial_id"), **(best.get("metrics") or {})}
    return summary


def read_evaluation(folder: Path, summary: RunSummary) -> RunSummary:
    results = read_json(folder / "eval_results.json")
    summary.command, summary.status = "evaluate", "finished"
    summary.wandb_id, summary.wall_s = results.get("wandb_run_id") or "", results.get("elapsed_s")
    summary.final = {f"{name}.{k}": v for name, metrics in results.get("strategies", {}).items()
                     for k, v in metrics.items() if isinstance(v, (int, float))}
    return summary


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_config(folder: Path) -> dict:
    path = folder / CONFIG
    return OmegaConf.to_container(OmegaConf.create(path.read_text())) if path.is_file() else {}


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- printing ---------------------------------------------------------------------------------

def print_comparison(runs: list[RunSummary]) -> None:
    configs = [flatten(r.config) for r in runs]
    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    names = [r.name for r in runs]
    print("config (differing keys)")
    print_table(("key", *names), [[k, *(short(c.get(k, "-")) for c in configs)] for k in differing])
    metrics = [k for k in dict.fromkeys(k for r in runs for k in r.final) if k != "step"]
    print("\nfinal metrics")
    rows = [["status", *(r.status for r in runs)], ["step", *(str(r.step) for r in runs)],
            ["best_val_loss", *(fmt(r.best_val_loss) for r in runs)],
            *[[k, *(fmt(r.final.get(k)) for r in runs)] for k in metrics]]
    print_table(("metric", *names), rows)


def print_table(header, rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def flatten(nested: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fmt(value: Any, pattern: str = "{:.4g}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return pattern.format(value)
    return str(value)


def short(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
