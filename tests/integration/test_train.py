"""Pretrain and fine-tune through the real CLI: a real local Ray cluster, real
DeepSpeed engines on the CPU (gloo), W&B offline and read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.cli import main
from trainers.models import ModelConfig, build_model
from trainers.package import Lineage, load_package, read_lineage, write_package
from tests.helpers.data import prepare_tiny
from tests.helpers.wandb_offline import history, run_ids

ray = pytest.importorskip("ray")


pytestmark = pytest.mark.usefixtures("local_ray")


def base(data: Path, run: Path, *extra: str) -> list[str]:
    return ["experiment=tiny", f"data.dir={data}", f"run.dir={run}", "trainer.num_workers=2",
            "trainer.max_steps=3", "trainer.log_every=1", "trainer.checkpoint_every=100",
            "trainer.warmup_steps=1", "data.num_workers=0", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(package: Path) -> dict[str, torch.Tensor]:
    return load_file(package / "model.safetensors")


# --- architectures x ZeRO stages --------------------------------------------------------

# Every stage with the Transformer; the RNNs (one code path for LSTM and GRU in the engine) with one
# stage each of the two partitioning families (ZeRO-1/2: optimizer states and gradients), and ZeRO-3
# refused for both. The full 3 x 4 grid cost CI four more minutes for no code path of its own.
ARCH_BY_ZERO = [("transformer", 0), ("transformer", 1), ("transformer", 2), ("transformer", 3),
                ("lstm", 0), ("lstm", 2), ("gru", 1), ("lstm", 3), ("gru", 3)]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Callable[[str, int], Path]:
    """`trained(arch, zero)`: the run folder of a 3-step `base` pretrain (seed 0, the same data), trained
    once per module: the grid test checks each run, the agreement test compares them."""
    root, done = tmp_path_factory.mktemp("by_zero"), {}

    def run(arch: str, zero: int) -> Path:
        if (arch, zero) not in done:
            folder = root / f"{arch}_zero{zero}"
            assert main(["pretrain", *base(tiny_data, folder, f"model={arch}", f"deepspeed.zero_stage={zero}")]) == 0
            done[arch, zero] = folder
        return done[arch, zero]

    return run


@pytest.mark.parametrize("arch, zero", ARCH_BY_ZERO)
def test_arch_by_zero_stage_trains_or_is_refused(arch, zero, trained, tiny_data, tmp_path, capsys):
    if arch != "transformer" and zero == 3:
        run = tmp_path / "run"
        assert main(["pretrain", *base(tiny_data, run, f"model={arch}", f"deepspeed.zero_stage={zero}")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "deepspeed.zero_stage" in err[0] and "ZeRO-3 is refused" in err[0]
        assert not run.exists()  # refused before anything was written or requested
        return
    run = trained(arch, zero)
    rows = [m for m in metrics(run) if "loss" in m]
    assert [m["step"] for m in rows] == [1, 2, 3]
    for m in rows:
        assert m["loss"] > 0 and m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1 and m["grad_norm"] > 0
    model = load_package(run / "model")
    assert model.config.arch == arch
    assert json.loads((run / "model" / "lineage.json").read_text())["step"] == 3


# The stages only partition the same fp32 arithmetic differently (bucketed all-reduce vs reduce-scatter,
# a norm summed over partitions): after 3 Adam steps on 2 ranks the weights agree to rounding. A real
# divergence (a lost gradient bucket, clipping on a partial norm, a skipped update) moves them by ~lr.
ZERO_AGREEMENT_ATOL = 1e-6


def test_the_zero_stages_agree_on_the_weights(trained):
    reference = weights(trained("transformer", 0) / "model")
    for zero in (1, 2, 3):
        other = weights(trained("transformer", zero) / "model")
        assert other.keys() == reference.keys()
        gap = max(float((other[k] - reference[k]).abs().max()) for k in reference)
        print(f"ZeRO-{zero} vs ZeRO-0 after 3 steps: max |dw| = {gap:.3g}")
        assert gap <= ZERO_AGREEMENT_ATOL, (zero, gap)


# --- fine-tuning ---------------------------------------------------------------------------
# (That training learns is tests/integration/test_learning.py: losses fall there, and the models beat
# copying their input.)

@pytest.fixture(scope="module")
def pretrained(trained) -> Path:
    """A pretrained package: the grid's ZeRO-2 Transformer (no test below continues that run)."""
    return trained("transformer", 2) / "model"


def test_finetune_starts_from_the_package_weights(pretrained, tiny_data, tmp_path):
    run = tmp_path / "ft"
    code = main(["finetune", *base(tiny_data, run, f"pretrained={pretrained}", "trainer.max_steps=1",
                                   "trainer.lr=1e-12", "trainer.weight_decay=0", "trainer.warmup_steps=0")])
    assert code == 0
    before, after = weights(pretrained), weights(run / "model")
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)
    fresh = build_model(load_package(pretrained).config).state_dict()
    assert any(not torch.allclose(fresh[k], before[k]) for k in before if k in fresh)
    lineage = json.loads((run / "model" / "lineage.json").read_text())
    assert Path(lineage["parent_package"]) == pretrained.resolve() and lineage["parent_sha256"]


