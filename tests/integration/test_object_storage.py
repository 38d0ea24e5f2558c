"""Object storage (issue 6): prepare to S3, stream from S3, checkpoint to S3, resume from S3; sweeps and
the pipeline with a run.dir in S3 (issue 15).

A real S3-compatible server (moto) runs on loopback for the session; s3fs,
pyarrow (Ray Train's storage) and the Ray workers all reach it through
`AWS_ENDPOINT_URL`. The local cache (`SEQFOUNDRY_CACHE`) is wiped between
runs, so a resume sees only what the bucket holds, as on another machine.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from data_pipeline import CorruptShardWarning, Manifest, ShardStream
from data_pipeline.shards import read_shard
from data_pipeline.storage import as_path, download_tree, local_copy, sha256_file
from orchestrator.cli import main
from tests.helpers.data import prepare_tiny
from tests.helpers.sweep_resume import OPTUNA_BLEU, check_resumed, first_trial_record, killed_driver, sweep_args
from tests.helpers.wandb_offline import history, run_ids
from trainers.package import load_package, read_lineage

pytest.importorskip("s3fs")
pytest.importorskip("moto")


def keys(stream) -> list[str]:
    return [s["__key__"] for s in stream]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in as_path(path).read_text().splitlines() if line.strip()]


# --- data: prepare to S3, stream from S3 ------------------------------------------------------

@pytest.fixture(scope="module")
def local_and_s3_data(s3_bucket, tmp_path_factory) -> tuple[Path, str]:
    local = prepare_tiny(tmp_path_factory.mktemp("data") / "tiny")
    remote = f"{s3_bucket}/data/tiny"
    prepare_tiny(remote)
    return local, remote


def test_prepare_to_s3_writes_the_same_dataset(local_and_s3_data):
    local, remote = local_and_s3_data
    here, there = Manifest.load(local), Manifest.load(remote)
    assert there.is_remote and str(there.path) == f"{remote}/manifest.json"
    assert there.data["fingerprint"] == here.data["fingerprint"]
    assert [s["sha256"] for s in there.data["shards"]] == [s["sha256"] for s in here.data["shards"]]
    assert sorted(p.name for p in as_path(remote).iterdir()) == ["manifest.json", "shards", "tokenizer.json"]
    assert there.local_tokenizer_path().read_bytes() == here.tokenizer_path.read_bytes()


def test_prepare_to_s3_again_reuses_the_intact_dataset(local_and_s3_data, capsys):
    _, remote = local_and_s3_data
    before = as_path(f"{remote}/manifest.json").stat().st_mtime
    prepare_tiny(remote)
    assert "up to date" in capsys.readouterr().err
    assert as_path(f"{remote}/manifest.json").stat().st_mtime == before


@pytest.mark.parametrize("world_size", [1, 2])
def test_stream_from_s3_equals_stream_from_disk(local_and_s3_data, world_size):
    local, remote = local_and_s3_data
    for rank in range(world_size):
        a = ShardStream(remote, rank=rank, world_size=world_size, seed=3, split="train")
        b = ShardStream(local, rank=rank, world_size=world_size, seed=3, split="train")
        assert keys(a) == keys(b) and len(keys(a)) > 0


def test_stream_resumes_from_a_state_over_s3(local_and_s3_data):
    _, remote = local_and_s3_data
    full = keys(ShardStream(remote, rank=0, world_size=1, seed=5, split="train"))
    first = ShardStream(remote, rank=0, world_size=1, seed=5, split="train")
    it = iter(first)
    head = [next(it)["__key__"] for _ in range(7)]
    resumed = ShardStream(remote, rank=0, world_size=1, seed=5, split="train")
    resumed.load_state_dict(first.state_dict(consumed=7))
    assert head + keys(resumed) == full


def test_altered_and_missing_shards_in_s3_are_skipped_and_counted(s3_bucket, tmp_path):
    remote = f"{s3_bucket}/data/damaged"
    prepare_tiny(remote)
    shards = Manifest.load(remote).shards("train")
    assert len(shards) >= 3
    altered, missing = shards[0].path, shards[1].path
    bad_keys = {s["__key__"] for info in shards[:2] for s in read_shard(info.path, expect_samples=info.samples)}
    data = bytearray(altered.read_bytes())
    data[700] ^= 0xFF  # same size: only the sha256 (checked as the shard is read) can tell
    altered.write_bytes(bytes(data))
    missing.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = ShardStream(remote, rank=0, world_size=1, seed=0, split="train")
        seen = keys(stream)
    assert stream.num_bad_shards == 2
    messages = " ".join(str(w.message) for w in caught if issubclass(w.category, CorruptShardWarning))
    assert f"{missing}: missing" in messages and f"{altered}: sha256 differs" in messages
    assert seen and not bad_keys & set(seen)


# --- training: checkpoints to S3, resume from S3 -----------------------------------------------

@pytest.fixture(scope="module")
def ray_with_s3(s3_bucket, tmp_path_factory):
    """A local Ray cluster whose workers inherit the S3 endpoint and a cache folder this module can wipe."""
    import ray

    cache = tmp_path_factory.mktemp("cache")
    saved = os.environ.get("SEQFOUNDRY_CACHE")
    os.environ["SEQFOUNDRY_CACHE"] = str(cache)
    ray.shutdown()  # its workers must see SEQFOUNDRY_CACHE: not the shared cluster (conftest local_ray)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield cache
    ray.shutdown()
    if saved is None:
        os.environ.pop("SEQFOUNDRY_CACHE", None)
    else:
        os.environ["SEQFOUNDRY_CACHE"] = saved


def wipe(cache: Path) -> None:
    """Forget every local copy: the next command sees only the bucket, as on a fresh machine."""
    shutil.rmtree(cache)
    cache.mkdir()


def pretrain(data: str, run: str, *extra: str) -> int:
    return main(["pretrain", "experiment=tiny", f"data.dir={data}", f"run.dir={run}", "trainer.num_workers=2",
                 "trainer.log_every=1", "trainer.checkpoint_every=2", "trainer.warmup_steps=1",
                 "data.num_workers=0", *extra])


def test_pretrain_checkpoints_to_s3_and_resumes_from_s3_on_a_fresh_machine(ray_with_s3, local_and_s3_data,
                                                                          s3_bucket, capsys):
    _, data = local_and_s3_data
    run = f"{s3_bucket}/runs/p1"
    # A run that dies after step 4 (a worker is killed and no restart is allowed): the bucket keeps it.
    assert pretrain(data, run, "trainer.max_steps=6", "chaos.fail_at_step=4", "trainer.max_failures=0") == 1
    err = capsys.readouterr().err
    assert "checkpoints kept in s3://" in err
    root = as_path(run)
    logged = [m["step"] for m in read_jsonl(root / "metrics.jsonl") if "loss" in m] \
        if (root / "metrics.jsonl").is_file() else []
    # (once, on a loaded fresh clone, the bucket held no checkpoint here: say how far the run got, and why it ended)
    assert sorted(p.name for p in (root / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_00000002", "step_00000004"], (logged, err[-2000:])
    assert {"config.yaml", "run.json", "metrics.jsonl", "workers.json"} <= {p.name for p in root.iterdir()}
    first_id = json.loads((root / "run.json").read_text())["wandb_run_id"]

    wipe(ray_with_s3)  # another machine: nothing local survives
    assert pretrain(data, run, "trainer.max_steps=6", "resume=true") == 0
    info = json.loads((root / "run.json").read_text())
    assert info["wandb_run_id"] == first_id and info["resumed"] == 1
    steps = [m["step"] for m in read_jsonl(root / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # the steps before the resume came back from the bucket
    assert {"model", "wandb"} <= {p.name for p in root.iterdir()}
    assert read_lineage(f"{run}/model").step == 6 and read_lineage(f"{run}/model").wandb_run_id == first_id
    resumed = load_package(f"{run}/model")
    wandb_copy = ray_with_s3.parent / "wandb_copy"
    download_tree(root / "wandb", wandb_copy / "wandb")  # W&B offline runs of both machines, in the bucket
    assert run_ids(wandb_copy) == {first_id}
    logged = {row["_step"] for row in history(wandb_copy) if "loss" in row}
    assert logged == set(range(1, 7))  # the killed machine's steps 1-4 too: written and pushed at its checkpoint

    # The same 6 steps without the interruption give the same weights (to rounding, see test_train).
    straight = f"{s3_bucket}/runs/straight"
    assert pretrain(data, straight, "trainer.max_steps=6") == 0
    for (name, a), b in zip(resumed.state_dict().items(), load_package(f"{straight}/model").state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-3, msg=name)

    wipe(ray_with_s3)
    kept = sorted(p.name for p in (root / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000004", "step_00000006"]  # trainer.keep_last=2, in the bucket too
    assert main(["export", f"run.dir={run}", "export.tag=step_00000004", f"export.out={s3_bucket}/exports/p1"]) == 0
    assert read_lineage(f"{s3_bucket}/exports/p1").step == 4


def test_finetune_and_evaluate_a_package_in_s3(ray_with_s3, local_and_s3_data, s3_bucket):
    _, data = local_and_s3_data
    package = f"{s3_bucket}/runs/p1/model"
    if not as_path(package).is_dir():
        pytest.skip("needs the pretraining test's package")
    run = f"{s3_bucket}/runs/f1"
    assert main(["finetune", "experiment=tiny", f"pretrained={package}", f"data.dir={data}", f"run.dir={run}",
                 "trainer.num_workers=1", "trainer.max_steps=2", "trainer.checkpoint_every=100",
                 "data.num_workers=0"]) == 0
    assert read_lineage(f"{run}/model").parent_package == package

    # Evaluate the fine-tuned package straight from the bucket, results back into it.
    out = f"{s3_bucket}/evals/f1"
    assert main(["evaluate", f"package={run}/model", "data.dir=@package", f"run.dir={out}", "eval.max_samples=8",
                 "eval.strategies=[greedy]"]) == 0
    results = json.loads(as_path(f"{out}/eval_results.json").read_text())
    assert results["package"]["path"] == f"{run}/model"
    assert results["counts"]["samples"] == 8 and "greedy" in results["strategies"]
    assert len(read_jsonl(f"{out}/eval_outputs.jsonl")) == 8


def test_a_missing_bucket_path_is_one_line_naming_data_dir(s3_bucket, tmp_path, capsys):
    code = main(["pretrain", "experiment=tiny", f"data.dir={s3_bucket}/no/such/data", f"run.dir={tmp_path}/r"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.dir" in err[0] and f"{s3_bucket}/no/such/data" in err[0]


@pytest.mark.parametrize("command, key", [
    (["prepare", "experiment=tiny", "data.dir=s3://no-such-bucket/data"], "data.dir"),
    (["pretrain", "experiment=tiny", "DATA", "run.dir=s3://no-such-bucket/runs/r"], "run.dir"),
    (["pretrain", "experiment=tiny", "DATA", "RUN", "cluster.storage_path=s3://no-such-bucket/c"],
     "cluster.storage_path"),
    (["sweep", "experiment=tiny", "DATA", "pretrained=PKG", "run.dir=s3://no-such-bucket/sweeps/s"], "run.dir"),
    (["pipeline", "experiment=tiny", "run.dir=s3://no-such-bucket/pipelines/p"], "run.dir"),
])
def test_a_bucket_that_cannot_be_written_is_refused_before_any_work(command, key, local_and_s3_data, tmp_path,
                                                                   capsys):
    _, data = local_and_s3_data
    args = [{"DATA": f"data.dir={data}", "RUN": f"run.dir={tmp_path}/r"}.get(a, a) for a in command]
    assert main([a.replace("PKG", str(tmp_path / "package")) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"seqfoundry {command[0]}: error: {key}: ")
    assert "no-such-bucket" in err[0]
    assert not (tmp_path / "r").exists()


def test_a_pipeline_in_s3_refuses_evaluation_during_training_before_its_first_stage(s3_bucket, capsys):
    run = f"{s3_bucket}/pipelines/during"
    assert main(["pipeline", "experiment=tiny", f"run.dir={run}", "eval.during_training=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqfoundry pipeline: error: eval.during_training: ") and run in err[0]
    assert not as_path(run).exists()


def test_report_still_needs_a_local_folder_and_names_the_commands_that_take_a_url(capsys):
    assert main(["report", "run=s3://bucket/pipelines/p"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run: report needs a local or shared folder" in err[0]
    assert "sweep, pipeline" in err[0]


@pytest.mark.parametrize("command, key", [
    (["prepare", "experiment=tiny", "data.dir=gs://bucket/data"], "data.dir"),
    (["sweep", "experiment=tiny", "pretrained=p", "run.dir=gs://bucket/data"], "run.dir"),
    (["pipeline", "experiment=tiny", "run.dir=gs://bucket/data"], "run.dir"),
])
def test_a_scheme_without_its_filesystem_is_one_line(command, key, capsys):
    pytest.importorskip("upath")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{key}: gs://bucket/data" in err[0] and "gcsfs" in err[0], err


# --- pipeline and sweep with a bucket run.dir ---------------------------------------------------

PIPELINE = ["pipeline", "experiment=tiny", "data.max_documents=12", "trainer.num_workers=1", "trainer.max_steps=4",
            "trainer.val_every=2", "trainer.checkpoint_every=100", "trainer.log_every=1", "trainer.warmup_steps=1",
            "eval.max_samples=8", "eval.strategies=[greedy]", "data.num_workers=0"]
"""tests/e2e/test_pipeline.py's FAST run, smaller still (one worker, 4 steps, greedy decoding only, no scratch
comparison); its sweep stage is sweep=tiny's two trials, run at once, as in tests/integration/test_sweep.py."""


