"""A model package whose outputs are known: a tiny model trained in this process
to copy short word sequences, on data prepared by `data_pipeline.prepare`
(real tokenizer, shards and manifest), written with `write_package` next to a
run config.yaml that names its data folder (as a training run leaves it).

Built once per test session (cached under pytest's base temp folder).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data_pipeline import ObjectiveConfig, build_batcher, prepare
from orchestrator.config import compose_config, to_typed
from trainers.models import build_model
from trainers.package import Lineage, sha256_file, write_package

WORDS = "red green blue cat dog fish one two three four five six".split()


def write_copy_pairs(path: Path, n: int = 600, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            seq = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 7)))
            f.write(json.dumps({"src": seq, "tgt": seq}) + "\n")
    return path


def copy_package(root: Path, *, steps: int = 300, arch: str = "transformer") -> Path:
    """`<root>/run/model`: a package that copies its input; `<root>/data`: its prepared pairs."""
    package = root / "run" / "model"
    if (package / "model.safetensors").is_file():
        return package
    root.mkdir(parents=True, exist_ok=True)
    pairs = write_copy_pairs(root / "copy.jsonl")
    job = to_typed(compose_config(["experiment=tiny", f"model={arch}_tiny", f"data.dir={root / 'data'}",
                                   "data=pairs", f"data.sources=[{pairs}]", "data.max_documents=0",
                                   "data.valid_fraction=0.05", "data.test_fraction=0.05",
                                   f"run.dir={root / 'run'}", "data.num_workers=0"]))
    manifest = prepare(job.data, progress=False, use_ray=False)
    job.model.vocab_size = manifest.vocab_size
    model = train_copy(job, steps=steps)
    (root / "run").mkdir(parents=True, exist_ok=True)
    (root / "run" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(job)))
    return write_package(package, model, tokenizer=manifest.tokenizer_path,
                         lineage=Lineage(data_manifest_sha256=sha256_file(manifest.path), step=steps))


def train_copy(job, *, steps: int):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, one thread is many times faster than two contending
    try:
        return _train(job, steps=steps)
    finally:
        torch.set_num_threads(threads)


def _train(job, *, steps: int):
    model = build_model(job.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batcher = build_batcher(job.data, ObjectiveConfig(name="pairs"), rank=0, world_size=1, seed=0, split="train")
    step, epoch = 0, 0
    while step < steps:
        batcher.set_epoch(epoch)
        for batch in batcher:
            loss = model(batch.src, batch.src_lengths, batch.tgt_in, labels=batch.tgt_out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step == steps:
                break
        epoch += 1
    return model.eval()


def split_batch(data_dir: Path, split: str):
    """Every pair of a split as one collated Batch (corpus order)."""
    from data_pipeline import Example, ShardStream, collate

    stream = ShardStream(Path(data_dir) / "manifest.json", rank=0, world_size=1, seed=0, shuffle=False, split=split)
    return collate([Example(s["__key__"], -1, s["src"], s["tgt"]) for s in stream])
