"""Consolidate a DeepSpeed checkpoint (any ZeRO stage) into fp32 weights and
write a model package from it, optionally the average of several checkpoints'
weights (`export.average_last`).  Runs in one process, no process group."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import latest_tag, weights_only_loads
from .models import ModelConfig, build_model
from .package import Lineage, PackageError, write_package


def consolidated_state_dict(checkpoint_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 weights from a DeepSpeed checkpoint folder (the one holding `latest`).

    ZeRO 1-3: DeepSpeed's `zero_to_fp32` merges the fp32 master partitions of
    every rank.  ZeRO 0: rank 0's model-states file holds the full module.
    """
    folder = Path(checkpoint_dir)
    tag = tag or latest_tag(folder)
    if tag is None or not (folder / tag).is_dir():
        raise PackageError(f"{folder}: no DeepSpeed checkpoint (missing 'latest' or tag folder {tag})")
    if list((folder / tag).glob("*optim_states.pt")) and _zero_stage(folder / tag) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads():  # DeepSpeed's loader passes weights_only=False; a checkpoint runs no code
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
        # ZeRO-1 keeps frozen parameters (trainer.freeze) out of its fp32 partitions and out of the
        # frozen-parameter record DeepSpeed writes for ZeRO 2-3; the module states (ZeRO 1-2 only:
        # ZeRO-3 writes per-rank partitions) hold them whole.
        module_file = folder / tag / "mp_rank_00_model_states.pt"
        if module_file.is_file():
            module = _load_states(module_file)["module"]
            state.update({k: v for k, v in module.items() if k not in state and v.numel()})
    else:
        state = _load_states(folder / tag / "mp_rank_00_model_states.pt")["module"]
    return {k: v.float() for k, v in state.items()}


def _load_states(path: Path) -> dict:
    """A DeepSpeed model-states file, unpickled with weights_only=True (tensors and plain data only)."""
    with weights_only_loads():
        return torch.load(path, map_location="cpu", weights_only=True)


def _zero_stage(tag_dir: Path) -> int:
    states = _load_states(next(tag_dir.glob("*mp_rank_00_model_states.pt")))
    return int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts with the same keys and shapes (checkpoint averaging).

    Floating-point tensors are averaged in float64 and returned as float32
    (the package's dtype); other tensors (integer buffers) must be equal in
    every state and are taken as they are.  Raises PackageError naming the
    first key that differs.
    """
    if not states:
        raise PackageError("export.average_last: no checkpoints to average")
    first = states[0]
    for i, state in enumerate(states[1:], 1):
        if state.keys() != first.keys():
            differ = sorted(state.keys() ^ first.keys())
            raise PackageError(f"export.average_last: checkpoint {i} has other weights than checkpoint 0 "
                               f"(e.g. {differ[:3]})")
    out = {}
    for key, ref in first.items():
        tensors = [state[key] for state in states]
        if any(t.shape != ref.shape for t in tensors):
            raise PackageError(f"export.average_last: {key} has different shapes across checkpoints")
        if ref.is_floating_point():
            out[key] = (sum(t.double() for t in tensors) / len(tensors)).float()
        elif all(torch.equal(t, ref) for t in tensors):
            out[key] = ref.clone()
        else:
            raise PackageError(f"export.average_last: non-float tensor {key} differs across checkpoints")
    return out


def export_package(checkpoint_dir: str | Path, out_dir: str | Path, *, model_cfg: ModelConfig,
                   tokenizer: str | Path, lineage: Lineage, tag: str | None = None,
                   average: Sequence[str | Path] = ()) -> Path:
    """Write the model package of a checkpoint (consolidated fp32 weights).

    `average`: further checkpoint folders (each the latest tag of its folder);
    the package then holds the mean of the weights of `checkpoint_dir` and
    these, and `lineage.extra["averaged_checkpoints"]` names them all.
    """
    model = build_model(model_cfg)
    state = consolidated_state_dict(checkpoint_dir, tag)
    if average:
        state = average_state_dicts([state, *(consolidated_state_dict(d) for d in average)])
        names = [Path(checkpoint_dir).name, *(Path(d).name for d in average)]
        lineage.extra = {**lineage.extra, "averaged_checkpoints": names}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if _is_tied_alias(model, k)}
    if set(missing) - tied or unexpected:
        raise PackageError(f"{checkpoint_dir}: checkpoint does not match model config "
                           f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    return write_package(out_dir, model, tokenizer=tokenizer, lineage=lineage)


def _is_tied_alias(model: torch.nn.Module, key: str) -> bool:
    """A state-dict key that shares its tensor with another key (the tied output projection)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())
    return key in params and key not in unique