@pytest.fixture(scope="module")
def s3_pipeline(ray_with_s3, s3_bucket) -> str:
    """`seqfoundry pipeline run.dir=s3://...` once; the tests below read what it left in the bucket only."""
    run = f"{s3_bucket}/pipelines/demo"
    assert main([*PIPELINE, f"run.dir={run}"]) == 0
    wipe(ray_with_s3)  # what follows sees the bucket, as another machine would
    return run


def lineage_record(run: str) -> dict[str, dict]:
    return {a["name"]: a for a in json.loads(as_path(f"{run}/pipeline.json").read_text())["artifacts"]}


def test_a_pipeline_in_s3_links_every_artifact_in_the_bucket(s3_pipeline):
    run, arts = s3_pipeline, lineage_record(s3_pipeline)
    assert set(arts) == {"data", "pretrained", "finetuned", "evaluation"}
    assert arts["data"]["path"] == f"{run}/data" and arts["pretrained"]["path"] == f"{run}/pretrain/model"
    assert arts["finetuned"]["path"].startswith(f"{run}/sweep/trial_")
    assert arts["evaluation"]["path"] == f"{run}/eval/eval_results.json"
    files = {"data": "/manifest.json", "pretrained": "/model.safetensors", "finetuned": "/model.safetensors",
             "evaluation": ""}
    for name, file in files.items():
        assert arts[name]["sha256"] == sha256_file(arts[name]["path"] + file), name
        assert not arts[name]["reused"], name
    for name in ("pretrained", "finetuned", "evaluation"):
        assert arts[name]["wandb_run_id"], name
    assert read_lineage(arts["finetuned"]["path"]).parent_package == arts["pretrained"]["path"]
    assert read_lineage(arts["finetuned"]["path"]).data_manifest_sha256 == arts["data"]["sha256"]
    results = json.loads(as_path(arts["evaluation"]["path"]).read_text())
    assert results["package"]["path"] == arts["finetuned"]["path"] and results["counts"]["samples"] == 8
    assert as_path(f"{run}/wandb").is_dir()  # the lineage's W&B runs, pushed from the run folder's mirror


