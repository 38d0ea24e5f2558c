"""Model packages (DESIGN.md, "Runs"): the hand-off between pretraining,
fine-tuning and evaluation.

    model/
      model.safetensors   consolidated fp32 weights (whatever ZeRO stage trained them)
      model_config.json   the ModelConfig fields
      tokenizer.json      the HF tokenizers file the model was trained with
      lineage.json        parent package, data manifest hash, config hash, W&B run id

Loading a package reads JSON and safetensors only: it never unpickles code.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from data_pipeline.storage import as_path, local_copy, sha256_file

from .models import ModelConfig, Seq2SeqModel, build_model

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
LINEAGE = "lineage.json"


class PackageError(ValueError):
    """A missing, corrupt or incompatible model package (one line, names the file)."""


@dataclass
class Lineage:
    parent_package: str | None = None
    """Path of the package this one was fine-tuned from (None for pretraining)."""
    parent_sha256: str | None = None
    """sha256 of the parent's model.safetensors."""
    data_manifest_sha256: str | None = None
    """sha256 of the manifest.json of the data it was trained on."""
    config_sha256: str | None = None
    """sha256 of the resolved job config."""
    wandb_run_id: str | None = None
    """W&B run of the training job."""
    step: int = 0
    """Optimizer step the weights come from."""
    extra: dict = field(default_factory=dict)


def write_package(out_dir: str | Path, model: Seq2SeqModel, *, tokenizer: str | Path,
                  lineage: Lineage) -> Path:
    """Write a package atomically: into `<out_dir>.tmp`, then rename over `out_dir`."""
    out, tmp = Path(out_dir), Path(f"{out_dir}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fp32 = build_model(model.config)
    fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    save_model(fp32, str(tmp / WEIGHTS))  # de-duplicates the tied embedding
    (tmp / CONFIG).write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
    shutil.copyfile(tokenizer, tmp / TOKENIZER)
    (tmp / LINEAGE).write_text(json.dumps(dataclasses.asdict(lineage), indent=2))
    old = Path(f"{out_dir}.old")  # the previous package stays whole until the new one is in place
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def read_model_config(package: str | Path) -> ModelConfig:
    path = as_path(package) / CONFIG
    if not path.is_file():
        raise PackageError(f"{path}: not found (is {package} a model package?)")
    try:
        return ModelConfig(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise PackageError(f"{path}: invalid model config ({' '.join(str(err).split())})") from err


def read_lineage(package: str | Path) -> Lineage:
    path = as_path(package) / LINEAGE
    return Lineage(**json.loads(path.read_text())) if path.is_file() else Lineage()


def load_package(package: str | Path, *, map_location: str = "cpu") -> Seq2SeqModel:
    """Build the packaged model and load its fp32 weights (safetensors only), in eval mode.

    `package` may be an object-storage URL: the weights are read from a local copy.
    """
    cfg = read_model_config(package)
    weights = as_path(package) / WEIGHTS
    if not weights.is_file():
        raise PackageError(f"{weights}: not found")
    weights = local_copy(weights)
    model = build_model(cfg)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=map_location)
    except Exception as err:  # safetensors raises several types for a corrupt file
        raise PackageError(f"{weights}: cannot be read ({' '.join(str(err).split())[:200]})") from err
    if missing or unexpected:
        raise PackageError(f"{weights}: does not match {CONFIG} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def tokenizer_sha256(package: str | Path) -> str:
    path = as_path(package) / TOKENIZER
    if not path.is_file():
        raise PackageError(f"{path}: not found")
    return sha256_file(path)


def check_compatible(package: str | Path, *, tokenizer_json: str | Path, vocab_size: int) -> None:
    """Refuse a package whose tokenizer or vocabulary differs from the data's."""
    cfg = read_model_config(package)
    if cfg.vocab_size != vocab_size:
        raise PackageError(f"{package}: model vocab_size {cfg.vocab_size} != data tokenizer's {vocab_size} "
                           f"({tokenizer_json})")
    if tokenizer_sha256(package) != sha256_file(tokenizer_json):
        raise PackageError(f"{as_path(package) / TOKENIZER}: differs from the data's tokenizer {tokenizer_json}")


def state_dict_for(model: Seq2SeqModel) -> dict[str, torch.Tensor]:
    """fp32 copy of a model's weights (for tests and comparisons)."""
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}
