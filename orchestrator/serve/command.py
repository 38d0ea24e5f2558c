"""`seqfoundry serve package=<package>`: check, convert once, deploy, (block).

    seqfoundry serve package=runs/p1/model serve.engine=ctranslate2 serve.compute_type=int8 \
        serve.replicas=2 serve.max_batch_size=32 serve.batch_wait_ms=5 decoding=beam
    curl -s 127.0.0.1:8000/ -d '{"text": "hello world", "decoding": {"beam_size": 3}}'
"""

from __future__ import annotations

import sys
import time

from trainers.decoding import DecodingConfig
from trainers.engines import check_engine
from trainers.export_ct2 import ct2_model_for
from trainers.package import PackageError, read_model_config

from .config import ServeConfig


def check(serve_cfg: ServeConfig) -> None:
    """Everything that can be refused before any cluster resource is requested (one-line ValueError)."""
    if not serve_cfg.package:
        raise ValueError("serve.package: is required (seqfoundry serve package=<model package folder>)")
    try:
        cfg = read_model_config(serve_cfg.package)
    except PackageError as err:
        raise ValueError(f"serve.package: {err}") from None
    if serve_cfg.engine == "ctranslate2" and cfg.arch != "transformer":
        raise ValueError(f"serve.engine: ctranslate2 cannot run model.arch={cfg.arch!r} (use serve.engine=torch)")
    check_engine(serve_cfg.engine, serve_cfg.compute_type, key="serve")


def run_job(job) -> int:
    """The `seqfoundry serve` runner: the job's serve, cluster and decoding slices."""
    from ..config import ConfigError

    try:
        check(job.serve)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    run(job.serve, job.cluster, job.decoding)
    return 0


def run(serve_cfg: ServeConfig, cluster_cfg, decoding: DecodingConfig) -> str:
    """Deploy the package behind `http://<serve.host>:<serve.port><serve.route_prefix>`; return that URL.

    cluster_cfg: the job's `cluster` slice (orchestrator.config.ClusterConfig): joins
    cluster.address or starts a local Ray cluster (an already connected process reuses
    its connection).  decoding: the server's default decoding config (requests override
    keys of it).  With engine=ctranslate2 the package is converted here, once, before
    the replicas start (they then find the cached conversion).  With serve.blocking the
    call waits until interrupted (Ctrl-C), then removes the application.
    """
    check(serve_cfg)
    if serve_cfg.engine == "ctranslate2":
        ct2_model_for(serve_cfg.package, serve_cfg.compute_type)
    from ray import serve

    from ..cluster import ray_session

    from .app import build_app

    with ray_session(cluster_cfg):
        serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
        serve.run(build_app(serve_cfg, decoding), name=serve_cfg.name, route_prefix=serve_cfg.route_prefix,
                  blocking=False)
        url = f"http://{serve_cfg.host}:{serve_cfg.port}{serve_cfg.route_prefix}"
        print(f"serve: {serve_cfg.package} ({serve_cfg.engine}, {serve_cfg.compute_type}, "
              f"{serve_cfg.replicas} replica(s)) at {url}", file=sys.stderr)
        if serve_cfg.blocking:
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                serve.delete(serve_cfg.name)
    return url


def stop(serve_cfg: ServeConfig) -> None:
    """Remove the application (and Serve itself when nothing else is deployed)."""
    from ray import serve

    serve.delete(serve_cfg.name)
    if not serve.status().applications:
        serve.shutdown()