def test_a_sweep_in_s3_keeps_tune_state_trials_and_best_package_in_the_bucket(s3_pipeline, capsys):
    """The pipeline's sweep stage (`seqfoundry sweep run.dir=s3://.../sweep`): read back from the bucket;
    resume=true on the finished sweep restores Tune's state from the bucket and runs no trial again."""
    sweep = f"{s3_pipeline}/sweep"
    root = as_path(sweep)
    results = json.loads((root / "sweep_results.json").read_text())
    assert results["dir"] == sweep and results["pretrained"] == f"{s3_pipeline}/pretrain/model"
    assert results["num_trials"] == 2 and (root / "config.yaml").is_file()
    for t in results["trials"]:
        assert t["dir"] == f"{sweep}/trial_{t['trial_id']}" and t["status"] in ("TERMINATED", "EARLY_STOPPED")
        rows = read_jsonl(f"{t['dir']}/metrics.jsonl")
        steps = [r["step"] for r in rows if "loss" in r]
        assert steps == [1, 2, 3, 4][:len(steps)] and len(steps) >= 2, steps  # ASHA may stop one after step 2
        assert 2 in [r["step"] for r in rows if "val_loss" in r]
        assert json.loads(as_path(f"{t['dir']}/run.json").read_text())["wandb_run_id"] == t["wandb_run_id"]
        assert f"dir: {t['dir']}" in as_path(f"{t['dir']}/config.yaml").read_text()
    best = results["best"]
    assert best["status"] == "TERMINATED" and best["package"] == f"{best['dir']}/model"
    assert best["package"] == lineage_record(s3_pipeline)["finetuned"]["path"]
    load_package(local_copy(best["package"]))  # the package in the bucket is whole
    assert any(p.name.startswith("experiment_state") for p in (root / "tune").iterdir())  # Tune's own state
    assert not list(Path.cwd().glob("s3:*"))  # no URL was taken for a local path anywhere

    args = ["sweep", *PIPELINE[1:], f"data.dir={s3_pipeline}/data",
            f"pretrained={s3_pipeline}/pretrain/model", f"run.dir={sweep}"]
    before = {t["dir"]: as_path(f"{t['dir']}/run.json").read_bytes() for t in results["trials"]}
    capsys.readouterr()
    assert main([*args, "resume=true"]) == 0  # the finished sweep, restored from the bucket: nothing to run
    assert "resumed" in capsys.readouterr().out
    again = json.loads((root / "sweep_results.json").read_text())
    assert sorted((t["trial_id"], t["status"]) for t in again["trials"]) == \
        sorted((t["trial_id"], t["status"]) for t in results["trials"])
    assert again["best"]["package"] == best["package"]
    assert {d: as_path(f"{d}/run.json").read_bytes() for d in before} == before  # no trial ran again
    assert main(args) == 2  # without resume=true: refused in one line, the bucket holds a sweep
    assert "run.dir: " + sweep + " already holds a sweep" in capsys.readouterr().err


