"""`seqfoundry report run=<folder>`: PNG plots for people who do not use W&B.

Works on a training run folder (metrics.jsonl), a sweep folder
(sweep_results.json + trial run folders), an evaluation folder
(eval_results.json) or a pipeline folder (all of them below it).  Writes
`<folder>/report/*.png` and prints their paths.

    seqfoundry report run=runs/p1,runs/p2     # overlay: one PNG per metric, a curve per run,
                                              # in <their common parent>/report/overlay_<metric>.png
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError, JobConfig, require_local


OVERLAID = ("loss", "val_loss", "val_bleu", "val_chrf", "lr", "tokens_per_s", "mfu", "grad_norm")
"""Metrics `report run=a,b` overlays (those that at least one of the runs logged)."""


def run(job: JobConfig) -> int:
    if job.runs.dirs:
        return overlay(job.runs.dirs)
    require_local("run", job.run.dir, "report")
    folder = Path(job.run.dir)
    if not folder.is_dir():
        raise ConfigError(f"run: {folder} is not a folder")
    out = folder / "report"
    written = write_report(folder, out)
    if not written:
        raise ConfigError(f"run: {folder} holds no metrics.jsonl, sweep_results.json or eval_results.json")
    for path in written:
        print(path)
    return 0


def write_report(folder: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for metrics in sorted(folder.rglob("metrics.jsonl")):
        if "report" not in metrics.parts:
            written += plot_training(metrics, out, prefix=_prefix(folder, metrics.parent))
    for sweep in sorted(folder.rglob("sweep_results.json")):
        written.append(plot_sweep(sweep, out / f"{_prefix(folder, sweep.parent)}sweep_trials.png"))
    for results in sorted(folder.rglob("eval_results.json")):
        written.append(plot_strategies(results, out / f"{_prefix(folder, results.parent)}strategies.png"))
    return written


def _prefix(root: Path, folder: Path) -> str:
    rel = folder.relative_to(root).as_posix()
    return "" if rel == "." else rel.replace("/", "_") + "_"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(path: Path, out: Path, *, prefix: str) -> list[Path]:
    """Loss (train and validation), learning rate, and throughput/MFU against the step."""
    import matplotlib.pyplot as plt

    rows = read_jsonl(path)
    panels = [("loss", ["loss", "val_loss"]), ("learning rate", ["lr"]), ("target tokens/s", ["tokens_per_s"]),
              ("MFU", ["mfu"])]
    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return []
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=key)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(str(path.parent))
    fig.tight_layout()
    target = out / f"{prefix}training.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return [target]


def plot_sweep(path: Path, target: Path) -> Path:
    """One bar per trial: its final metric, coloured by status."""
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    trials = data.get("trials", [])
    metric = data.get("metric", "val_loss")
    names = [str(t.get("trial_id", i)) for i, t in enumerate(trials)]
    values = [float((t.get("metrics") or {}).get(metric) or 0.0) for t in trials]
    colors = ["tab:green" if t.get("status") == "TERMINATED" else "tab:red" for t in trials]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(trials) + 2), 3.5))
    ax.bar(names, values, color=colors)
    ax.set_ylabel(metric)
    ax.set_title(f"sweep trials (green: finished, red: failed/stopped); best {data.get('best', {}).get('trial_id')}")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def plot_strategies(path: Path, target: Path) -> Path:
    """Decoding strategies side by side, one panel per metric."""
    import matplotlib.pyplot as plt

    strategies = json.loads(path.read_text()).get("strategies", {})
    metrics = [m for m in ("bleu", "chrf", "exact_match", "avg_len", "tokens_per_s")
               if any(isinstance(v.get(m), (int, float)) for v in strategies.values())]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3 * max(1, len(metrics)), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ax.bar(list(strategies), [float(v.get(metric) or 0.0) for v in strategies.values()], color="tab:blue")
        ax.set_title(metric)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("decoding strategies")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def overlay(dirs: list[str]) -> int:
    """One PNG per metric with a curve per run (`report run=a,b`)."""
    folders = [Path(d) for d in dirs]
    for d in dirs:
        require_local("run", d, "report")
    missing = [str(f) for f in folders if not (f / "metrics.jsonl").is_file()]
    if missing:
        raise ConfigError(f"run: {', '.join(missing)} holds no metrics.jsonl")
    import os

    import matplotlib

    matplotlib.use("Agg")
    out = Path(os.path.commonpath([str(f.resolve()) for f in folders])) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = {f: read_jsonl(f / "metrics.jsonl") for f in folders}
    for metric in OVERLAID:
        if any(metric in r for runs in rows.values() for r in runs):
            print(plot_overlay(metric, rows, out / f"overlay_{metric}.png"))
    return 0


def plot_overlay(metric: str, rows: dict[Path, list[dict]], target: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for folder, runs in rows.items():
        points = [(r["step"], r[metric]) for r in runs if metric in r]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=folder.name)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
