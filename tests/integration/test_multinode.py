"""`seqfoundry submit` / `jobs` against a real two-node Ray cluster on this machine.

Two `ray start` nodes on loopback (a head with the dashboard's Jobs API and a
worker joined with `--address`), one CPU each, their own ports and temp
folders, token authentication on. A pretraining job submitted with
`seqfoundry submit` places its two workers with STRICT_SPREAD, so each lands
on its own node; checkpoints and the model package go to a shared folder.
Both nodes are stopped at the end, whatever happened.

Never `ray stop` here: it stops every Ray process of the machine, including
other people's clusters. Each node is a `ray start --block` process of ours;
ending it (SIGTERM) tears its node down, and any straggler of its process tree
is killed by pid.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests

from orchestrator.config import compose_config, to_typed

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


# --- a Ray node we own -----------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held together while picking, so no repeats)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port_range(size: int) -> tuple[int, int]:
    """A run of `size` consecutive free ports (Ray's worker ports) away from the ephemeral range."""
    for _ in range(200):
        lo = random.randrange(20000, 30000 - size)
        try:
            with ExitStack() as stack:
                for port in range(lo, lo + size):
                    s = stack.enter_context(closing(socket.socket()))
                    s.bind(("127.0.0.1", port))
            return lo, lo + size - 1
        except OSError:
            continue
    raise RuntimeError("no free port range")


@dataclass
class RayNode:
    """One `ray start --block` process and the Ray processes it spawned."""

    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    tree: set[int] = field(default_factory=set)

    @classmethod
    def start(cls, args: list[str], *, env: dict[str, str], name: str) -> "RayNode":
        temp_dir = Path(tempfile.mkdtemp(prefix=f"sf{name}", dir="/tmp"))  # short: Ray's socket paths
        lo, hi = free_port_range(24)
        nm, om, agent, agent_grpc, rt_env, metrics = free_ports(6)
        cmd = [str(RAY), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
               "--num-cpus=1", "--num-gpus=0", f"--object-store-memory={100 * 2**20}",
               f"--temp-dir={temp_dir}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
               f"--min-worker-port={lo}", f"--max-worker-port={hi}", *args]
        log = temp_dir.with_suffix(".log")
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(proc, temp_dir, log)

    def remember_tree(self) -> None:
        try:
            self.tree |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> None:
        """SIGTERM our `ray start` (it stops its node's processes), then SIGKILL what is left of its tree."""
        self.remember_tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        survivors = [p for p in _processes(self.tree) if p.is_running()]
        for p in survivors:
            p.kill()
        psutil.wait_procs(survivors, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.log.unlink(missing_ok=True)


def _processes(pids: set[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return found


@dataclass
class Cluster:
    head: RayNode
    worker: RayNode
    dashboard: str
    env: dict[str, str]

    def alive_nodes(self) -> list[dict]:
        for node in (self.head, self.worker):
            if node.proc.poll() is not None:
                raise AssertionError(f"`ray start` exited with {node.proc.returncode}\n{self.logs()}")
        r = requests.get(f"{self.dashboard}/api/v0/nodes", timeout=10,
                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def logs(self) -> str:
        nodes = (self.head, self.worker)
        return "\n".join(f"--- {n.log}\n{n.log.read_text()[-3000:]}" for n in nodes if n.log.exists())


def wait_until(check, *, timeout: float, what: str, cluster: Cluster | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (requests.RequestException, KeyError, ValueError):
            result = None
        if result:
            return result
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}\n{cluster.logs() if cluster else ''}")


@pytest.fixture(scope="module")
def cluster(s3_bucket, tmp_path_factory):
    """A head (dashboard, Jobs API) and a worker node on loopback, token authentication on.

    Both nodes reach the session's local S3 server (AWS_* variables) and each has its own
    SEQFOUNDRY_CACHE, as two machines would.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # the job's `python`
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", WANDB_MODE="offline", DS_ACCELERATOR="cpu")
    gcs, dash, client = free_ports(3)
    nodes: list[RayNode] = []
    try:
        head = RayNode.start(["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                              f"--dashboard-port={dash}", f"--ray-client-server-port={client}"],
                             env=dict(env, SEQFOUNDRY_CACHE=str(tmp_path_factory.mktemp("head_cache"))), name="h")
        nodes.append(head)
        url = f"http://127.0.0.1:{dash}"
        probe = Cluster(head, head, url, env)
        wait_until(lambda: len(probe.alive_nodes()) == 1, timeout=180, what="the head node", cluster=probe)
        worker = RayNode.start([f"--address=127.0.0.1:{gcs}"],
                               env=dict(env, SEQFOUNDRY_CACHE=str(tmp_path_factory.mktemp("worker_cache"))), name="w")
        nodes.append(worker)
        c = Cluster(head, worker, url, env)
        wait_until(lambda: len(c.alive_nodes()) == 2, timeout=180, what="2 alive nodes", cluster=c)
        yield c
    finally:
        for node in reversed(nodes):
            node.stop()


def seqfoundry(cluster: Cluster, *args: str, token: str | None = None, timeout: float = 120):
    env = dict(cluster.env, RAY_AUTH_TOKEN=token or cluster.env["RAY_AUTH_TOKEN"])
    env.pop("RAY_AUTH_MODE")  # the CLI sends the token whatever this process's auth mode
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --- the test -----------------------------------------------------------------------------

def test_pretraining_job_spreads_its_workers_over_two_nodes(cluster, tmp_path):
    shared = tmp_path / "shared"  # one machine: any folder is storage both nodes share
    job = to_typed(compose_config(["experiment=tiny", f"data.dir={shared / 'data'}"]))
    from data_pipeline import prepare

    prepare(job.data, progress=False, use_ray=False)
    for node in (cluster.head, cluster.worker):
        node.remember_tree()

    address = ["--address", cluster.dashboard]
    denied = seqfoundry(cluster, "jobs", *address, "list", token="0" * 64)
    assert denied.returncode == 1 and "refused the token" in denied.stderr, denied.stderr
    assert len(denied.stderr.strip().splitlines()) == 1

    sub = seqfoundry(cluster, "submit", *address, "--no-wait", "--", "pretrain", "experiment=tiny",
                     f"data.dir={shared / 'data'}", f"run.dir={shared / 'run'}",
                     f"cluster.storage_path={shared / 'storage'}", "trainer.num_workers=2",
                     "trainer.placement_strategy=STRICT_SPREAD", "trainer.max_steps=4", "trainer.checkpoint_every=2",
                     "trainer.log_every=1", "trainer.warmup_steps=1", "trainer.val_batches=1",
                     "tracking.mode=disabled", "data.num_workers=0")
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().splitlines()[0]
    assert job_id.startswith("raysubmit_")

    try:
        follow = seqfoundry(cluster, "jobs", "logs", job_id, "--follow", *address, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail(f"job {job_id} still running after 10 minutes\n{cluster.logs()}")
    for node in (cluster.head, cluster.worker):
        node.remember_tree()
    status = seqfoundry(cluster, "jobs", *address, "status", job_id)
    assert status.returncode == 0 and status.stdout.split()[0] == "SUCCEEDED", \
        f"{status.stdout}\n{follow.stdout[-5000:]}\n{cluster.logs()}"

    # each rank on its own node
    workers = json.loads((shared / "run" / "workers.json").read_text())
    assert [w["rank"] for w in workers] == [0, 1]
    node_ids = {w["node_id"] for w in workers}
    assert node_ids == {n["node_id"] for n in cluster.alive_nodes()}

    # checkpoints in the shared storage path, the package in the run folder
    steps = sorted(p.name for p in (shared / "storage" / "checkpoints").glob("step_*"))
    assert steps == ["step_00000002", "step_00000004"]
    package = shared / "run" / "model"
    assert (package / "model.safetensors").stat().st_size > 0
    assert json.loads((package / "lineage.json").read_text())["step"] == 4

    # the job's output, streamed and after the fact; the job is listed
    logs = seqfoundry(cluster, "jobs", "logs", job_id, *address)
    assert logs.returncode == 0 and "pretrain: done" in logs.stdout, logs.stdout[-3000:]
    assert "step 4/4" in follow.stdout
    listed = seqfoundry(cluster, "jobs", "list", *address)
    assert any(job_id in line and "SUCCEEDED" in line for line in listed.stdout.splitlines()), listed.stdout


def test_a_job_on_two_nodes_keeps_its_data_checkpoints_and_package_in_a_bucket(cluster, s3_bucket):
    """Issue 6's cluster path: nothing shared but an S3 bucket (a local server); each node its own cache."""
    data, run = f"{s3_bucket}/mn/data", f"{s3_bucket}/mn/run"
    job = to_typed(compose_config(["experiment=tiny", f"data.dir={data}"]))
    from data_pipeline import prepare
    from data_pipeline.storage import as_path

    prepare(job.data, progress=False, use_ray=False)
    address = ["--address", cluster.dashboard]
    sub = seqfoundry(cluster, "submit", *address, "--", "pretrain", "experiment=tiny", f"data.dir={data}",
                     f"run.dir={run}", "trainer.num_workers=2", "trainer.placement_strategy=STRICT_SPREAD",
                     "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.log_every=1",
                     "trainer.warmup_steps=1", "trainer.val_batches=1", "data.num_workers=0", timeout=600)
    assert sub.returncode == 0, f"{sub.stdout[-5000:]}\n{sub.stderr[-2000:]}\n{cluster.logs()}"
    root = as_path(run)
    workers = json.loads((root / "workers.json").read_text())
    assert {w["node_id"] for w in workers} == {n["node_id"] for n in cluster.alive_nodes()}
    assert sorted(p.name for p in (root / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_00000002", "step_00000004"]
    metrics = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert json.loads((root / "model" / "lineage.json").read_text())["step"] == 4
    assert any(p.name.startswith("offline-run-") for p in (root / "wandb").iterdir())
