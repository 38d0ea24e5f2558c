"""`seqfoundry submit` and `seqfoundry jobs`: any seqfoundry command as a Ray job.

    seqfoundry submit --address http://head:8265 -- pretrain data.dir=/shared/data run.dir=/shared/runs/p1
    seqfoundry jobs list | status ID | logs ID [--follow] | stop ID

`submit` composes and checks the job's config here first (a bad config is one
line and exit code 2, and nothing is submitted), then hands the project folder
to Ray as the job's `working_dir` (data, runs, .venv, .git and W&B folders left
out) and the cluster runs `python -m orchestrator.cli <command> <overrides>` in
it. Inside the job, `ray_session` joins the job's own cluster (RAY_ADDRESS).

The Jobs API address: `--address`, else RAY_API_SERVER_ADDRESS, else
RAY_ADDRESS, else http://127.0.0.1:8265. A cluster with Ray's token
authentication gets `Authorization: Bearer <token>`, the token found where Ray
looks for it: RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token (RAY_AUTH_MODE=disabled sends none). The token is sent only
over HTTPS or to a loopback address (an SSH tunnel, `kubectl port-forward`);
plain HTTP to another host needs `--allow-insecure` or
SEQFOUNDRY_ALLOW_INSECURE=1, since anyone on the path could read it there.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import shlex
import sys
import time
from contextlib import contextmanager
from urllib.parse import urlsplit
from pathlib import Path
from typing import Iterator

from .config import ConfigError, JobConfig

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The folder uploaded as the job's working_dir: it holds conf/ and the packages, so the job imports them.
Only a source checkout is uploaded; from a non-editable install the job runs the cluster's own seqfoundry."""
EXCLUDES = (
    ".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache", "wandb",
    "/data", "/runs", "/outputs", "*.tar", "*.safetensors",
    ".env", ".env.*", "*.pem", "*.key", "auth_token", "*.token", "*_token", "*_api_key",
)
"""Never uploaded (gitignore syntax, relative to the project folder): prepared data, run folders, environments,
and secrets (.env files, keys and certificates, token files such as a copy of ~/.seqfoundry/cluster)."""
ALLOW_INSECURE_ENV = "SEQFOUNDRY_ALLOW_INSECURE"
"""=1: send the token over plain HTTP to a non-loopback address (as --allow-insecure)."""
PATH_KEYS = ("data.dir", "run.dir", "cluster.storage_path", "pretrained", "eval.package", "generate.package")
"""Config keys naming files the job reads or writes; relative values would land in the job's temporary copy."""
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(RuntimeError):
    """A failure talking to the Ray Jobs API; the message is one line."""


# --- argparse ------------------------------------------------------------------------

def add_address_argument(parser: argparse.ArgumentParser, default: object = None) -> None:
    parser.add_argument("--address", metavar="URL", default=default,
                        help="Ray Jobs API (the dashboard) of the cluster, e.g. http://head:8265; default: "
                             f"$RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else {DEFAULT_ADDRESS}")
    parser.add_argument("--allow-insecure", action="store_true",
                        default=False if default is None else argparse.SUPPRESS,
                        help="send the Ray token over plain HTTP to a non-loopback address (readable by anyone "
                             f"on the path; prefer https:// or a tunnel); also ${ALLOW_INSECURE_ENV}=1")


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example: seqfoundry submit --address http://head:8265 -- pretrain experiment=tiny "
                     "data.dir=/shared/data/tiny run.dir=/shared/runs/p1\n"
                     "Token authentication: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token "
                     "(docs/cluster.md).")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_address_argument(parser)
    parser.add_argument("--no-wait", action="store_true",
                        help="print the job id and return at once instead of following the job's logs")
    parser.add_argument("job", nargs=argparse.REMAINDER, metavar="-- COMMAND [KEY=VALUE ...]",
                        help="the seqfoundry command the job runs, with its Hydra overrides (and -m)")


