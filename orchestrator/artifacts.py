"""W&B artifacts of what seqfoundry writes: model packages (`model`), prepared data (`dataset`),
evaluation results (`results`).

    log_artifact(job.tracking, model_artifact(package, name=f"model-{run.name}"),
                 inputs=[dataset_artifact(run.manifest)], run_dir=run.local, run_id=run.wandb_run_id)

The artifact is logged from the W&B run that made it (resumed by its id).  A
local package with `tracking.upload_models=true` is uploaded; anything else is
a *reference* to where it lies (a `file://` URI or the bucket URL), checksum
off, so nothing is copied.  Online, the run `use_artifact`s its inputs, so W&B
draws the lineage graph; offline, W&B cannot use artifacts, so the artifact is
stored in the offline run (synced later with `wandb sync`) and names its inputs
in its metadata (`inputs`).  Every command that writes a model package calls
this module, and so does the pipeline for its lineage record.  (Offline, the
dataset reference is logged by the run that read it, so that it exists after
`wandb sync`; W&B then shows that run as its producer.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline import Manifest
from data_pipeline.storage import as_path, is_remote, sha256_file, url

from .tracking import TrackingConfig, finish_run, open_wandb

MODEL, DATASET, RESULTS = "model", "dataset", "results"


@dataclass(frozen=True)
class ArtifactSpec:
    """One W&B artifact, before it is logged."""

    name: str
    """W&B artifact name (letters, digits, dashes, underscores and dots)."""
    type: str
    """`model`, `dataset` or `results`."""
    location: str
    """Folder or file: a local path or an object-storage URL."""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return is_remote(self.location)

    def uri(self) -> str:
        """What a reference artifact points at: the bucket URL, or a file:// URI."""
        return url(self.location) if self.remote else Path(self.location).resolve().as_uri()


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def model_artifact(package: str | Path, *, name: str, **metadata: Any) -> ArtifactSpec:
    """A model package folder; its metadata carries the package's lineage and weights hash."""
    from trainers.package import read_lineage

    location = str(package)
    weights = as_path(location) / "model.safetensors"
    return ArtifactSpec(safe_name(name), MODEL, location,
                        {"sha256": sha256_file(weights), "lineage": read_lineage(location).__dict__, **metadata})


def dataset_artifact(manifest: Manifest) -> ArtifactSpec:
    """Prepared data (a reference: shards are never uploaded), named by its folder and manifest hash."""
    sha = sha256_file(manifest.path)
    name = f"data-{str(manifest.folder).rstrip('/').rsplit('/', 1)[-1]}-{sha[:8]}"
    return ArtifactSpec(safe_name(name), DATASET, str(manifest.folder),
                        {"sha256": sha, "samples": manifest.data.get("num_samples"),
                         "vocab_size": manifest.vocab_size})


def package_artifact_name(package: str | Path) -> str:
    """The artifact name a package's own run logged it under (`model-<run folder>`), for inputs."""
    folder = str(package).rstrip("/").rsplit("/", 1)
    return safe_name(f"model-{folder[0].rsplit('/', 1)[-1] if len(folder) > 1 else folder[0]}")


def to_wandb(spec: ArtifactSpec, *, upload: bool):
    import wandb

    artifact = wandb.Artifact(spec.name, type=spec.type, metadata={"location": spec.location, **spec.metadata})
    local = Path(spec.location)
    if upload and not spec.remote and local.is_dir():
        artifact.add_dir(str(local))
    elif upload and not spec.remote and local.is_file():
        artifact.add_file(str(local))
    else:
        artifact.add_reference(spec.uri(), checksum=False)
    return artifact


def log_artifact(tracking: TrackingConfig, spec: ArtifactSpec, *, run_dir: Path, run_id: str | None,
                 inputs: tuple[ArtifactSpec, ...] | list[ArtifactSpec] = (), job_type: str = "artifact",
                 group: str | None = None, upload: bool | None = None, aliases: tuple[str, ...] = ()) -> str | None:
    """Log `spec` from W&B run `run_id` (resumed; None = a new run), linked to its `inputs`; returns the
    run id, or None when tracking is disabled. `upload` defaults to `tracking.upload_models` for models."""
    mode = tracking.resolved_mode()
    if mode == "disabled":
        return None
    upload = (tracking.upload_models and spec.type == MODEL) if upload is None else upload
    run = open_wandb(tracking, run_dir=run_dir, run_id=run_id, name=None, job_type=job_type, group=group)
    try:
        for parent in inputs:
            if mode == "online":  # a draft artifact: W&B logs it (deduplicated by digest) and links it
                run.use_artifact(to_wandb(parent, upload=False))
            elif parent.type == DATASET:  # offline W&B cannot use artifacts: store the reference for sync
                run.log_artifact(to_wandb(parent, upload=False))
        spec = ArtifactSpec(spec.name, spec.type, spec.location,
                            {**spec.metadata, "inputs": [p.name for p in inputs]})
        run.log_artifact(to_wandb(spec, upload=upload), aliases=["latest", *aliases])
        return run.id
    finally:
        finish_run(run)


def group_digest(group: str) -> str:
    """A short stable digest of a W&B group (pipeline artifact names)."""
    return hashlib.sha256(group.encode()).hexdigest()[:8]


def log_run_package(tracking: TrackingConfig, run, package: str, *, aliases: tuple[str, ...] = ()) -> str | None:
    """The model package of a training run (`orchestrator.runs.Run`), from the run's own W&B run, with its
    data (and the package it started from) as inputs; the run folder's wandb/ is pushed when remote."""
    inputs = [dataset_artifact(run.manifest)]
    if run.pretrained:
        inputs.append(model_artifact(run.pretrained, name=package_artifact_name(run.pretrained)))
    spec = model_artifact(package, name=f"model-{run.name}", run=run.name, kind=run.kind)
    run_id = log_artifact(tracking, spec, inputs=inputs, run_dir=run.local, run_id=run.wandb_run_id,
                          job_type=run.kind, aliases=aliases)
    run.folder.push("wandb")
    return run_id
