"""The `.wandb` transaction-log reader and `finish_run`: a real offline W&B run is read back against what
it logged; a file cut anywhere before its exit record is not taken as ended; `finish_run` waits for the
exit record, which W&B's service may write after `run.finish()` has returned (on a busy machine the file
was still empty: a test then read no history, and a bucket push would have uploaded it so)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from orchestrator.tracking import TrackingConfig, finish_run, open_wandb
from orchestrator.wandb_file import ended, payloads, records


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A finished offline run that logged five rows; its file's path and the rows."""
    rows = [{"loss": 1.0 / (i + 1), "lr": 0.1 * i} for i in range(5)]
    run = open_wandb(TrackingConfig(mode="offline"), run_dir=tmp_path_factory.mktemp("wb"), run_id="wbfile01",
                     name="r", job_type="test")
    for step, row in enumerate(rows):
        run.log(row, step=step)
    path = run.settings.sync_file
    finish_run(run)
    return path, rows


def test_finish_run_leaves_every_logged_row_and_the_exit_record_in_the_file(logged):
    path, rows = logged
    kinds = [r.WhichOneof("record_type") for r in records(path)]
    got = [{k: float(i.value_json) for i in r.history.item if (k := i.key or "/".join(i.nested_key)) in rows[0]}
           for r in records(path) if r.WhichOneof("record_type") == "history"]
    assert got == rows and kinds[-1] == "exit" and ended(path)


def test_a_file_cut_before_its_exit_record_has_not_ended(logged, tmp_path):
    path, _ = logged
    data = open(path, "rb").read()
    whole = payloads(data)
    cut = tmp_path / "cut.wandb"
    for size in range(len(data) - 1, max(7, len(data) - 300), -1):
        cut.write_bytes(data[:size])
        assert not ended(cut), size
        assert whole[:len(payloads(data[:size]))] == payloads(data[:size])  # whole records only, in order
    assert not ended(tmp_path / "missing.wandb")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        cut.write_bytes(b"PK\x03\x04" + data[4:])
        records(cut)


def test_finish_run_waits_for_a_service_that_writes_after_finish_returns(logged, tmp_path):
    """W&B's service is replaced only in its timing: `finish` returns at once and the real file's bytes
    land 1 s later, as they did on a loaded machine."""
    data = open(logged[0], "rb").read()
    late = tmp_path / "late.wandb"
    late.write_bytes(data[:7])

    def finish():
        threading.Timer(1.0, late.write_bytes, args=(data,)).start()

    start = time.time()
    finish_run(SimpleNamespace(settings=SimpleNamespace(sync_file=str(late)), offline=True, finish=finish), wait_s=30)
    assert ended(late) and 0.9 < time.time() - start < 30


def test_finish_run_does_not_wait_on_a_disabled_run_whose_file_never_comes(tmp_path):
    """W&B gives a disabled run a sync_file path too; nothing is ever written there."""
    import wandb

    run = wandb.init(mode="disabled", dir=str(tmp_path))
    assert run.settings.sync_file and not ended(run.settings.sync_file)
    start = time.time()
    finish_run(run, wait_s=30)
    assert time.time() - start < 10  # it returned without polling for 30 s
