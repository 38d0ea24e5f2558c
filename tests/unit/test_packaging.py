"""A non-editable install (a wheel, as in a container image) carries the Hydra configs and works
outside the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):  # a copy: setuptools writes build/ into the source folder
        shutil.copy(ROOT / name, src / name)
    for name in ("conf", "orchestrator", "trainers", "data_pipeline"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(src), "--no-deps", "--no-build-isolation",
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    return next(out.glob("seqfoundry-*.whl"))


def test_the_wheel_carries_every_config_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"seqfoundry_conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected and expected <= names


def test_an_installed_wheel_composes_configs_outside_the_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import orchestrator, orchestrator.config as c, orchestrator.jobs as j;"
            "print(orchestrator.__file__); print(c.CONF_DIR);"
            "print(c.to_typed(c.compose_config(['experiment=tiny', 'model=gru'])).model.arch);"
            "print(j.runtime_env([]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    module, conf, arch, env = out.stdout.split("\n")[:4]
    assert module.startswith(str(site)) and conf.startswith(str(site)), out.stdout
    assert arch == "gru"
    assert env == "{}"  # `submit` from an installed package uploads no working_dir: the cluster's own install runs
