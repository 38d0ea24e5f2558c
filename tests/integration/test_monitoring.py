"""Monitoring through the real CLI (issue 15): two tiny pretrain runs on a real local Ray cluster
(ZeRO-1 over two workers, ZeRO-0 on one), W&B offline and read back; then `runs list`,
`runs compare` and `report run=a,b` on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.helpers.wandb_offline import history, offline_runs, records

ray = pytest.importorskip("ray")


pytestmark = pytest.mark.usefixtures("local_ray")


def pretrain(data: Path, run: Path, *extra: str) -> list[str]:
    return ["pretrain", "experiment=tiny", f"data.dir={data}", f"run.dir={run}", "trainer.max_steps=4",
            "trainer.log_every=1", "trainer.val_every=2", "trainer.val_batches=2", "trainer.val_samples=3",
            "trainer.checkpoint_every=100", "trainer.warmup_steps=1", "data.num_workers=0", *extra]


@pytest.fixture(scope="module")
def two_runs(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "zero1", root / "zero0"
    assert main(pretrain(tiny_data, a, "trainer.num_workers=2", "deepspeed.zero_stage=1")) == 0
    assert main(pretrain(tiny_data, b, "trainer.num_workers=1", "deepspeed.zero_stage=0", "trainer.lr=1e-3",
                         "tracking.upload_models=true")) == 0
    return a, b


def artifacts(run: Path) -> dict[str, object]:
    """Every artifact record in the run's offline W&B files, by name."""
    return {r.artifact.name: r.artifact for path in offline_runs(run) for r in records(path)
            if r.WhichOneof("record_type") == "artifact"}


def test_validation_samples_are_a_wandb_table_at_each_validation(two_runs):
    for run in two_runs:
        tables = {row["_step"]: row for row in history(run) if "val_samples/_type" in row}
        assert sorted(tables) == [2, 4], run  # val_every=2 and the final validation
        for step, row in tables.items():
            assert row["val_samples/_type"] == "table-file" and row["val_samples/nrows"] == 3
            [path] = {p.parent / "files" / row["val_samples/path"] for p in offline_runs(run)
                      if (p.parent / "files" / row["val_samples/path"]).is_file()}
            table = json.loads(path.read_text())
            assert table["columns"] == ["source", "reference", "output", "step"]
            assert len(table["data"]) == 3 and all(r[3] == step and r[0] and r[1] for r in table["data"])
    first, second = ([json.loads(p.read_text())["data"] for p in sorted(r.glob("wandb/*/files/media/table/*.json"))]
                     for r in two_runs)
    assert [r[:2] for r in first[0]] == [r[:2] for r in second[0]]  # the same fixed sources in every run


def test_model_package_and_data_are_wandb_artifacts(two_runs, tiny_data):
    referenced, uploaded = two_runs
    run_id = json.loads((referenced / "run.json").read_text())["wandb_run_id"]
    found = artifacts(referenced)
    model = found[f"model-{referenced.name}"]
    assert model.type == "model" and model.run_id == run_id
    entries = {e.path: e.ref for e in model.manifest.contents}
    assert entries["model.safetensors"] == (referenced / "model" / "model.safetensors").resolve().as_uri()
    meta = json.loads(model.metadata)
    assert meta["lineage"]["wandb_run_id"] == run_id and meta["inputs"] == [n for n in found if n.startswith("data-")]
    [data] = [a for name, a in found.items() if name.startswith("data-")]
    assert data.type == "dataset"
    assert {e.path: e.ref for e in data.manifest.contents}["manifest.json"] == (tiny_data / "manifest.json").as_uri()

    upload = artifacts(uploaded)[f"model-{uploaded.name}"]  # tracking.upload_models=true: files, no references
    files = {e.path: e for e in upload.manifest.contents}
    assert {"model.safetensors", "model_config.json", "tokenizer.json"} <= set(files)
    assert not any(e.ref for e in files.values()) and all(e.digest for e in files.values())


def test_runs_list_compare_and_overlay_report(two_runs, capsys):
    a, b = two_runs
    assert main(["runs", "list", f"runs.root={a.parent}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["name", "command", "status", "step", "loss", "best_val_loss", "tokens_per_s", "mfu",
                                "wandb_id", "wall"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {a.name, b.name}
    for run in two_runs:
        cells = rows[run.name]
        assert cells[1:4] == ["pretrain", "finished", "4/4"]
        assert cells[8] == json.loads((run / "run.json").read_text())["wandb_run_id"]
        assert float(cells[4]) > 0 and float(cells[5]) > 0 and cells[7].endswith("%")

    assert main(["runs", "compare", f"runs.dirs=[{a},{b}]"]) == 0
    out = capsys.readouterr().out
    config, _, metrics = out.partition("final metrics")
    keys = {line.split()[0] for line in config.strip().splitlines()[2:]}
    assert {"trainer.lr", "trainer.num_workers", "deepspeed.zero_stage", "tracking.upload_models"} <= keys
    assert "trainer.max_steps" not in keys  # equal keys are left out
    val = next(line.split() for line in metrics.splitlines() if line.startswith("val_loss"))
    assert len(val) == 3 and all(float(v) > 0 for v in val[1:])

    assert main(["report", f"run={a},{b}"]) == 0
    pngs = [Path(p) for p in capsys.readouterr().out.split()]
    assert {p.name for p in pngs} >= {"overlay_loss.png", "overlay_val_loss.png", "overlay_mfu.png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in pngs)


def test_runs_list_reads_run_folders_in_a_bucket(two_runs, s3_bucket, capsys):
    import fsspec

    fs = fsspec.filesystem("s3")
    for run in two_runs:
        for name in ("run.json", "config.yaml", "metrics.jsonl"):
            fs.put(str(run / name), f"{s3_bucket}/listed/{run.name}/{name}")
    assert main(["runs", "list", f"runs.root={s3_bucket}/listed"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.strip().splitlines()[1:]}
    assert set(rows) == {run.name for run in two_runs}
    assert all(r[2] == "stopped" and r[3] == "4/4" for r in rows.values())  # no package in the bucket


def test_a_bad_runs_command_is_one_line_with_exit_2(tmp_path, capsys):
    for args, needle in ((["runs", "lst"], "runs.action"), (["runs", "compare", f"runs.dirs=[{tmp_path}]"], "runs.dirs"),
                         (["runs", "list", f"runs.root={tmp_path / 'nope'}"], "runs.root")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("seqfoundry runs: error:") and needle in err[0], err
