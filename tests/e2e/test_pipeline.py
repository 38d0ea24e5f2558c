"""`seqfoundry pipeline` on experiment=tiny end to end (real Ray, DeepSpeed, Tune,
W&B offline), then a rerun that reuses every stage, and `seqfoundry report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from trainers.package import load_package, sha256_file
from tests.helpers.wandb_offline import offline_runs, records

ray = pytest.importorskip("ray")

FAST = ["trainer.max_steps=6", "trainer.val_every=3", "trainer.checkpoint_every=100", "trainer.log_every=2",
        "trainer.warmup_steps=1", "sweep.num_samples=2", "eval.max_samples=16", "data.num_workers=0",
        "pipeline.compare_scratch=true", "trainer.num_workers=1"]


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline") / "run"
    assert main(["pipeline", "experiment=tiny", f"run.dir={root}", "data.max_documents=12", *FAST]) == 0
    return root


def artifacts(root: Path) -> dict[str, dict]:
    return {a["name"]: a for a in json.loads((root / "pipeline.json").read_text())["artifacts"]}


def test_every_artifact_links_to_its_parents_with_matching_hashes(pipeline_dir):
    arts = artifacts(pipeline_dir)
    assert set(arts) == {"data", "pretrained", "finetuned", "evaluation", "scratch"}
    assert arts["scratch"]["parents"] == ["data"]
    assert arts["data"]["parents"] == []
    assert arts["pretrained"]["parents"] == ["data"]
    assert set(arts["finetuned"]["parents"]) == {"pretrained", "data"}
    assert set(arts["evaluation"]["parents"]) == {"finetuned", "data"}
    files = {"data": "manifest.json", "pretrained": "model.safetensors", "finetuned": "model.safetensors"}
    for name, file in files.items():
        assert arts[name]["sha256"] == sha256_file(Path(arts[name]["path"]) / file), name
    assert arts["evaluation"]["sha256"] == sha256_file(arts["evaluation"]["path"])
    for name in ("pretrained", "finetuned"):
        assert arts[name]["wandb_run_id"], name
    # the sweep fine-tuned on the restoration pairs, not on the pretraining objective
    trial_config = Path(arts["finetuned"]["path"]).parent / "config.yaml"
    assert yaml.safe_load(trial_config.read_text())["objective"]["name"] == "pairs"
    # the fine-tuned package names its parent package and the data it was trained on
    lineage = json.loads((Path(arts["finetuned"]["path"]) / "lineage.json").read_text())
    assert Path(lineage["parent_package"]) == Path(arts["pretrained"]["path"])
    assert lineage["data_manifest_sha256"] == arts["data"]["sha256"]
    load_package(arts["finetuned"]["path"])


def test_results_cover_every_strategy_and_the_artifacts_reach_wandb(pipeline_dir):
    results = json.loads((pipeline_dir / "eval" / "eval_results.json").read_text())
    assert {"greedy", "beam", "sample"} <= set(results["strategies"])
    assert set(results["baselines"]) == {"copy source"}  # restoration data: the copy floor is reported
    for metrics in results["strategies"].values():
        assert 0.0 <= metrics["bleu"] <= 100.0 and metrics["tokens_per_s"] > 0
    logged = {r.artifact.name for path in offline_runs(pipeline_dir) for r in records(path)
              if r.WhichOneof("record_type") == "artifact"}
    assert {name.split("-")[0] for name in logged} >= {"data", "pretrained", "finetuned", "evaluation"}


def test_compare_scratch_reports_the_same_fine_tune_from_random_weights(pipeline_dir):
    """pipeline.compare_scratch: the scratch run is the best trial's config without the pretrained package
    (nothing frozen), and the gain in pipeline.json is the difference of the two evaluations' own numbers."""
    arts = artifacts(pipeline_dir)
    best = yaml.safe_load((Path(arts["finetuned"]["path"]).parent / "config.yaml").read_text())
    scratch = yaml.safe_load((pipeline_dir / "scratch" / "config.yaml").read_text())
    assert scratch["pretrained"] in ("", None) and scratch["trainer"]["freeze"] == "none"
    for key in ("lr", "max_steps", "warmup_steps", "weight_decay"):
        assert scratch["trainer"][key] == best["trainer"][key], key
    assert scratch["model"]["dropout"] == best["model"]["dropout"]
    gain = json.loads((pipeline_dir / "pipeline.json").read_text())["metadata"]["pretraining_gain"]
    ours = json.loads((pipeline_dir / "eval" / "eval_results.json").read_text())
    theirs = json.loads((pipeline_dir / "scratch_eval" / "eval_results.json").read_text())
    assert gain["pretrained"]["bleu"] == ours["strategies"]["greedy"]["bleu"]
    assert gain["scratch"]["bleu"] == theirs["strategies"]["greedy"]["bleu"]
    assert gain["gain"]["bleu"] == pytest.approx(gain["pretrained"]["bleu"] - gain["scratch"]["bleu"])
    assert gain["gain"]["loss"] == pytest.approx(theirs["loss"] - ours["loss"])
    assert Path(json.loads((pipeline_dir / "scratch" / "model" / "lineage.json").read_text())
                .get("parent_package") or "").name == ""  # no parent package: random weights


def test_a_rerun_reuses_every_stage(pipeline_dir):
    before = artifacts(pipeline_dir)
    assert main(["pipeline", "experiment=tiny", f"run.dir={pipeline_dir}", "data.max_documents=12", *FAST]) == 0
    after = artifacts(pipeline_dir)
    for name in before:
        assert after[name]["sha256"] == before[name]["sha256"]
        assert after[name]["reused"], name


def test_report_draws_non_empty_images(pipeline_dir):
    assert main(["report", f"run={pipeline_dir}"]) == 0
    images = sorted((pipeline_dir / "report").glob("*.png"))
    names = {p.name for p in images}
    assert any("training" in n for n in names) and any("sweep" in n for n in names)
    assert any("strategies" in n for n in names)
    for image in images:
        data = image.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, image
