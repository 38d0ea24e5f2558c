"""`seqfoundry serve package=<package>`: a model package behind an HTTP JSON endpoint
(Ray Serve), with dynamic batching, the torch or CTranslate2 engine and replicas.

    config.py   ServeConfig, the typed `serve.*` slice
    app.py      the deployment: request parsing, @serve.batch, the engine
    command.py  run(serve_cfg, cluster_cfg, decoding): connect, convert once, deploy
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
