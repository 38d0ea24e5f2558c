"""The `serve.*` slice of the job config."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainers.engines import check_engine_keys


@dataclass
class ServeConfig:
    package: str = ""
    """Model package to serve: a folder or an object-storage URL (required by `seqfoundry serve`)."""
    engine: str = "torch"
    """Decoding engine: `torch` (our decoder) or `ctranslate2` (the package converted once, cached beside it)."""
    compute_type: str = "float32"
    """Weights/compute precision: `float32`, or with engine=ctranslate2 also `int8`, `int8_float32`, `bfloat16`."""
    replicas: int = 1
    """Number of replicas (Ray actors) of the deployment; requests are spread over them."""
    max_batch_size: int = 16
    """Most source texts one replica decodes together (dynamic batching, `@serve.batch`)."""
    batch_wait_ms: float = 10.0
    """How long a replica waits for more texts before decoding a batch that is not full."""
    num_cpus: float = 1.0
    """Ray CPUs reserved per replica."""
    threads: int = 0
    """CPU threads one replica decodes with (0 = the engine's default)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy listens on (0.0.0.0 to accept other machines)."""
    port: int = 8000
    """HTTP port of the endpoint."""
    route_prefix: str = "/"
    """URL path of the endpoint."""
    name: str = "seqfoundry"
    """Name of the Ray Serve application (one per served package)."""
    blocking: bool = True
    """Keep the command running (and the endpoint up) until interrupted; false returns after deploying."""

    def __post_init__(self) -> None:
        check_engine_keys(self.engine, self.compute_type, key="serve")
        _check(self.replicas >= 1, "replicas", f"must be >= 1, got {self.replicas}")
        _check(self.max_batch_size >= 1, "max_batch_size", f"must be >= 1, got {self.max_batch_size}")
        _check(math.isfinite(self.batch_wait_ms) and self.batch_wait_ms >= 0, "batch_wait_ms",
               f"must be >= 0, got {self.batch_wait_ms}")
        _check(self.num_cpus > 0, "num_cpus", f"must be > 0, got {self.num_cpus}")
        _check(self.threads >= 0, "threads", f"must be >= 0 (0 = default), got {self.threads}")
        _check(0 <= self.port <= 65535, "port", f"must be in [0, 65535], got {self.port}")
        _check(self.route_prefix.startswith("/"), "route_prefix", f"must start with '/', got {self.route_prefix!r}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"serve.{key}: {message}")
