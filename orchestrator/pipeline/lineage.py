"""The pipeline's lineage: every artifact with its path, hash, parents and W&B
run, written to `pipeline.json` and mirrored to W&B as artifacts.

Online, each stage's W&B run `use_artifact`s its inputs and `log_artifact`s
its output, so W&B draws the graph.  Offline (the default), W&B cannot use
artifacts, so each logged artifact carries its parents in its metadata and
`wandb sync` uploads them; `pipeline.json` is the complete record either way.
The W&B side is `orchestrator.artifacts.log_artifact`, which every command that
writes a model package also uses.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.storage import url
from trainers.package import sha256_file
from trainers.run_folder import RunFolder

from ..artifacts import ArtifactSpec, group_digest, log_artifact
from ..tracking import TrackingConfig


@dataclass
class ArtifactRecord:
    name: str
    """Unique name in the pipeline (`data`, `pretrained`, `finetuned`, `evaluation`)."""
    type: str
    """`dataset`, `model` or `results`."""
    path: str
    """Folder or file of the artifact."""
    sha256: str
    """Hash of the artifact's defining file (manifest.json, model.safetensors, eval_results.json)."""
    parents: list[str] = field(default_factory=list)
    """Names of the artifacts it was made from."""
    wandb_run_id: str | None = None
    """W&B run that produced it."""
    reused: bool = False
    """True when the stage reused an existing output instead of running."""
    metadata: dict[str, Any] = field(default_factory=dict)


def defining_file(kind: str, path: Path) -> Path:
    """The file whose hash identifies an artifact of this kind."""
    if kind == "dataset":
        return path / "manifest.json"
    if kind == "model":
        return path / "model.safetensors"
    return path


def make_record(name: str, kind: str, path: Path, *, parents: list[str], wandb_run_id: str | None,
                reused: bool = False, metadata: dict | None = None) -> ArtifactRecord:
    return ArtifactRecord(name, kind, url(path), sha256_file(defining_file(kind, path)), parents,
                          wandb_run_id, reused, metadata or {})


PIPELINE_JSON = "pipeline.json"


class LineageGraph:
    """Collects ArtifactRecords; writes `<run folder>/pipeline.json` after every stage (a crash keeps what was
    done), pushed to the bucket when the run folder is one."""

    def __init__(self, folder: RunFolder, *, group: str):
        self.folder, self.group = folder, group
        self.records: dict[str, ArtifactRecord] = {}
        self.metadata: dict[str, Any] = {}  # pipeline-wide results (pipeline.compare_scratch: pretraining_gain)
        self.created = time.time()

    @property
    def path(self) -> str:
        """Where pipeline.json lies (a URL for a bucket run folder)."""
        return self.folder.where(PIPELINE_JSON)

    def add(self, record: ArtifactRecord) -> ArtifactRecord:
        missing = [p for p in record.parents if p not in self.records]
        if missing:
            raise ValueError(f"lineage: {record.name} names unknown parents {missing}")
        self.records[record.name] = record
        self.write()
        return record

    def write(self) -> None:
        data = {"group": self.group, "created": self.created, "updated": time.time(),
                "artifacts": [asdict(r) for r in self.records.values()], "metadata": self.metadata}
        path = self.folder.local / PIPELINE_JSON
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
        self.folder.push(PIPELINE_JSON)


def log_to_wandb(tracking: TrackingConfig, lineage: LineageGraph, record: ArtifactRecord, *, run_dir: Path) -> None:
    """Log `record` as a W&B artifact from its producing run (resumed by id), linked to its parents
    (`orchestrator.artifacts`, the one artifact logger)."""
    parents = [lineage.records[name] for name in record.parents]
    run_id = log_artifact(tracking, as_spec(lineage, record), inputs=[as_spec(lineage, p) for p in parents],
                          run_dir=run_dir, run_id=record.wandb_run_id, job_type=f"lineage-{record.name}",
                          group=lineage.group, upload=False)
    record.wandb_run_id = record.wandb_run_id or run_id


def as_spec(lineage: LineageGraph, record: ArtifactRecord) -> ArtifactSpec:
    return ArtifactSpec(artifact_name(lineage.group, record.name), record.type, record.path,
                        {"sha256": record.sha256, "parents": record.parents, **record.metadata})


def artifact_name(group: str, name: str) -> str:
    """W&B artifact names: letters, digits, dashes, underscores and dots."""
    return f"{name}-{group_digest(group)}"
