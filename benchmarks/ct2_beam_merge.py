"""How far CTranslate2 beam search departs from our decoder, with sources of different length limits
decoded in one call (the engine's way) or one call a limit (before): n-best lists and best hypotheses
that differ from ours, on random tiny Transformers (the tests' `tiny_model`, where searches often reach
their limits), 12 seeds x 3 eos scales x 3 beam settings x 24 sources.

    python benchmarks/ct2_beam_merge.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.tiny_package import sources, tiny_model, tiny_package  # noqa: E402
from trainers.decoding import DecodingConfig  # noqa: E402
from trainers.engines import CTranslate2Engine, load_engine  # noqa: E402

CONFIGS = [DecodingConfig(strategy="beam", beam_size=5, n_best=5, max_len_a=0.8, max_len_b=3),
           DecodingConfig(strategy="beam", beam_size=5, n_best=5, max_len_a=1.5, max_len_b=6),
           DecodingConfig(strategy="beam", beam_size=4, n_best=4, max_len_a=1.0, max_len_b=4, length_penalty=1.0,
                          early_stopping=True)]


def by_limit(engine: CTranslate2Engine, rows: list[list[int]], cfg: DecodingConfig) -> list:
    """The engine's decode, one call a limit (each call sees one limit, so nothing is merged)."""
    out: list = [None] * len(rows)
    limits = engine.limits(rows, cfg)
    for limit in sorted(set(limits)):
        index = [i for i, n in enumerate(limits) if n == limit]
        for i, hyps in zip(index, engine.decode([rows[i] for i in index], cfg)):
            out[i] = hyps
    return out


def main() -> None:
    torch.set_num_threads(1)
    counts = {"one call": [0, 0], "a call a limit": [0, 0]}
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(12):
            for eos_scale in (1.0, 2.5, 4.0):
                package = tiny_package(Path(tmp) / f"{seed}-{eos_scale}", tiny_model(seed=seed, eos_scale=eos_scale))
                ours, ct2 = load_engine(package), load_engine(package, engine="ctranslate2", threads=1)
                rows = sources(24, seed=seed + 7, max_len=14)
                for cfg in CONFIGS:
                    ref = ours.decode(rows, cfg)
                    for name, got in (("one call", ct2.decode(rows, cfg)), ("a call a limit", by_limit(ct2, rows, cfg))):
                        counts[name][0] += sum([h.tokens for h in g] != [h.tokens for h in r] for g, r in zip(got, ref))
                        counts[name][1] += sum(g[0].tokens != r[0].tokens for g, r in zip(got, ref))
                    total += len(rows)
    print(f"{'CTranslate2 beam':<16} {'n-best lists != ours':>21} {'best != ours':>13}   (of {total} sources)")
    for name, (nbest, best) in counts.items():
        print(f"{name:<16} {nbest:>21} {best:>13}")


if __name__ == "__main__":
    main()
