"""Issue 11, trust: unit checks of non-finite metrics, sweep picks, run-folder integrity."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.tracking import Tracker, TrackingConfig
from tests.helpers.wandb_offline import history, run_ids
from trainers.config import TrainerConfig


def _refuse(name):
    raise ValueError(name)


def test_metrics_jsonl_stays_strict_json_with_non_finite_values(tmp_path):
    tracker = Tracker(TrackingConfig(mode="disabled"), run_dir=tmp_path, run_id="x", name="x", config={})
    tracker.log(1, {"loss": float("nan"), "val_loss": float("inf"), "lr": 0.1})
    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=_refuse)
    assert record["loss"] is None and record["val_loss"] is None and record["lr"] == 0.1


def test_max_bad_steps_is_validated():
    assert TrainerConfig().max_bad_steps == 10
    assert TrainerConfig(max_bad_steps=0).max_bad_steps == 0
    with pytest.raises(ValueError, match="trainer.max_bad_steps"):
        TrainerConfig(max_bad_steps=-1)


def test_sweep_never_picks_a_nan_trial():
    from orchestrator.sweep.command import best_record

    records = [{"status": "TERMINATED", "metrics": {"val_loss": math.nan}},
               {"status": "TERMINATED", "metrics": {"val_loss": 2.0}},
               {"status": "TERMINATED", "metrics": {"val_loss": 3.0}}]
    assert best_record(records, metric="val_loss", mode="min")["metrics"]["val_loss"] == 2.0
    assert best_record(records, metric="val_loss", mode="max")["metrics"]["val_loss"] == 3.0
    assert best_record(records[:1], metric="val_loss", mode="min") == {}


# --- run-folder integrity (item 4) ---------------------------------------------------------------

def test_torn_last_metrics_line_does_not_break_a_resume(tmp_path, capsys):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    Tracker(TrackingConfig(mode="disabled"), run_dir=tmp_path, run_id="x", name="x", config={}, resume_from_step=2)
    kept = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2]
    assert "torn" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp"))  # the rewrite went through a temporary file, renamed


def test_package_replacement_keeps_the_old_package_when_the_swap_fails(tmp_path, monkeypatch):
    from pathlib import Path

    from trainers.models import ModelConfig, build_model
    from trainers.package import Lineage, write_package

    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    model = build_model(ModelConfig(arch="transformer", vocab_size=16, d_model=8, num_heads=2, ffn_dim=16,
                                    num_encoder_layers=1, num_decoder_layers=1))
    out = write_package(tmp_path / "model", model, tokenizer=tok, lineage=Lineage(step=1))
    real = Path.rename

    def failing(self, target):
        if self.name.endswith(".tmp"):
            raise OSError("disk full")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        write_package(tmp_path / "model", model, tokenizer=tok, lineage=Lineage(step=2))
    monkeypatch.undo()
    assert json.loads((out / "lineage.json").read_text())["step"] == 1


def _run_folder(tmp_path, sha="a" * 64, trainer_lr=0.1):
    from orchestrator.runs import RunInfo, write_config

    run = tmp_path / "run"
    write_config(run, {"trainer": {"lr": trainer_lr}, "model": {"d_model": 8}})
    RunInfo(wandb_run_id="abc", mode="pretrain", config_sha256=sha).save(run / "run.json")
    return run


def test_resume_with_another_config_is_refused_naming_the_slice(tmp_path):
    from orchestrator.config import ConfigError
    from orchestrator.preflight import check_same_config
    from orchestrator.runs import config_sha256
    from trainers.run_folder import RunFolder

    old = {"trainer": {"lr": 0.1}, "model": {"d_model": 8}}
    run = _run_folder(tmp_path, sha=config_sha256(old))
    check_same_config(RunFolder.of(str(run)), old)  # the same config resumes
    check_same_config(RunFolder.of(str(run)), {"trainer": {"lr": 0.1, "max_steps": 9}, "model": {"d_model": 8}})
    with pytest.raises(ConfigError, match=r"^resume: .*trainer"):
        check_same_config(RunFolder.of(str(run)), {"trainer": {"lr": 0.2}, "model": {"d_model": 8}})


def test_a_second_run_on_a_locked_run_dir_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import subprocess
    import sys

    from orchestrator.config import ConfigError
    from orchestrator.runs import RunLock

    run = tmp_path / "run"
    run.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": live.pid, "host": __import__("socket").gethostname()}))
        with pytest.raises(ValueError, match=r"^run.dir: .* is in use by pid"):
            RunLock(run).acquire()
        from orchestrator.preflight import _check
        with pytest.raises(ConfigError, match=r"^run.dir: .* is in use by pid"):  # what preflight says
            _check(RunLock(run).check)
    finally:
        live.kill()
        live.wait()
    lock = RunLock(run).acquire()  # the holder died: its stale lock is taken over
    assert json.loads((run / ".lock").read_text())["pid"] == __import__("os").getpid()
    lock.release()
    assert not (run / ".lock").exists()


def test_a_restarted_run_waits_for_the_holder_to_exit_and_a_zombie_holds_nothing(tmp_path):
    """A sweep trial restarted after its driver was killed can find the lock of its killed incarnation's process,
    still exiting: with `wait_s` it waits for that process (here one that exits after 2 s) instead of failing.
    An exited but unreaped process (a zombie) still answers kill(pid, 0): its lock is stale."""
    import socket
    import subprocess
    import sys
    import time

    from orchestrator.runs import RunLock

    run = tmp_path / "run"
    run.mkdir()

    def held_by(proc) -> None:
        (run / ".lock").write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname()}))

    exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    held_by(exiting)
    with pytest.raises(ValueError, match=r"^run.dir: .* is in use by pid"):
        RunLock(run).check()  # no wait: refused while it runs
    start = time.monotonic()
    RunLock(run).check(wait_s=60)  # returns once the holder has exited (unreaped: a zombie until wait())
    assert RunLock(run).other_live_holder() is None and time.monotonic() - start < 30
    exiting.wait()

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    held_by(zombie)
    deadline = time.time() + 30
    while time.time() < deadline and f") Z " not in Path(f"/proc/{zombie.pid}/stat").read_text():
        time.sleep(0.05)  # not reaped: no wait()/poll() until the lock is taken over
    RunLock(run).acquire().release()
    zombie.wait()


# --- saved configs of someone else's package (item 3) ---------------------------------------------

def test_a_saved_config_with_an_interpolation_is_refused_without_resolving_it(tmp_path, monkeypatch):
    from orchestrator.config import ConfigError, load_job_config

    monkeypatch.setenv("SECRET", "hunter2")
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  dir: ${oc.env:SECRET}\n")
    with pytest.raises(ConfigError) as err:
        load_job_config(path)
    assert "data.dir" in str(err.value) and "hunter2" not in str(err.value) and "\n" not in str(err.value)


def test_a_saved_data_dir_must_be_a_file_s3_or_gs_location(tmp_path):
    from orchestrator.config import ConfigError
    from orchestrator.evaluation.command import FROM_PACKAGE, data_for

    (tmp_path / "model").mkdir()
    (tmp_path / "config.yaml").write_text("run:\n  dir: r\ndata:\n  dir: http://evil.example/x\n")
    with pytest.raises(ConfigError, match=r"^data.dir: .*http"):
        data_for(tmp_path / "model", FROM_PACKAGE)


# --- collective timeout (item 6), finished runs (item 2) ------------------------------------------

def test_driver_passes_the_collective_timeout_to_torch_config():
    from orchestrator.driver import torch_config

    assert torch_config(TrainerConfig(collective_timeout_s=123)).timeout_s == 123
    assert torch_config(TrainerConfig()).timeout_s == 300


def test_resuming_a_finished_run_is_refused_pointing_to_export(tmp_path):
    from orchestrator.config import ConfigError
    from orchestrator.preflight import check_unfinished
    from orchestrator.runs import CheckpointRoot

    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    check_unfinished(CheckpointRoot(str(root)), max_steps=8)
    with pytest.raises(ConfigError, match=r"^resume: .*finished.*seqfoundry export"):
        check_unfinished(CheckpointRoot(str(root)), max_steps=4)


def test_ray_train_deletes_a_re_registered_checkpoint_folder(tmp_path):
    """Why a finished run must not re-save its last step: Ray Train V2's keep_last bookkeeping holds results
    by identity, so the same `step_N` folder registered again after a restore makes the first registration
    "old" and deletes the folder both point to (num_to_keep=1: the run's only checkpoint)."""
    import asyncio

    from ray.train import Checkpoint, CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext
    from ray.train.v2._internal.execution.training_report import _TrainingReport

    folder = tmp_path / "checkpoints" / "step_00000004"

    async def register_step_4():
        manager = CheckpointManager(CheckpointConfig(num_to_keep=1), StorageContext(str(tmp_path), "checkpoints"))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights").write_text("w")
        manager.register_checkpoint(_TrainingReport(Checkpoint(str(folder)), {"step": 4}, validation=False))

    asyncio.run(register_step_4())  # the run finishes at its last step
    assert folder.is_dir()
    asyncio.run(register_step_4())  # a restored run saving that step again (what the loop no longer does)
    assert not folder.exists()


def test_latest_checkpoint_is_the_latest_one_ray_train_registered(tmp_path):
    from orchestrator.runs import CheckpointRoot

    root = tmp_path / "checkpoints"
    for tag in ("step_00000002", "step_00000004", "step_99999999"):  # the last: an upload cut short
        (root / tag).mkdir(parents=True)
    assert CheckpointRoot(str(root)).latest().name == "step_99999999"  # no record: folder names decide
    record = {"checkpoint_results": [{"version": 0, "checkpoint_dir_name": t, "metrics": {}}
                                     for t in ("step_00000002", "step_00000004")]}
    (root / "checkpoint_manager_snapshot.json").write_text(json.dumps(record))
    assert CheckpointRoot(str(root)).latest().name == "step_00000004"
    assert [p.name for p in CheckpointRoot(str(root)).all()] == ["step_00000002", "step_00000004"]


# --- W&B unavailable (item 7) ---------------------------------------------------------------------

def test_a_failed_online_wandb_init_falls_back_to_offline_with_one_warning(tmp_path, monkeypatch, capsys):
    import wandb

    from orchestrator.tracking import open_wandb

    real, modes = wandb.init, []

    def flaky(**kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("api.wandb.ai unreachable")
        return real(**kwargs)

    monkeypatch.setattr(wandb, "init", flaky)
    run = open_wandb(TrackingConfig(mode="online"), run_dir=tmp_path, run_id="abcd1234", name="r", job_type="t")
    try:
        assert modes == ["online", "offline"] and run.offline
    finally:
        run.finish()
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "offline" in warnings[0] and "unreachable" in warnings[0]


def test_the_evaluation_log_writes_its_jsonl_before_wandb(tmp_path):
    from types import SimpleNamespace

    from orchestrator.evaluation.actor import CheckpointLog

    log = CheckpointLog(SimpleNamespace(run_dir=str(tmp_path)))

    def unavailable(step, results):
        raise ConnectionError("W&B down")

    log.log_wandb = unavailable
    with pytest.raises(ConnectionError):
        log.append({"step": 3, "bleu": 1.0}, results=object())
    assert log.find(3)["bleu"] == 1.0  # the results are on disk even though W&B failed


KILLED_TRACKER = """
import os, sys
from orchestrator.tracking import Tracker, TrackingConfig
tracker = Tracker(TrackingConfig(mode="offline"), run_dir=sys.argv[1], run_id="killed01", name="k", config={})
for step in (1, 2, 3):
    tracker.log(step, {"loss": 1.0 / step})
tracker.commit()  # as rank 0 does after a checkpoint
tracker.log(4, {"loss": 0.25})  # and at once on: the kill comes before any flush interval has passed
os.kill(os.getpid(), 9)  # a dying machine: no finish
"""


def test_wandb_history_survives_a_killed_process(tmp_path):
    """What rank 0 logged up to a checkpoint (`commit`) is in the offline `.wandb` file when the process is
    killed right after it, with no finish: a killed attempt of a kill-and-resume used to lose its whole W&B
    history (15 s of buffering, and the last step's row held open)."""
    proc = subprocess.run([sys.executable, "-c", KILLED_TRACKER, str(tmp_path)], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert [row["_step"] for row in history(tmp_path) if "loss" in row] == [1, 2, 3]
    assert run_ids(tmp_path) == {"killed01"}
