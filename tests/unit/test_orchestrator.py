"""The orchestrator's shape and its run state: no import cycles (strings included), one typed Run
whose config hash covers what defines training, checkpoints listed by step, preflight of every
pipeline stage before the first one runs."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import compose_config, to_typed
from orchestrator.runs import CheckpointRoot, config_container, config_sha256
from trainers.models import ModelConfig, build_model, max_positions

ROOT = Path(__file__).resolve().parents[2] / "orchestrator"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The orchestrator modules a file imports: top-level or inside functions, or names as `module:function`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    found.update(re.findall(r"[\"'](orchestrator\.[\w.]+):\w+[\"']", path.read_text()))
    return {m for m in found if m in modules and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle's members (strongly connected components of more than one module, or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_orchestrator_has_no_import_cycle_not_even_through_strings():
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imports_of(f, modules) for f in files}
    assert "orchestrator.jobs" in graph["orchestrator.cli"]  # the string runners are seen
    assert cycles(graph) == []
    cyclic = dict(graph, **{"orchestrator.config": graph["orchestrator.config"] | {"orchestrator.cli"}})
    assert cycles(cyclic)  # and the detector finds one when there is one


def test_workflows_are_subpackages_and_train_is_no_library():
    for package in ("evaluation", "sweep", "pipeline"):
        assert (ROOT / package / "__init__.py").is_file()
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    users = [module_name(f) for f in files if "orchestrator.train" in imports_of(f, modules)]
    assert users == ["orchestrator.commands", "orchestrator.pipeline.command"]  # the command table and the pipeline


def job(*overrides: str):
    return to_typed(compose_config(["experiment=tiny", *overrides]))


def test_config_hash_covers_what_defines_training_and_nothing_else():
    base = config_sha256(config_container(job()))
    for unrelated in ("run.dir=elsewhere", "tracking.mode=disabled", "cluster.num_cpus=1", "resume=true",
                      "chaos.fail_at_step=3", "eval.max_samples=5", "sweep.num_samples=2", "decoding=beam"):
        assert config_sha256(config_container(job(unrelated))) == base, unrelated
    for defining in ("trainer.lr=0.5", "model.dropout=0.3", "data.dir=other", "deepspeed=zero2",
                     "objective=t5", "pretrained=some/package"):
        assert config_sha256(config_container(job(defining))) != base, defining


def test_checkpoint_root_lists_steps_in_order_and_finds_the_latest(tmp_path):
    root = CheckpointRoot.under(str(tmp_path))
    assert root.all() == [] and root.latest() is None
    for step in (20, 5, 100):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "tmp_upload").mkdir()  # not a checkpoint
    assert [CheckpointRoot.step(p) for p in root.all()] == [5, 20, 100]
    assert root.latest().name == "step_00000100"


def test_max_positions_is_the_models_own_answer():
    tiny = dict(vocab_size=50, d_model=16, num_encoder_layers=1, num_decoder_layers=1, num_heads=2, ffn_dim=32)
    transformer = ModelConfig(arch="transformer", max_positions=64, **tiny)
    assert build_model(transformer).max_positions == max_positions(transformer) == 64
    for arch in ("lstm", "gru"):
        rnn = ModelConfig(arch=arch, **tiny)
        assert build_model(rnn).max_positions is None and max_positions(rnn) is None


def test_pipeline_checks_every_stage_before_the_first_one_runs(tmp_path, capsys):
    run = tmp_path / "pipe"
    assert main(["pipeline", "experiment=base", f"run.dir={run}"]) == 2  # ASHA needs validations
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqfoundry pipeline: error: trainer.val_every"), err
    assert not run.exists()  # nothing was prepared or trained
    assert main(["pipeline", "experiment=tiny", f"run.dir={run}", "sweep.grace_period=1000000"]) == 2
    assert "error: sweep.grace_period" in capsys.readouterr().err and not run.exists()


def test_the_pipelines_fine_tunes_train_on_pairs_for_pipeline_finetune_steps(tmp_path):
    from orchestrator.pipeline.command import finetune_job

    job = to_typed(compose_config(["experiment=tiny", "trainer.max_steps=30"]))
    same = finetune_job(job, run_dir=tmp_path / "s", data_dir=tmp_path / "d", pretrained="p")
    assert (same.objective.name, same.trainer.max_steps, same.pretrained) == ("pairs", 30, "p")
    job = to_typed(compose_config(["experiment=tiny", "trainer.max_steps=30", "pipeline.finetune_steps=7"]))
    longer = finetune_job(job, run_dir=tmp_path / "s", data_dir=tmp_path / "d", pretrained="p")
    assert longer.trainer.max_steps == 7 and job.trainer.max_steps == 30  # pretraining keeps its own
    with pytest.raises(Exception, match="pipeline.finetune_steps"):
        to_typed(compose_config(["pipeline.finetune_steps=-1"]))


def test_a_local_cluster_runs_without_the_preemption_watcher_unless_the_user_asks(monkeypatch):
    from orchestrator.cluster import local_cluster_environment

    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    local_cluster_environment()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    local_cluster_environment()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
