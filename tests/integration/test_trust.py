"""Issue 11, trust under faults: non-finite losses are skipped on every rank, counted and bounded
(`trainer.max_bad_steps`), and never reach the weights, a checkpoint or an invalid metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.cli import main

ray = pytest.importorskip("ray")


pytestmark = pytest.mark.usefixtures("local_ray")


def base(data: Path, run: Path, *extra: str) -> list[str]:
    return ["experiment=tiny", f"data.dir={data}", f"run.dir={run}", "trainer.num_workers=2",
            "trainer.max_steps=4", "trainer.log_every=1", "trainer.checkpoint_every=100",
            "trainer.warmup_steps=1", "data.num_workers=0", "trainer.max_failures=0", *extra]


def strict_lines(path: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (NaN/Infinity raise)."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("zero", [1, 3])  # ZeRO-3: a forward with no backward leaves its gathers consistent
def test_nan_step_is_skipped_counted_and_never_reaches_the_weights(zero, tiny_data, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", *base(tiny_data, run, "chaos.nan_at_step=2", "chaos.nan_rank=1",
                                   f"deepspeed.zero_stage={zero}")]) == 0
    records = strict_lines(run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # the bad batch was skipped, not the step number
    assert train[0]["bad_steps"] == 0 and train[-1]["bad_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in train)
    for name, tensor in load_file(run / "model" / "model.safetensors").items():
        assert torch.isfinite(tensor).all(), name


def test_max_bad_steps_zero_aborts_in_one_line(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["pretrain", *base(tiny_data, run, "chaos.nan_at_step=2", "trainer.max_bad_steps=0")])
    assert code == 1
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "trainer.max_bad_steps" in errors[0], errors
    assert not (run / "model").exists()
