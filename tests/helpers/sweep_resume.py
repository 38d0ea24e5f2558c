"""Kill a sweep's driver while its second trial runs, then check what `resume=true` made of it.

Shared by the local sweep test (tests/integration/test_sweep.py) and the bucket one
(tests/integration/test_object_storage.py): the same interruption and the same promises,
whatever `run.dir` is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_pipeline.storage import as_path

OPTUNA_BLEU = ("sweep.num_samples=2", "sweep.max_concurrent=1", "sweep.scheduler=fifo", "sweep.search=optuna",
               "sweep.seed=3", "sweep.metric=val_bleu", "sweep.metric_samples=4", "trainer.val_samples=2",
               "~sweep.space.model", "~sweep.space.trainer.freeze")
"""Two trials one after the other, searched by Optuna and ranked on greedy BLEU."""


def sweep_args(data: str | Path, package: str | Path, run: str | Path, *extra: str) -> list[str]:
    """`seqfoundry sweep` of sweep=tiny's space over a 4-step fine-tune on one worker."""
    return ["sweep", "experiment=tiny", "sweep=tiny", f"data.dir={data}", f"pretrained={package}", f"run.dir={run}",
            "trainer.num_workers=1", "trainer.max_steps=4", "trainer.val_every=2", "trainer.val_batches=2",
            "trainer.log_every=1", "trainer.checkpoint_every=100", "trainer.warmup_steps=1",
            "trainer.max_failures=0", "data.num_workers=0", *extra]


def finished_trials(run: str | Path) -> list:
    """The trial folders (local or in a bucket) that hold their model package."""
    return [d for d in as_path(run).glob("trial_*") if (d / "model" / "model.safetensors").is_file()]


def killed_driver(args: list[str], run: str | Path, log: Path, timeout_s: float = 600.0, *,
                  checkpoint_s: float = 0, settle_s: float = 3.0) -> None:
    """Run the sweep in a driver process of its own (its own local Ray, this process's environment),
    SIGKILL it `settle_s` after the first trial has written its package and the second trial has started.

    The driver's own log says when trial two started ("sweep: trial_... started"): a trial's folder in a
    bucket appears only when something is pushed to it, so the folders are not the signal. Tune saves its
    state every `checkpoint_s` (0: at every step of its loop). In a bucket each save is an upload: once in
    CI the newest state object on the local S3 server was empty after the kill (most likely an upload cut
    by it; the resume now refuses such a state in one line). So the bucket test saves every few seconds,
    which makes a cut upload rare, and waits for saves after trial one ended."""
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": str(checkpoint_s)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args, "cluster.num_cpus=2"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        try:
            while time.time() < deadline and proc.poll() is None:
                if trials_started(log) == 2 and finished_trials(run):
                    time.sleep(settle_s)
                    break
                time.sleep(0.5)
            assert proc.poll() is None, f"the sweep ended before it could be killed; {log} ends:\n{tail(log)}"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def trials_started(log: Path) -> int:
    return sum(line.startswith("sweep: trial_") and " started (" in line for line in log.read_text().splitlines())


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def first_trial_record(run: str | Path) -> dict:
    """The bytes of the finished trial's run files, to show later that nothing ran it again."""
    [first] = finished_trials(run)
    return {str(p): p.read_bytes() for p in (first / "run.json", first / "metrics.jsonl")}


def check_resumed(run: str | Path, before: dict) -> dict:
    """After `resume=true`: both trials ran out, the first was not run again, every step was trained once
    in each trial's record, and BLEU (max) picked the best. Returns sweep_results.json."""
    results = json.loads((as_path(run) / "sweep_results.json").read_text())
    assert results["metric"] == "val_bleu" and results["mode"] == "max" and results["num_trials"] == 2
    assert [t["status"] for t in results["trials"]] == ["TERMINATED", "TERMINATED"]
    assert {p: as_path(p).read_bytes() for p in before} == before  # trial one was not run again
    for t in results["trials"]:
        rows = [json.loads(line) for line in (as_path(t["dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # each step trained once in the record
        assert [r["step"] for r in rows if "val_bleu" in r] == [2, 4] and 0 <= t["metrics"]["val_bleu"] <= 100
    best = max(results["trials"], key=lambda t: t["metrics"]["val_bleu"])
    assert results["best"]["trial_id"] == best["trial_id"]
    return results
