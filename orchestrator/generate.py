"""`seqfoundry generate package=<model package>`: one source per input line in,
one decoded output per line out, with any decoding strategy, in batches.

    echo "hello world" | seqfoundry generate package=runs/p1/model
    seqfoundry generate package=runs/p1/model decoding=beam decoding.beam_size=4 decoding.n_best=2 \
        generate.format=jsonl generate.input=sources.txt generate.output=out.jsonl
    seqfoundry generate package=runs/p1/model decoding=sample decoding.top_p=0.8 decoding.seed=3
    seqfoundry generate package=runs/p1/model generate.engine=ctranslate2 generate.compute_type=int8

Runs in this process (no Ray): a pipe should not wait for a cluster.  With
`generate.engine=ctranslate2` the package is converted once and cached beside
it (docs/serving.md).  Only
outputs go to standard output; notes go to standard error.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
from pathlib import Path
from typing import IO, Iterator

import torch

from data_pipeline import EOS_ID, detokenize, load_tokenizer, tokenize
from data_pipeline.storage import local_copy
from trainers.decoding import DecodingConfig, Hypothesis
from trainers.engines import Engine, load_engine
from trainers.package import TOKENIZER

from .config import ConfigError, JobConfig
from .preflight import check_package


def run(job: JobConfig) -> int:
    g = job.generate
    package = check_package(g.package, key="generate.package")
    if g.input not in ("", "-") and not Path(g.input).is_file():
        raise ConfigError(f"generate.input: {g.input} not found")
    device = "cuda" if g.device == "cuda" or (g.device == "auto" and torch.cuda.is_available()) else "cpu"
    try:
        engine = load_engine(package, engine=g.engine, compute_type=g.compute_type, device=device, key="generate")
        engine.check(job.decoding)
    except ValueError as err:  # an engine the device or the architecture cannot run, a decoding it cannot express
        raise ConfigError(str(err)) from None
    generator = Generator(engine, load_tokenizer(local_copy(package / TOKENIZER)), job.decoding)
    with _open(g.input, "r", sys.stdin) as source, _open(g.output, "w", sys.stdout) as sink:
        for lines in _batches(source, g.batch_size):
            for line, hyps in zip(lines, generator(lines)):
                sink.write(format_line(line, hyps, generator, g.format) + "\n")
            sink.flush()
    if generator.truncated:
        print(f"generate: {generator.truncated} sources cut to {generator.max_source_len} tokens", file=sys.stderr)
    return 0


class Generator:
    """Text in, hypotheses out (best first), for one engine and one decoding config."""

    def __init__(self, engine: Engine, tokenizer, cfg: DecodingConfig):
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.max_source_len = engine.max_positions or 2**31
        self.truncated = 0

    def __call__(self, lines: list[str]) -> list[list[Hypothesis]]:
        rows = []
        for line in lines:
            ids = tokenize(self.tokenizer, line)
            self.truncated += len(ids) + 1 > self.max_source_len
            rows.append(ids[: self.max_source_len - 1] + [EOS_ID])
        return self.engine.decode(rows, self.cfg)

    def text(self, hyp: Hypothesis) -> str:
        return detokenize(self.tokenizer, hyp.tokens)


def format_line(source: str, hyps: list[Hypothesis], generator: Generator, fmt: str) -> str:
    """`text`: the best output on one line; `jsonl`: every hypothesis with tokens and scores."""
    if fmt == "text":
        return " ".join(generator.text(hyps[0]).splitlines())
    return json.dumps({
        "source": source, "text": generator.text(hyps[0]),
        "hypotheses": [{"text": generator.text(h), "tokens": h.tokens, "score": h.score,
                        "normalized_score": h.normalized_score} for h in hyps],
    }, ensure_ascii=False)


def _batches(source: IO[str], size: int) -> Iterator[list[str]]:
    lines = (line.rstrip("\r\n") for line in source)
    while batch := list(itertools.islice(lines, size)):
        yield batch


@contextlib.contextmanager
def _open(path: str, mode: str, default: IO[str]) -> Iterator[IO[str]]:
    if path in ("", "-"):
        yield default
        return
    with open(path, mode, encoding="utf-8") as f:
        yield f
