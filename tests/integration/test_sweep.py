"""`seqfoundry sweep` through the real CLI: Ray Tune trials on a real local Ray
cluster, each a Ray Train x DeepSpeed fine-tune on the CPU, W&B offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.cli import main
from orchestrator.config import compose_config, to_typed
from trainers.models import build_model
from trainers.package import Lineage, load_package, write_package
from tests.helpers.sweep_resume import OPTUNA_BLEU, check_resumed, first_trial_record, killed_driver, sweep_args
from tests.helpers.wandb_offline import folder_run_id, offline_runs, records, run_ids

ray = pytest.importorskip("ray")


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory) -> Path:
    """A package of a freshly initialised tiny model (the sweep does not care how it was trained)."""
    torch.manual_seed(0)
    model = build_model(to_typed(compose_config(["experiment=tiny"])).model)
    return write_package(tmp_path_factory.mktemp("pretrained") / "model", model,
                         tokenizer=tiny_data / "tokenizer.json", lineage=Lineage())


def wandb_group(run_dir: Path) -> set[str]:
    return {r.run.run_group for path in offline_runs(run_dir) for r in records(path)
            if r.WhichOneof("record_type") == "run"}


def test_a_failing_trial_is_reported_and_the_sweep_goes_on(tiny_data, pretrained, tmp_path, capsys):
    run = tmp_path / "sweep"
    code = main(sweep_args(tiny_data, pretrained, run, "sweep.num_samples=1", "trainer.freeze=embeddings",
                           "~sweep.space.trainer.freeze", "+sweep.space.chaos.fail_at_step=[grid,0,1]"))
    out = capsys.readouterr().out
    assert code == 0

    results = json.loads((run / "sweep_results.json").read_text())
    assert results["num_trials"] == 2 and results["metric"] == "val_loss"
    by_fail = {t["config"]["chaos.fail_at_step"]: t for t in results["trials"]}
    good, bad = by_fail[0], by_fail[1]
    assert {"trainer.lr", "model.dropout"} <= set(good["config"])

    assert good["status"] == "TERMINATED" and good["error"] is None
    assert good["metrics"]["step"] == 4 and good["metrics"]["val_loss"] > 0
    assert bad["status"] == "ERROR" and bad["package"] is None
    assert bad["error"] and "died" in bad["error"].lower(), bad["error"]  # the SIGKILLed worker, in one line
    for t in (good, bad):
        assert f"trial_{t['trial_id']}" in out and t["status"] in out

    assert results["best"]["trial_id"] == good["trial_id"]
    package = Path(results["best"]["package"])
    assert package == run / f"trial_{good['trial_id']}" / "model"
    assert load_package(package).config.dropout == good["config"]["model.dropout"]
    before, after = load_file(pretrained / "model.safetensors"), load_file(package / "model.safetensors")
    assert torch.equal(before["embed.weight"], after["embed.weight"])  # trainer.freeze=embeddings
    assert any(not torch.equal(before[k], after[k]) for k in before)

    rows = [json.loads(line) for line in (Path(good["dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert any("val_loss" in r for r in rows)
    for t in (good, bad):  # one W&B run per trial (opened again to log the package), all in the sweep's group
        assert {folder_run_id(p) for p in offline_runs(t["dir"])} == {t["wandb_run_id"]}
        assert "group: sweep" in (Path(t["dir"]) / "config.yaml").read_text()
    logged = artifacts(good["dir"])  # the trial's package, and the sweep's best from the best trial's run
    assert logged[f"model-trial_{good['trial_id']}"].type == "model" and "best" in logged["model-sweep"].aliases
    assert {e.ref for e in logged["model-sweep"].manifest.contents} >= {(package / "model.safetensors").as_uri()}
    assert not artifacts(bad["dir"])
    # (the killed trial's W&B writer died with its worker before flushing any record)
    assert run_ids(good["dir"]) == {good["wandb_run_id"]} and wandb_group(Path(good["dir"])) == {run.name}

    assert not live_placement_groups()


def artifacts(run_dir) -> dict:
    return {r.artifact.name: r.artifact for path in offline_runs(run_dir) for r in records(path)
            if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"}


def live_placement_groups() -> set[str]:
    return {pg["placement_group_id"] for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"}


def test_asha_stops_a_lagging_trial_and_releases_its_workers(tiny_data, pretrained, tmp_path):
    """One trial at a time: lr=3e-3 runs out first; lr=1e-9 trails it at the step-2 rung and is stopped."""
    run, live_before = tmp_path / "sweep", live_placement_groups()  # the cluster is shared with other modules
    code = main(sweep_args(tiny_data, pretrained, run, "sweep.num_samples=1", "sweep.max_concurrent=1",
                           "~sweep.space.model", "~sweep.space.trainer.freeze",
                           "sweep.space.trainer.lr=[grid,3e-3,1e-9]"))
    assert code == 0
    results = json.loads((run / "sweep_results.json").read_text())
    by_lr = {t["config"]["trainer.lr"]: t for t in results["trials"]}
    assert by_lr[3e-3]["status"] == "TERMINATED" and by_lr[3e-3]["metrics"]["step"] == 4
    stopped = by_lr[1e-9]
    assert stopped["status"] == "EARLY_STOPPED" and stopped["metrics"]["step"] == 2, stopped
    assert stopped["package"] is None and stopped["error"] is None
    assert stopped["metrics"]["val_loss"] > by_lr[3e-3]["metrics"]["val_loss"]
    assert results["best"]["trial_id"] == by_lr[3e-3]["trial_id"]
    assert live_placement_groups() == live_before  # the stopped trial's TorchTrainer was aborted, not orphaned


@pytest.mark.parametrize("override, needle", [
    ("sweep.space.trainer.lr=[loguniform,0,1]", "sweep.space.trainer.lr: loguniform needs 0 < low"),
    ("+sweep.space.trainer.lrr=[choice,1]", "sweep.space.trainer.lrr"),
    ("+sweep.space.trainer.warmup_steps=[choice,10,-1]", "sweep.space.trainer.warmup_steps: -1 is refused"),
    ("+sweep.space.model.d_model=[choice,32]", "sweep.space.model.d_model: a fine-tune keeps"),
    ("sweep.scheduler=hyperband", "sweep.scheduler"),
    ("trainer.val_every=0", "trainer.val_every: ASHA"),
])
def test_a_bad_sweep_config_is_one_line_with_exit_2(override, needle, tiny_data, pretrained, tmp_path, capsys):
    run = tmp_path / "sweep"
    assert main(sweep_args(tiny_data, pretrained, run, override)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqfoundry sweep: error:") and needle in err[0], err
    assert not run.exists()  # refused before anything was written or requested


@pytest.mark.parametrize("arch", ["transformer", "gru"])
def test_freeze_leaves_the_named_parameters_untrained(arch):
    from trainers.loop import freeze_parameters

    cfg = to_typed(compose_config(["experiment=tiny", f"model={arch}"])).model
    model = build_model(cfg)
    assert freeze_parameters(model, "none") == 0 and all(p.requires_grad for p in model.parameters())
    frozen = freeze_parameters(model, "encoder")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    encoder = ("encoder.", "enc_")  # the layers and, in the Transformer, its final norm
    assert frozen == sum(p.numel() for n, p in model.named_parameters() if n.startswith(encoder))
    assert "embed.weight" in trainable and not any(n.startswith(encoder) for n in trainable)
    assert freeze_parameters(build_model(cfg), "embeddings") == cfg.vocab_size * cfg.d_model


def test_a_bleu_ranked_optuna_sweep_killed_after_its_first_trial_resumes_without_rerunning_it(
        tiny_data, pretrained, tmp_path):
    """Trial one runs out; the driver is SIGKILLed while trial two runs; `resume=true` restores the
    Tuner: trial one is not run again, trial two continues, and BLEU (max) picks the best.
    (tests/integration/test_object_storage.py does the same with run.dir in a bucket.)"""
    run = tmp_path / "sweep"
    args = sweep_args(tiny_data, pretrained, run, *OPTUNA_BLEU)
    killed_driver(args, run, log=tmp_path / "killed_driver.log")
    before = first_trial_record(run)

    assert main([*args, "resume=true"]) == 0
    check_resumed(run, before)
    assert not live_placement_groups()