def test_an_optuna_sweep_in_s3_killed_after_its_first_trial_resumes_from_the_bucket(ray_with_s3, s3_pipeline,
                                                                                   s3_bucket, tmp_path):
    """tests/integration/test_sweep.py's kill-and-resume with run.dir in the bucket: the driver is SIGKILLed
    while trial two runs; `resume=true` on another machine (nothing cached) restores Tune's state from the
    bucket, does not run trial one again and ranks both on BLEU."""
    run = f"{s3_bucket}/sweeps/killed"
    args = sweep_args(f"{s3_pipeline}/data", f"{s3_pipeline}/pretrain/model", run, *OPTUNA_BLEU)
    killed_driver(args, run, log=tmp_path / "killed_driver.log", checkpoint_s=2, settle_s=8.0)
    before = first_trial_record(run)
    assert not list(Path.cwd().glob("s3:*"))  # no URL was taken for a local path

    wipe(ray_with_s3)
    assert main([*args, "resume=true"]) == 0
    results = check_resumed(run, before)
    assert all(t["dir"].startswith(f"{run}/trial_") for t in results["trials"])
    assert results["best"]["package"] == f"{results['best']['dir']}/model"
    load_package(local_copy(results["best"]["package"]))  # the best package in the bucket is whole


def test_a_rerun_of_a_pipeline_in_s3_reuses_every_stage(s3_pipeline):
    """Another machine (nothing cached): only the bucket tells which stages are done."""
    before = lineage_record(s3_pipeline)
    assert main([*PIPELINE, f"run.dir={s3_pipeline}"]) == 0
    after = lineage_record(s3_pipeline)
    assert {name: (a["path"], a["sha256"], a["reused"]) for name, a in after.items()} == \
        {name: (a["path"], a["sha256"], True) for name, a in before.items()}
