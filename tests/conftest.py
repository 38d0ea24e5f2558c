"""Shared test setup: CPU-only defaults and the `gpu` marker."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray cluster (2 CPUs) for one test module; commands join it instead of starting one."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """experiment=tiny's prepared data, made once per session (without Ray); tests only read it."""
    from tests.helpers.data import prepare_tiny

    return prepare_tiny(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def s3_bucket():
    """`s3://<bucket>` on a local S3 server (moto, loopback only) for the whole session."""
    from tests.helpers.s3 import local_s3

    with local_s3() as bucket:
        yield bucket
