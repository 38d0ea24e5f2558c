"""Connecting to Ray: join `cluster.address`, or start a local cluster."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from .config import ClusterConfig


@contextmanager
def ray_session(cluster: ClusterConfig) -> Iterator[None]:
    """Join `cluster.address`, or start a local cluster; reuse a connection this process already has.

    A cluster started here is shut down on exit; a joined one is only disconnected.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # actors inherit it; training workers set their own
    if cluster.address:
        kwargs = {"address": cluster.address}
    elif os.environ.get("RAY_ADDRESS"):  # inside a Ray job (seqfoundry submit): the job's cluster
        kwargs = {}
    else:  # a fresh local cluster, never one that `ray start` left running on this machine
        kwargs = {"address": "local", "num_cpus": cluster.num_cpus or None}
        local_cluster_environment()
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls.
    ray.init(**kwargs, log_to_driver=True, configure_logging=True,
             logging_level="WARNING", runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]}})
    try:
        yield
    finally:
        ray.shutdown()


def local_cluster_environment() -> None:
    """Settings for a cluster of this one machine, set before it starts (its processes inherit them).

    Ray Train's preemption watcher (one more actor process per run, polling the cluster's drain state)
    watches for cloud nodes being reclaimed: a machine's own cluster is never drained. The user's own
    setting wins.
    """
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def local_cpus(cluster: ClusterConfig) -> int | None:
    """CPUs of the cluster this job will start, or None when it joins an existing one."""
    if cluster.address or os.environ.get("RAY_ADDRESS"):  # inside a Ray job: the cluster's, not this node's
        return None
    return cluster.num_cpus or os.cpu_count() or 1
