"""`seqfoundry submit` / `jobs` without a cluster: argument handling, config checks before
anything is sent, the uploaded working directory, the address and the auth token."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import jobs
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]


class FakeClient:
    """Stands in for ray.job_submission.JobSubmissionClient and records what it was asked."""

    made: list["FakeClient"] = []
    final_status = "SUCCEEDED"

    def __init__(self, address=None, headers=None, **kwargs):
        import os

        self.address, self.headers = address, headers or {}
        self.env_address = os.environ.get("RAY_ADDRESS")
        self.submitted: list[dict] = []
        FakeClient.made.append(self)

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return "raysubmit_fake"

    async def tail_job_logs(self, job_id):
        yield "step 1/1 loss 1.0\n"

    def get_job_status(self, job_id):
        return self.final_status

    def list_jobs(self):
        return []


@pytest.fixture
def fake_client(monkeypatch):
    import ray.job_submission

    FakeClient.made = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setattr(jobs, "auth_headers", lambda: {})
    return FakeClient


@pytest.fixture
def no_cluster(monkeypatch):
    """Any attempt to reach a cluster fails the test."""
    import ray.job_submission

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was contacted")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", refuse)


@pytest.mark.parametrize("job, key", [
    (["pretrain", "model.num_heads=5"], "model.num_heads"),
    (["pretrain", "trainer.placement_strategy=RANDOM"], "trainer.placement_strategy"),
    (["pretrain", "-m", "trainer.lr=1e-3,-1"], "trainer.lr"),
    (["pretrain", "model.no_such_key=1"], "model.no_such_key"),
    (["jobs", "list"], "command"),
    ([], "command"),
])
def test_bad_job_is_one_line_exit_2_and_nothing_is_submitted(job, key, no_cluster, capsys):
    assert main(["submit", "--address", "http://127.0.0.1:1", "--", *job]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqfoundry submit: error:") and key in err[0], err


def test_submit_uploads_the_project_and_runs_the_cli_in_it(fake_client, tmp_path, capsys):
    code = main(["submit", "--no-wait", "--address", "http://head:8265", "--", "pretrain", "experiment=tiny",
                 f"data.dir={tmp_path / 'data'}", f"run.dir={tmp_path / 'my run'}", "trainer.num_workers=2"])
    assert code == 0
    assert capsys.readouterr().out.strip() == "raysubmit_fake"
    (client,) = fake_client.made
    (sent,) = client.submitted
    assert client.address == "http://head:8265"
    assert sent["entrypoint"] == (f"python -m orchestrator.cli pretrain experiment=tiny data.dir={tmp_path / 'data'} "
                                  f"'run.dir={tmp_path / 'my run'}' trainer.num_workers=2")
    assert sent["runtime_env"]["working_dir"] == str(ROOT)


def test_submit_follows_the_job_and_exits_with_its_outcome(fake_client, tmp_path, capsys, monkeypatch):
    args = ["submit", "--address", "http://head:8265", "--", "demo", "demo.steps=1", f"run.dir={tmp_path}"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == ["raysubmit_fake", "step 1/1 loss 1.0"]
    assert "SUCCEEDED" in out.err
    monkeypatch.setattr(FakeClient, "final_status", "FAILED")
    assert main(args) == 1


def test_excludes_keep_data_runs_and_environments_out_of_the_upload(tmp_path):
    from ray._private.runtime_env.packaging import _get_excludes

    from orchestrator.config import compose_config, to_typed

    job = to_typed(compose_config([f"data.dir={ROOT / 'shards_here'}", f"run.dir={tmp_path / 'run'}"]))
    env = jobs.runtime_env([job])
    excluded = _get_excludes(ROOT, env["excludes"])  # Ray's own matcher
    for path in (".venv", ".git", "data", "data/tiny/shards/a.tar", "runs/p1", "wandb", "outputs",
                 "tests/__pycache__", "seqfoundry.egg-info", "shards_here", "x/shard-000.tar"):
        assert excluded(ROOT / path), path
    for path in ("orchestrator/cli.py", "conf/config.yaml", "data_pipeline/config.py", "trainers/loop.py",
                 "pyproject.toml"):
        assert not excluded(ROOT / path), path


def test_relative_paths_are_flagged(fake_client, capsys):
    assert main(["submit", "--no-wait", "--", "pretrain", "data.dir=data/tiny", "run.dir=/abs/run"]) == 0
    err = capsys.readouterr().err
    assert "warning: data.dir=data/tiny: a relative path" in err and "run.dir" not in err


def test_address_flag_beats_the_environment_which_beats_the_default(fake_client, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://env:8265")
    assert jobs.resolve_address(None) == "http://env:8265"
    assert jobs.resolve_address("http://flag:8265") == "http://flag:8265"
    with jobs.jobs_client("http://flag:8265") as client:
        assert client.address == "http://flag:8265" and client.env_address is None  # Ray cannot swap it
    assert __import__("os").environ["RAY_ADDRESS"] == "http://env:8265"


@pytest.fixture
def token_loader():
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    yield loader
    loader.reset_cache()


def test_token_from_ray_auth_token_goes_in_the_authorization_header(token_loader, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc123")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert jobs.auth_headers() == {"Authorization": "Bearer abc123"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.auth_headers() == {}


def test_token_from_a_file(token_loader, monkeypatch, tmp_path):
    (tmp_path / "token").write_text("fromfile\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert jobs.auth_headers() == {"Authorization": "Bearer fromfile"}


def test_unreachable_cluster_is_one_line_exit_1(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["jobs", "--address", "http://127.0.0.1:1", "status", "raysubmit_x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqfoundry jobs: error: cannot reach") and "127.0.0.1:1" in err[0]


def test_excludes_keep_secrets_out_of_the_upload():
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(ROOT, list(jobs.EXCLUDES))
    for path in (".env", ".env.production", "deploy/.env", "certs/server.pem", "certs/server.key", "auth_token",
                 ".seqfoundry/cluster/auth_token", "cluster/wandb_api_key", "my.token", "ray_token"):
        assert excluded(ROOT / path), path
    for path in ("orchestrator/jobs.py", "data_pipeline/tokenizer.py", "conf/config.yaml", "docs/storage.md"):
        assert not excluded(ROOT / path), path


@pytest.fixture
def with_token(fake_client, monkeypatch):
    monkeypatch.setattr(jobs, "auth_headers", lambda: {"Authorization": "Bearer s3cret"})
    monkeypatch.delenv("SEQFOUNDRY_ALLOW_INSECURE", raising=False)
    return fake_client


DEMO_JOB = ["--", "demo", "demo.steps=1", "run.dir=/abs/run", "data.dir=/abs/data"]


def test_the_token_is_never_sent_over_plain_http_to_another_host(with_token, capsys):
    assert main(["submit", "--no-wait", "--address", "http://head:8265", *DEMO_JOB]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plain HTTP to head" in err[0] and "--allow-insecure" in err[0], err
    assert "s3cret" not in err[0]
    for address in ("http://head:8265", "head:8265", "http://10.0.0.5:8265", "ray://head:10001"):
        assert main(["jobs", "--address", address, "list"]) == 1, address
    assert with_token.made == []  # no client was even made, so nothing was sent


@pytest.mark.parametrize("address", ["https://head:8265", "http://127.0.0.1:8265", "http://localhost:8265",
                                     "http://[::1]:8265", "127.0.0.2:8265"])
def test_https_or_loopback_carries_the_token(with_token, address):
    assert main(["jobs", "--address", address, "list"]) == 0
    assert with_token.made[0].headers == {"Authorization": "Bearer s3cret"}


def test_plain_http_with_a_token_only_when_asked(with_token, monkeypatch):
    assert main(["submit", "--no-wait", "--allow-insecure", "--address", "http://head:8265", *DEMO_JOB]) == 0
    assert main(["jobs", "--allow-insecure", "--address", "http://head:8265", "list"]) == 0
    assert main(["jobs", "--address", "http://head:8265", "list", "--allow-insecure"]) == 0
    assert main(["submit", "--no-wait", "--address", "http://head:8265", *DEMO_JOB,
                 "cluster.allow_insecure=true"]) == 0  # the job's own config key
    monkeypatch.setenv("SEQFOUNDRY_ALLOW_INSECURE", "1")
    assert main(["jobs", "--address", "http://head:8265", "list"]) == 0
    assert len(with_token.made) == 5


def test_no_token_no_check(fake_client):
    assert main(["jobs", "--address", "http://head:8265", "list"]) == 0
