"""Shared test setup: CPU-only defaults and the `gpu` marker."""

from __future__ import annotations

import os

import pytest
import torch

from orchestrator.cluster import local_cluster_environment

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
local_cluster_environment()  # what `seqfoundry` sets for a local cluster, for the clusters the tests start
# Room for a worker group to start while the other test process also starts one (Ray's default: 60 s).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)  # two test processes on two cores: intra-op threads would only contend


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster (2 CPUs) that the test modules of this process share; commands join it instead of
    starting one. Starting a cluster and Ray Train's first run on it cost ~15 s per module, so it is started
    once, and replaced only after a module that left something holding its CPUs."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    if ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
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
