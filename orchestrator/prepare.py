"""`seqfoundry prepare`: corpus → tokenizer.json + WebDataset shards + manifest.json in data.dir.

    seqfoundry prepare                                   # the built-in corpus into data/builtin
    seqfoundry prepare experiment=tiny data.dir=/tmp/d   # a few seconds on a CPU
    seqfoundry prepare data=pairs 'data.sources=[pairs/*.jsonl]' data.dir=data/mypairs
    seqfoundry prepare cluster.address=auto              # tokenize on a running Ray cluster
    seqfoundry prepare data.format=lines 'data.sources=[s3://bucket/corpus/*.txt.gz]' data.task=text

Everything that can be wrong with the config, the sources or the target
folder is checked before Ray starts (one line, exit code 2).
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline.prepare import plan as plan_prepare
from data_pipeline.prepare import run as run_prepare

from .cluster import ray_session
from .config import ConfigError, JobConfig


def run(job: JobConfig) -> int:
    try:
        plan = plan_prepare(job.data)
    except ValueError as err:  # data.* messages: a bad source, a foreign folder, a bad tokenizer
        raise ConfigError(str(err)) from None
    if plan.up_to_date:
        print(f"prepare: {plan.folder} already holds this dataset (manifest.json verified)")
        return 0
    with ray_session(job.cluster):
        try:
            manifest = run_prepare(plan, progress=True)
        except ValueError as err:  # found while reading: a malformed line, a missing field, no text left
            raise ConfigError(str(err)) from None
    print(summary(manifest.data, plan.folder))
    return 0


def summary(manifest: dict, folder: Path) -> str:
    splits = ", ".join(f"{name} {s['num_samples']}" for name, s in manifest["splits"].items())
    line = (f"prepared {folder}: {manifest['num_samples']} samples ({splits}), {manifest['num_tokens']} tokens, "
            f"{len(manifest['shards'])} shards, vocabulary {manifest['vocab_size']}")
    if "filters" in manifest:
        dropped = ", ".join(f"{k} {v}" for k, v in manifest["filters"]["dropped"].items() if v) or "none"
        line += f"; filters dropped: {dropped} (of {manifest['filters']['read']} read)"
    return line