def add_jobs_arguments(parser: argparse.ArgumentParser) -> None:
    add_address_argument(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add_address_argument(actions.add_parser("list", help="every job of the cluster with its status"),
                         argparse.SUPPRESS)  # accepted after the action too, without hiding one given before it
    for name, text in (("status", "the status of a job"), ("logs", "the output of a job"), ("stop", "stop a job")):
        p = actions.add_parser(name, help=text)
        p.add_argument("job_id", metavar="ID", help="submission id printed by `seqfoundry submit`")
        add_address_argument(p, argparse.SUPPRESS)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream the output until the job ends")


# --- submit ------------------------------------------------------------------------

def run_submit(args: argparse.Namespace) -> int:
    """Check the job's config, then submit it; follow its logs unless --no-wait."""
    return _reporting_errors("submit", _submit, args)


def _submit(args: argparse.Namespace) -> int:
    job_args = args.job[1:] if args.job[:1] == ["--"] else args.job
    jobs = check_job(job_args)
    warn_relative_paths(jobs)
    address = resolve_address(args.address)
    insecure = _allow_insecure(args) or any(job.cluster.allow_insecure for job in jobs)
    with jobs_client(address, allow_insecure=insecure) as client:
        job_id = client.submit_job(entrypoint=entrypoint(job_args), runtime_env=runtime_env(jobs))
        print(job_id, flush=True)
        if args.no_wait:
            print(f"follow it: seqfoundry jobs logs {job_id} --follow --address {address}", file=sys.stderr)
            return 0
        follow_logs(client, job_id)
        status = wait_for_end(client, job_id)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def check_job(job_args: list[str]) -> list[JobConfig]:
    """Every run the job will make, composed and checked as the cluster will (ConfigError)."""
    from .commands import CONFIG_COMMANDS, check_config, config_parser

    names = list(CONFIG_COMMANDS)
    if not job_args or job_args[0] not in names:
        given = repr(job_args[0]) if job_args else "nothing"
        raise ConfigError(f"command: expected `-- COMMAND [KEY=VALUE ...]` with COMMAND one of "
                          f"{', '.join(names)}; got {given}")
    parsed = config_parser().parse_args(job_args)
    return check_config(CONFIG_COMMANDS[parsed.command], parsed.overrides, multirun=getattr(parsed, "multirun", False))


def entrypoint(job_args: list[str]) -> str:
    """The shell command the cluster runs in the uploaded project folder (its working directory)."""
    return "python -m orchestrator.cli " + shlex.join(job_args)


def runtime_env(jobs: list[JobConfig], root: Path = PROJECT_ROOT) -> dict:
    """The project folder as the job's working_dir, without data, runs or environments.

    Folders the job's own config points at are left out too when they lie inside the project.
    """
    if not (root / "conf" / "config.yaml").is_file():  # an installed package, not a project folder
        return {}
    excludes = list(EXCLUDES)
    for job in jobs:
        for value in (job.data.dir, job.run.dir, job.cluster.storage_path):
            inside = _inside(value, root)
            if inside and f"/{inside}" not in excludes:
                excludes.append(f"/{inside}")
    return {"working_dir": str(root), "excludes": excludes}


def _inside(path: str, root: Path) -> str | None:
    if not path or "://" in path:
        return None
    try:
        rel = Path(path).resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return rel.as_posix() if rel.parts else None


def warn_relative_paths(jobs: list[JobConfig]) -> None:
    """Relative paths resolve inside the job's temporary copy of the project on the cluster: say so."""
    found = {}
    for job in jobs:
        for key in PATH_KEYS:
            value = str(_lookup(job, key) or "")
            if value and "://" not in value and not value.startswith("@") and not os.path.isabs(value):
                found.setdefault(key, value)
    if found:
        listed = ", ".join(f"{k}={v}" for k, v in found.items())
        print(f"seqfoundry submit: warning: {listed}: a relative path resolves inside the job's temporary "
              "copy of the project on the cluster (data and runs are not uploaded); use absolute paths on "
              "storage every node shares", file=sys.stderr)


def _lookup(job: JobConfig, key: str) -> object:
    value: object = job
    for part in key.split("."):
        value = getattr(value, part, None)
    return value


def follow_logs(client, job_id: str) -> None:
    """Stream the job's output to stdout until it ends."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job runs on (seqfoundry jobs stop {job_id})", file=sys.stderr)
        raise SystemExit(130) from None


def wait_for_end(client, job_id: str, *, timeout_s: float = 30.0) -> str:
    """The job's final status (the log stream may close a moment before the status is final)."""
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id))
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id))
    return status


