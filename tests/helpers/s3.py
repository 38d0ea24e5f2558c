"""A local S3-compatible server (moto) on loopback, for the object-storage tests."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

BUCKET = "seqfoundry-test"


@contextmanager
def local_s3(bucket: str = BUCKET) -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1, point AWS's environment variables at it, yield `s3://<bucket>`.

    Everything that reads the environment after this (s3fs, pyarrow, Ray workers
    started later, CLI subprocesses) talks to the local server.
    """
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()  # an earlier instance would keep another endpoint
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
