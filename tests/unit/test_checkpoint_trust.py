"""Checkpoints are untrusted input: loading one runs no code (JSON train state, weights_only everywhere)."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers import checkpoint as ckpt
from trainers.export import consolidated_state_dict

ROOT = Path(__file__).parents[2]


class RunsCode:
    """What a hostile checkpoint holds: unpickling it runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class FakeEngine:
    """Just enough of a DeepSpeed engine for `ckpt.save`: it makes the tag folder."""

    def save_checkpoint(self, folder, tag, client_state):
        (Path(folder) / tag).mkdir(parents=True)
        (Path(folder) / "latest").write_text(tag)


def test_train_state_is_json_and_restores_every_rng(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.TrainState(step=7, data={"epoch": 2, "cursor": np.int64(11), "segments": []},
                            rng=ckpt.capture_rng(), wandb_run_id="abc", world_size=2, tokens_seen=99)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    tag = ckpt.save(FakeEngine(), tmp_path, state, rank=1)
    files = sorted(p.name for p in (tmp_path / tag).iterdir())
    assert files == ["train_state_rank1.json"]  # no pickle next to DeepSpeed's files
    loaded = ckpt.read_state(tmp_path / tag / "train_state_rank1.json")
    assert json.loads((tmp_path / tag / "train_state_rank1.json").read_text())["data"]["cursor"] == 11
    assert (loaded.step, loaded.wandb_run_id, loaded.world_size, loaded.tokens_seen) == (7, "abc", 2, 99)
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    ckpt.restore_rng(loaded.rng)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])
    assert ckpt.saved_world_size(tmp_path) == 1 and ckpt.state_files(tmp_path, tag)[0].suffix == ".json"


def test_a_legacy_pt_train_state_still_loads_without_running_code(tmp_path):
    random.seed(5)
    legacy = {"step": 3, "data": {"epoch": 0}, "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                                       "torch": torch.get_rng_state(), "cuda": []}}
    torch.save(legacy, tmp_path / "train_state_rank0.pt")
    state = ckpt.read_state(tmp_path / "train_state_rank0.pt")
    expected = random.random()
    ckpt.restore_rng(state.rng)
    assert state.step == 3 and random.random() == expected
    marker = tmp_path / "pwned"
    torch.save({"step": RunsCode(marker)}, tmp_path / "train_state_rank1.pt")
    with pytest.raises(pickle.UnpicklingError):
        ckpt.read_state(tmp_path / "train_state_rank1.pt")
    assert not marker.exists()


def test_a_deepspeed_file_that_runs_code_is_refused_by_export(tmp_path):
    marker = tmp_path / "pwned"
    tag = tmp_path / "ckpt" / "step_00000001"
    tag.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("step_00000001")
    torch.save({"module": {"w": torch.zeros(2)}, "ds_config": RunsCode(marker)}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(pickle.UnpicklingError):
        consolidated_state_dict(tmp_path / "ckpt")
    assert not marker.exists()


def test_weights_only_loads_overrides_a_callers_weights_only_false(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(RunsCode(marker), tmp_path / "x.pt")
    with ckpt.weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "x.pt", weights_only=False)  # as DeepSpeed 0.19 calls it
    assert not marker.exists() and torch.load.__module__.startswith("torch")  # restored afterwards


@pytest.mark.slow
def test_deepspeed_checkpoints_of_every_zero_stage_load_weights_only(tmp_path):
    """Real DeepSpeed (CPU, one process): save, load, consolidate and convert to universal (ZeRO 1, 3), with
    every torch.load weights_only and only `deepspeed_safe_globals()` allowed."""
    env = {**os.environ, "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    out = subprocess.run([sys.executable, str(ROOT / "tests/helpers/ds_roundtrip.py"), str(tmp_path), "0", "1", "3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line for line in out.stdout.splitlines() if line.startswith("ok ")] == ["ok 0", "ok 1", "ok 3"]
