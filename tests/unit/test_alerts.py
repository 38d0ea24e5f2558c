"""Alerts of rank 0's sink (issue 15): a non-finite loss, a stall, a failure -> a console line, and
`wandb.alert` when the W&B run is online. The sink, tracker and W&B run are real (offline);
only `wandb.alert` is replaced, to record its calls."""

from __future__ import annotations

import math
import time

import pytest
import wandb

from data_pipeline import DataConfig, ObjectiveConfig
from orchestrator.tracking import TrackerSpec, TrackingConfig
from trainers.config import ChaosConfig, DeepSpeedConfig, TrainerConfig
from trainers.loop import RunSink, WorkerJob
from trainers.models import ModelConfig
from trainers.run_folder import RunFolder
from trainers.watchdog import StallWatchdog


@pytest.fixture
def sink(tmp_path, monkeypatch):
    tracker = TrackerSpec(TrackingConfig(mode="offline"), run_dir=tmp_path, run_id="alerts01", name="r",
                          config={}, job_type="pretrain")
    job = WorkerJob(model=ModelConfig(), trainer=TrainerConfig(stall_alert_s=0.3), deepspeed=DeepSpeedConfig(),
                    data=DataConfig(), objective=ObjectiveConfig(), chaos=ChaosConfig(), run_dir=str(tmp_path / "r"),
                    make_tracker=tracker)
    sink = RunSink(job, RunFolder.of(tmp_path))
    sink.open(step=0, summary={})
    calls = []  # after wandb.init, which binds wandb.alert to the new run's alert
    monkeypatch.setattr(wandb, "alert", lambda **kw: calls.append(kw))
    sink.calls = calls
    yield sink
    sink.close()


def alerts(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("ALERT")]


def test_a_non_finite_loss_alerts_on_the_console_and_in_wandb_when_online(sink, capsys):
    sink.step_done()
    sink.log(1, {"loss": 2.5}, line="step 1")
    sink.log(2, {"loss": math.nan}, line="step 2")
    [line] = alerts(capsys.readouterr().out)
    assert line == "ALERT [WARN] non-finite loss: r step 2: loss=nan"
    assert sink.calls == []  # offline: the console line only
    assert '"loss": null' in (sink.folder.local / "metrics.jsonl").read_text()  # logged too, as strict JSON

    sink.tracker.mode = "online"  # as a run with a W&B key would be
    sink.log(3, {"val_loss": math.inf}, line="step 3")
    assert alerts(capsys.readouterr().out) == ["ALERT [WARN] non-finite loss: r step 3: val_loss=inf"]
    assert sink.calls == [{"title": "non-finite loss", "text": "r step 3: val_loss=inf", "level": wandb.AlertLevel.WARN}]


def test_no_step_for_stall_alert_s_alerts_once_until_the_next_step(sink, capsys):
    time.sleep(1.0)
    [line] = alerts(capsys.readouterr().out)
    assert line.startswith("ALERT [WARN] training stalled: r: no optimizer step completed for")
    assert "trainer.stall_alert_s=0.3" in line
    sink.step_done()  # re-arms it
    time.sleep(1.0)
    assert len(alerts(capsys.readouterr().out)) == 1


def test_a_failure_alerts_with_its_error(sink, capsys):
    sink.tracker.mode = "online"
    sink.failed(RuntimeError("worker exploded\nwith detail"))
    assert alerts(capsys.readouterr().out) == ["ALERT [ERROR] run failed: r: RuntimeError: worker exploded with detail"]
    assert sink.calls[-1]["level"] == wandb.AlertLevel.ERROR


def test_the_watchdog_is_off_between_beats():
    fired = []
    dog = StallWatchdog(0.2, fired.append, poll_s=0.02).start()
    for _ in range(10):
        time.sleep(0.05)
        dog.beat()
    assert fired == []
    time.sleep(0.4)
    dog.stop()
    assert len(fired) == 1 and fired[0] >= 0.2
