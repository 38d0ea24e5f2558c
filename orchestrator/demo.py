"""`seqfoundry demo`: train a tiny model on a toy task in one process, then
decode held-out sources with greedy, beam and sampling and print a table."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from trainers.decoding import DecodingConfig, decode
from trainers.models import build_model
from trainers.toy import FIRST_TOKEN, expected_outputs, toy_batch, train_toy

from .config import JobConfig
from .runs import config_container, write_config

ALPHABET = 12


def strategies(base: DecodingConfig, max_len: int) -> dict[str, DecodingConfig]:
    """The strategies the demo compares, on top of the configured decoding slice."""
    common = dict(max_len=max_len, min_len=1)
    return {
        "greedy": dataclasses.replace(base, strategy="greedy", beam_size=1, n_best=1, **common),
        "beam5": dataclasses.replace(base, strategy="beam", beam_size=5, n_best=1, **common),
        "sample": dataclasses.replace(base, strategy="sample", beam_size=1, n_best=1, top_k=0,
                                      top_p=0.9, temperature=1.0, **common),
    }


def evaluate(model, batch, cfg: DecodingConfig) -> dict[str, float]:
    t0 = time.perf_counter()
    hyps = decode(model, batch.src, batch.src_lengths, cfg)
    seconds = time.perf_counter() - t0
    best = [h[0] for h in hyps]
    refs = expected_outputs(batch)
    generated = sum(len(h.tokens) for h in best)
    return {
        "exact_match": sum(h.tokens == r for h, r in zip(best, refs)) / len(refs),
        "avg_len": generated / len(best),
        "avg_score": sum(h.score for h in best) / len(best),
        "tokens_per_s": generated / seconds,
    }


def run(job: JobConfig) -> int:
    torch.manual_seed(job.run.seed)
    d = job.demo
    # The toy task has its own tiny vocabulary: specials + ALPHABET ordinary tokens.
    model = build_model(dataclasses.replace(job.model, vocab_size=FIRST_TOKEN + ALPHABET))
    print(f"demo: {job.model.arch}, {model.num_parameters():,} parameters, task={d.task}, {d.steps} steps")
    t0 = time.perf_counter()
    losses = train_toy(model, task=d.task, steps=d.steps, batch_size=d.batch_size, lr=d.lr, alphabet=ALPHABET,
                       min_len=d.min_len, max_len=d.max_len, seed=job.run.seed)
    print(f"trained in {time.perf_counter() - t0:.1f}s: loss {losses[0]:.3f} -> {losses[-1]:.4f}")
    gen = torch.Generator().manual_seed(job.run.seed + 1)
    batch = toy_batch(d.task, d.num_eval, alphabet=ALPHABET, min_len=d.min_len, max_len=d.max_len, generator=gen)
    results = {name: evaluate(model, batch, cfg) for name, cfg in strategies(job.decoding, d.max_len + 1).items()}
    print_table(results)
    save(job, losses, results)
    return 0


def print_table(results: dict[str, dict[str, float]]) -> None:
    print(f"{'strategy':<10}{'exact match':>13}{'avg len':>10}{'avg logp':>10}{'tokens/s':>12}")
    for name, r in results.items():
        print(f"{name:<10}{r['exact_match']:>13.1%}{r['avg_len']:>10.2f}{r['avg_score']:>10.3f}"
              f"{r['tokens_per_s']:>12,.0f}")


def save(job: JobConfig, losses: list[float], results: dict) -> None:
    out = Path(job.run.dir)
    write_config(out, config_container(job))
    with open(out / "metrics.jsonl", "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    print(f"results in {out}/")