# --- jobs -----------------------------------------------------------------------------

def run_jobs(args: argparse.Namespace) -> int:
    return _reporting_errors("jobs", _jobs, args)


def _jobs(args: argparse.Namespace) -> int:
    with jobs_client(resolve_address(args.address), allow_insecure=_allow_insecure(args)) as client:
        if args.action == "list":
            print_job_table(client.list_jobs())
        elif args.action == "status":
            info = client.get_job_info(args.job_id)
            print(info.status)
            if info.message:
                print(info.message)
        elif args.action == "logs":
            if args.follow:
                follow_logs(client, args.job_id)
            else:
                sys.stdout.write(client.get_job_logs(args.job_id))
        elif args.action == "stop":
            stopped = client.stop_job(args.job_id)
            print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0


def print_job_table(jobs: list) -> None:
    rows = [("ID", "STATUS", "STARTED", "ENTRYPOINT")]
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        rows.append((j.submission_id or j.job_id or "-", str(j.status), started, (j.entrypoint or "")[:80]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])


# --- connecting -------------------------------------------------------------------------

def resolve_address(flag: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (as Ray's own job CLI), else the local default."""
    return (flag or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def auth_headers() -> dict[str, str]:
    """`Authorization: Bearer <token>` when a Ray token is found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token — Ray's own loader, same order), unless RAY_AUTH_MODE=disabled.

    Ray's SDK adds the header by itself only when RAY_AUTH_MODE=token is set in this process, but
    `ray start` turns token mode on whenever a token exists; sending it always makes both cases work.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    if not loader.has_token(ignore_auth_mode=True):
        return {}
    return {"Authorization": f"Bearer {loader.get_raw_token(ignore_auth_mode=True).strip()}"}


def _allow_insecure(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "allow_insecure", False)) or os.environ.get(ALLOW_INSECURE_ENV, "") == "1"


def check_transport(address: str, headers: dict[str, str], *, allow_insecure: bool) -> None:
    """JobsError before anything is sent when a token would travel over plain HTTP to another host."""
    if not headers.get("Authorization") or allow_insecure:
        return
    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme == "https" or _is_loopback(parts.hostname or ""):
        return
    raise JobsError(f"refusing to send the Ray token over plain HTTP to {parts.hostname} (anyone on the path "
                    "could read it): use an https:// address, or a tunnel to 127.0.0.1 (ssh -L, kubectl "
                    f"port-forward); or pass --allow-insecure (or set {ALLOW_INSECURE_ENV}=1) on a network "
                    "you trust")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def jobs_client(address: str, *, allow_insecure: bool = False) -> Iterator:
    """A JobSubmissionClient for `address`; Ray's failures become one-line JobsError messages."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers()
    check_transport(address, headers, allow_insecure=allow_insecure)
    try:
        with _env_without("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # Ray would let them override `address`
            client = JobSubmissionClient(address, headers=headers)
        yield client
    except AuthenticationError as err:
        raise JobsError(f"{address} refused the token ({_first_line(err)}): set RAY_AUTH_TOKEN to the "
                        "cluster's token (`ray get-auth-token` on the head node prints it)") from None
    except (ConnectionError, requests.exceptions.ConnectionError) as err:
        raise JobsError(f"cannot reach the Ray Jobs API at {address} ({_first_line(err)}); is the cluster "
                        "up with its dashboard (`ray start --head --include-dashboard=true`)?") from None
    except RuntimeError as err:  # an unknown job id, a rejected request
        raise JobsError(" ".join(str(err).split())[:400]) from None


def _reporting_errors(name: str, func, args: argparse.Namespace) -> int:
    """A cluster that cannot be reached or refuses us: one line on stderr, exit code 1."""
    try:
        return func(args)
    except JobsError as err:
        print(f"seqfoundry {name}: error: {err}", file=sys.stderr)
        return 1


@contextmanager
def _env_without(*names: str) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _first_line(err: BaseException) -> str:
    return next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