# --- resume ------------------------------------------------------------------------------

KILL = ["trainer.max_steps=8", "trainer.checkpoint_every=3", "model.dropout=0.1", "trainer.log_every=1",
        "data.verify=size"]


@pytest.fixture(scope="module")
def damaged_data(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """tiny_data with one train shard broken inside (its size intact: `data.verify=size` lets it through,
    so whoever reads it finds it, a DataLoader worker included); and that shard."""
    import shutil

    from data_pipeline import Manifest

    data = tmp_path_factory.mktemp("damaged") / "data"
    shutil.copytree(tiny_data, data)
    victim = Manifest.load(data).shards("train")[1].path
    raw = bytearray(victim.read_bytes())
    raw[0:8] = b"\x00garbag\x01"  # the first tar header: the shard cannot be read
    victim.write_bytes(bytes(raw))
    return data, victim


@pytest.fixture(scope="module")
def uninterrupted(damaged_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(["pretrain", *base(damaged_data[0], run, *KILL)]) == 0
    return run


# Rank 1 killed with the data read in the training process; rank 0 (which holds the tracker and the
# run-folder pushes) killed with the data read by DataLoader workers (data.num_workers=2, the default's kind).
@pytest.mark.parametrize("rank, data_workers", [(1, 0), (0, 2)])
def test_kill_and_resume_equals_the_uninterrupted_run(rank, data_workers, damaged_data, uninterrupted, tmp_path):
    killed = tmp_path / "killed"
    assert main(["pretrain", *base(damaged_data[0], killed, *KILL, "chaos.fail_at_step=5", f"chaos.fail_rank={rank}",
                                   f"data.num_workers={data_workers}")]) == 0
    assert (killed / ".chaos_fired").exists()  # a worker really died after step 5
    a, b = weights(uninterrupted / "model"), weights(killed / "model")
    assert a.keys() == b.keys()
    # Bitwise, as docs/training.md promises. (About one run in five used to end ~1e-7 apart, most likely from
    # DeepSpeed's shared-memory all-reduce, off on the CPU since trainers.engine.without_shm_comm: 9 of 9 runs
    # since were bitwise.) A real resume bug (a replayed or skipped batch, a lost RNG or optimizer state) moves
    # weights by ~lr.
    gaps = {key: float((a[key] - b[key]).abs().max()) for key in a if not torch.equal(a[key], b[key])}
    print(f"kill-and-resume (rank {rank}, {data_workers} data workers) bitwise equal: {not gaps}")
    assert not gaps, gaps
    # one history in metrics.jsonl, one W&B run id across both processes
    rows = [m for m in metrics(killed) if "loss" in m]
    assert [m["step"] for m in rows] == list(range(1, 9))
    # the broken shard is counted wherever it was read, before and after the restart
    assert max(m["skipped_shards"] for m in rows) == 1, [m["skipped_shards"] for m in rows]
    run_id = json.loads((killed / "run.json").read_text())["wandb_run_id"]
    assert run_ids(killed) == {run_id}
    logged = [row for row in history(killed) if "loss" in row]
    # both attempts' steps reach W&B: the killed one's were written at its step-3 checkpoint (Tracker.commit)
    assert {row["_step"] for row in logged} == set(range(1, 9))
    assert json.loads((killed / "model" / "lineage.json").read_text())["wandb_run_id"] == run_id


@pytest.mark.parametrize("zero", [0, 1, 3])  # ZeRO-0 re-splits only the data; 1 and 3 convert to universal
def test_resume_on_another_world_size_and_back(zero, trained, tiny_data):
    """2 -> 1 -> 2 workers, continuing the grid's 3-step run of this stage (it runs last on that folder: the
    grid and agreement tests above have read it already)."""
    run = trained("transformer", zero)
    same = ["model=transformer", f"deepspeed.zero_stage={zero}", "resume=true"]
    assert main(["pretrain", *base(tiny_data, run, *same, "trainer.max_steps=5", "trainer.num_workers=1")]) == 0
    assert json.loads((run / "model" / "lineage.json").read_text())["step"] == 5
    assert main(["pretrain", *base(tiny_data, run, *same, "trainer.max_steps=7")]) == 0
    assert json.loads((run / "model" / "lineage.json").read_text())["step"] == 7
    assert [m["step"] for m in metrics(run) if "loss" in m] == list(range(1, 8))
    assert len(run_ids(run)) == 1


# --- clear failures, before any Ray resource --------------------------------------------

def one_line_error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("override, needle", [
    ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
    ("trainer.global_batch_size=7", "trainer.global_batch_size"),
    ("model.vocab_size=600", "model.vocab_size: 600 != 512"),
    ("trainer.num_workers=3", "trainer.num_workers"),
    ("resume=true", "resume:"),
    ("deepspeed.offload_params=true", "deepspeed.offload_params"),
])
def test_bad_config_fails_in_one_line(override, needle, tiny_data, tmp_path, capsys):
    assert needle in one_line_error(capsys, ["pretrain", *base(tiny_data, tmp_path / "r", override)])


def test_missing_data_folder_names_the_key(tmp_path, capsys):
    line = one_line_error(capsys, ["pretrain", *base(tmp_path / "nope", tmp_path / "r")])
    assert "data.dir" in line and "seqfoundry prepare" in line


def test_an_existing_run_is_not_overwritten(pretrained, tiny_data, capsys):
    run = pretrained.parent
    before = (run / "metrics.jsonl").read_text()
    line = one_line_error(capsys, ["pretrain", *base(tiny_data, run)])
    assert "run.dir" in line and "resume=true" in line
    assert (run / "metrics.jsonl").read_text() == before


def test_incompatible_packages_are_refused(tiny_data, tmp_path, capsys):
    other_vocab = build_model(ModelConfig(vocab_size=600, d_model=16, num_encoder_layers=1, num_decoder_layers=1,
                                          num_heads=2, ffn_dim=32))
    write_package(tmp_path / "p600", other_vocab, tokenizer=tiny_data / "tokenizer.json", lineage=Lineage())
    for command in ("finetune", "pretrain"):  # continued pretraining from a package gets the same check
        line = one_line_error(capsys, [command, *base(tiny_data, tmp_path / "r", f"pretrained={tmp_path / 'p600'}")])
        assert line.startswith(f"seqfoundry {command}: error: pretrained:")
        assert "vocab_size 600 != data tokenizer's 512" in line

    same_vocab = build_model(ModelConfig(vocab_size=512, d_model=16, num_encoder_layers=1, num_decoder_layers=1,
                                         num_heads=2, ffn_dim=32))
    foreign = tmp_path / "foreign_tokenizer.json"
    tok = json.loads((tiny_data / "tokenizer.json").read_text())
    tok["model"]["vocab"] = dict(reversed(list(tok["model"]["vocab"].items())))
    foreign.write_text(json.dumps(tok))
    write_package(tmp_path / "pforeign", same_vocab, tokenizer=foreign, lineage=Lineage())
    for command in ("finetune", "pretrain"):
        line = one_line_error(capsys, [command, *base(tiny_data, tmp_path / "r", f"pretrained={tmp_path / 'pforeign'}")])
        assert "tokenizer.json" in line and "differs from the data's tokenizer" in line


# --- model selection: trainer.best_metric, trainer.patience ---------------------------------------

def test_the_package_is_the_checkpoint_with_the_best_validation_loss(tiny_data, tmp_path):
    """The package's step is the argmin of val_loss in metrics.jsonl (the reference), whatever the
    trajectory; with trainer.best_metric=none it is the last step."""
    run = tmp_path / "run"
    assert main(["pretrain", *base(tiny_data, run, "trainer.num_workers=1", "trainer.max_steps=8",
                                   "trainer.val_every=2", "trainer.lr=3e-3", "trainer.keep_last=1")]) == 0
    validated = [(m["val_loss"], -m["step"]) for m in metrics(run) if "val_loss" in m]
    assert len(validated) == 4
    best_loss, best_step = min(validated)[0], -min(validated)[1]
    assert read_lineage(run / "model").step == best_step
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert f"step_{best_step:08d}" in kept and "step_00000008" in kept  # the best and the latest
    assert metrics(run)[-1]["best_val_loss"] == pytest.approx(best_loss)
    # lr 1e-12 leaves the fp32 weights unchanged (as in the patience test below): steps 2 and 4 validate
    # equal, so ranking by val_loss would keep step 2; best_metric=none must package step 4 all the same.
    last = tmp_path / "last"
    assert main(["pretrain", *base(tiny_data, last, "trainer.num_workers=1", "trainer.max_steps=4",
                                   "trainer.val_every=2", "trainer.best_metric=none", "trainer.lr=1e-12",
                                   "trainer.schedule=constant")]) == 0
    validated = [m["val_loss"] for m in metrics(last) if "val_loss" in m]
    assert len(validated) == 2 and validated[0] == validated[1], validated
    assert read_lineage(last / "model").step == 4


def test_patience_stops_a_run_that_no_longer_improves(tiny_data, tmp_path):
    """lr 1e-12 leaves the fp32 weights unchanged, so the second validation cannot improve on the first:
    patience=1 stops there, and the package is the first validation's checkpoint."""
    run = tmp_path / "run"
    assert main(["pretrain", *base(tiny_data, run, "trainer.num_workers=1", "trainer.max_steps=20",
                                   "trainer.val_every=2", "trainer.patience=1", "trainer.lr=1e-12",
                                   "trainer.schedule=constant")]) == 0
    steps = [m["step"] for m in metrics(run)]
    assert max(steps) == 4
    assert read_lineage(run / "model").step == 2
